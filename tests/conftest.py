"""Shared test set-up. Kept minimal: anything here runs before every test module is imported.

TRITON_INTERPRET must be set before the first `import triton` anywhere in the process, so it goes first: on this
CPU-only machine every Triton kernel runs in the interpreter on CPU tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
