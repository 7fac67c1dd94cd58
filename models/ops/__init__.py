"""The recurrences, one folder per family: naive.py (token by token), chunk.py, and fused.py / knobs.py /
triton.py where they exist."""
