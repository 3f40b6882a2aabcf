"""The index's SQLite database, chunks.sqlite: the source of truth, vectors included.

    meta(key, value)                   generation: bumped by every commit, compared with the manifest's on open
    files(source, sha256, bytes, n_chunks, added)
    chunks(id, source, heading, start, end, text, hash, n_tokens, vec)   vec: float32 bytes, hash: of the text

The writer connection runs in WAL mode with synchronous=FULL, so a committed transaction survives a crash and
readers (one query-only connection per thread) never block it.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterable

from .manifest import IndexCorrupt

DB = "chunks.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files(source TEXT PRIMARY KEY, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL,
                                 n_chunks INTEGER NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL,
                                  heading TEXT NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
                                  text TEXT NOT NULL, hash TEXT NOT NULL, n_tokens INTEGER NOT NULL,
                                  vec BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_source ON chunks(source);
CREATE INDEX IF NOT EXISTS chunks_hash ON chunks(hash);
"""


def open_db(path: Path) -> tuple[sqlite3.Connection, int, list[int], list[bytes]]:
    """The writer connection (schema created if missing, integrity checked), the stored generation, and every
    chunk's id and vector bytes in id order. A damaged file raises IndexCorrupt naming it."""
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(check)
        db.executescript(SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('generation', '0')")
        gen = int(db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
        rows = db.execute("SELECT id, vec FROM chunks ORDER BY id").fetchall()
    except sqlite3.DatabaseError as e:
        raise IndexCorrupt(f"{path}: {e}") from None
    return db, gen, [r[0] for r in rows], [r[1] for r in rows]


def connect_reader(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False)
    conn.execute("PRAGMA query_only=1")
    return conn


def known_vectors(db: sqlite3.Connection, hashes: Iterable[str]) -> dict[str, bytes]:
    """{text hash: vector bytes} for the hashes that already have a vector anywhere in the index."""
    hashes = sorted(set(hashes))
    known: dict[str, bytes] = {}
    for i in range(0, len(hashes), 500):  # SQLite caps the number of bound parameters per statement
        part = hashes[i:i + 500]
        q = f"SELECT hash, vec FROM chunks WHERE hash IN ({','.join('?' * len(part))})"
        known.update(db.execute(q, part).fetchall())
    return known


def like_prefix(folder: str) -> str:
    """LIKE pattern for paths under `folder`, with LIKE's wildcards escaped."""
    esc = folder.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return esc.rstrip("/") + "/%"
