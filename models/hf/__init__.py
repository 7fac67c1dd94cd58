"""The Hugging Face configurations and models (what an exported folder's auto_map names)."""
