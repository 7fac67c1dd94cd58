"""The sequence mixers, one module per family, and the registry of layer types (registry.py)."""
