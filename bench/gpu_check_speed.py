"""bench/gpu_check.py's speed parts (filled in below)."""
PARTS = {}
