"""A stand-in text encoder for index tests: words hashed into signed buckets, so texts that share words land near
each other, with no model to load. It counts its calls and texts (to check what an index re-embeds)."""
from __future__ import annotations

import hashlib
import re

import numpy as np


class HashEncoder:
    def __init__(self, dim: int = 64, name: str = "test-hash-encoder"):
        self.dim, self.name, self.calls, self.texts = dim, name, 0, 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts += len(texts)
        out = np.zeros((len(texts), self.dim), np.float32)  # (N, dim)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z0-9]+", t.lower()):
                h = int(hashlib.md5(w.encode()).hexdigest(), 16)
                out[i, h % self.dim] += 1.0 if (h >> 64) & 1 else -1.0
        out[:, 0] += 1e-3  # never a zero vector
        return out / np.linalg.norm(out, axis=1, keepdims=True)
