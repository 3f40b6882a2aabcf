"""The index folder's manifest.json: what the folder holds, and the checks made before trusting its files.

    {"format": "phiforge-index/1", "encoder": "...", "dim": 384, "space": "cosine", "count": 30000,
     "generation": 17, "M": 16, "ef_construction": 200, "ef": 48, "exact_threshold": ...,
     "hnsw": {"file": "vectors-17.hnsw", "sha256": "...", "bytes": ..., "capacity": ..., "elements": ...,
              "deleted": ..., "calibrated_at": ...},
     "encoder_path": "/abs/folder"}    only for a tuned encoder (retrieval/tune.py): where to load it from

hnswlib's file has no magic number, version, checksum, space or dimension: loading it with the wrong dim
"works" and returns wrong distances, and bytes flipped inside its level-0 region load fine and then crash
the process on the first query. So the manifest carries what the graph file cannot say about itself, and
`verify_graph_file` checks size and sha256 *before* hnswlib ever reads the bytes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "phiforge-index/1"
MANIFEST = "manifest.json"


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class IndexCorrupt(RuntimeError):
    """An index file failed a check (checksum, size, JSON, SQLite integrity); the message names the file."""


class IndexMismatch(ValueError):
    """The index was built with a different encoder or dimension than the one requested."""


def new_manifest(encoder: str, dim: int, M: int, ef_construction: int, exact_threshold: int) -> dict:
    return {"format": FORMAT, "encoder": encoder, "dim": dim, "space": "cosine", "count": 0, "generation": 0,
            "hnsw": None, "M": M, "ef_construction": ef_construction, "ef": 64,
            "exact_threshold": exact_threshold}


def built_with(folder: Path, name: str, dim: int) -> tuple[str, int]:
    """The encoder name and dim an index was built with when it names a tuned encoder's folder (`encoder_path`),
    else (name, dim) unchanged, so the usual check against the default encoder applies."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return name, dim  # read_manifest reports it
    if isinstance(manifest, dict) and manifest.get("encoder_path"):
        return manifest.get("encoder", name), manifest.get("dim", dim)
    return name, dim


def read_manifest(folder: Path, encoder: str, dim: int) -> dict:
    """Parse and check a folder's manifest against the encoder about to be used with it."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                             f"want {FORMAT!r}")
        for key in ("encoder", "dim", "generation", "hnsw", "M", "ef_construction", "ef"):
            if key not in manifest:
                raise ValueError(f"no {key!r} field")
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexCorrupt(f"{path}: unreadable manifest ({e})") from None
    if manifest["dim"] != dim or manifest["encoder"] != encoder:
        raise IndexMismatch(f"{folder}: index holds {manifest['dim']}-d vectors from {manifest['encoder']!r}, "
                            f"but the encoder is {encoder!r} with dim {dim} (an index keeps the encoder it was "
                            "built with: use that one, or build a new index)")
    return manifest


def verify_graph_file(folder: Path, entry: dict) -> Path:
    """The graph file named by a manifest entry, after checking it exists, has its size and its sha256."""
    path = folder / entry["file"]
    hint = "open with repair=True to rebuild it from chunks.sqlite"
    if not path.is_file():
        raise IndexCorrupt(f"{path}: missing graph file ({hint})")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise IndexCorrupt(f"{path}: {size} bytes, manifest says {entry['bytes']} (truncated?); {hint}")
    if sha256_file(path) != entry["sha256"]:
        raise IndexCorrupt(f"{path}: sha256 differs from the manifest (corrupted); {hint}")
    return path
