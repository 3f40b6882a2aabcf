"""The index's SQLite database, chunks.sqlite: the source of truth, vectors included.

    meta(key, value)                   generation: bumped by every commit, compared with the manifest's on open
    files(source, sha256, bytes, n_chunks, added)
    chunks(id, source, heading, start, end, text, hash, n_tokens, vec)   vec: float32 bytes, hash: of the text

The writer connection runs in WAL mode with synchronous=FULL, so a committed transaction survives a crash and
readers (one query-only connection per thread) never block it. Every SQL statement on the file lives here; the
Index (retrieval/store.py) holds the locks and keeps its vectors in step with what these functions commit.
"""
from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

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
        gen = generation(db)
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


def like_escape(text: str) -> str:
    """`text` with LIKE's wildcards (and the escape character itself) escaped, for `LIKE ? ESCAPE '\\'`."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def like_prefix(folder: str) -> str:
    """LIKE pattern for paths under `folder`."""
    return like_escape(folder).rstrip("/") + "/%"


def generation(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])


def file_sha(db: sqlite3.Connection, source: str) -> str | None:
    """The sha256 a source was indexed with, None if it is not indexed."""
    row = db.execute("SELECT sha256 FROM files WHERE source=?", (source,)).fetchone()
    return row[0] if row else None


@contextmanager
def _commit(db: sqlite3.Connection):
    """One write transaction that bumps the generation; rolled back whole if anything in it fails (Ctrl-C too)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _delete_chunks(db: sqlite3.Connection, source: str) -> list[int]:
    """Delete a source's chunks (inside a caller's transaction); returns their ids."""
    ids = [r[0] for r in db.execute("SELECT id FROM chunks WHERE source=?", (source,))]
    db.execute("DELETE FROM chunks WHERE source=?", (source,))
    return ids


def replace_source(db: sqlite3.Connection, source: str, sha: str, size: int, chunks: Sequence,
                   vecs: np.ndarray) -> tuple[list[int], list[int]]:
    """One transaction: a source's old chunks out, `chunks` with their (m, d) float32 vectors in, the file row
    written. Returns (old chunk ids, new chunk ids)."""
    with _commit(db):
        old = _delete_chunks(db, source)
        new = []
        for c, v in zip(chunks, vecs):
            cur = db.execute('INSERT INTO chunks(source, heading, start, "end", text, hash, n_tokens, vec)'
                             " VALUES (?,?,?,?,?,?,?,?)",
                             (source, c.heading, c.start, c.end, c.text, c.hash, c.n_tokens, v.tobytes()))
            new.append(cur.lastrowid)
        db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?)", (source, sha, size, len(chunks), time.time()))
    return old, new


def drop_source(db: sqlite3.Connection, source: str) -> list[int]:
    """One transaction: a source's chunks and file row out. Returns the dropped chunk ids."""
    with _commit(db):
        ids = _delete_chunks(db, source)
        db.execute("DELETE FROM files WHERE source=?", (source,))
    return ids


def sources_matching(db: sqlite3.Connection, *exact: str, under: str | None = None) -> list[str]:
    """Indexed sources equal to one of `exact`, or (with `under`) inside that folder."""
    where = [f"source IN ({','.join('?' * len(exact))})"] if exact else []
    args = list(exact)
    if under is not None:
        where.append("source LIKE ? ESCAPE '\\'")
        args.append(like_prefix(under))
    return [r[0] for r in db.execute(f"SELECT source FROM files WHERE {' OR '.join(where)}", args)]


CHUNK_COLUMNS = 'id, source, text, heading, start, "end"'  # the columns of a search hit, in Hit's order


def chunk_rows(conn: sqlite3.Connection, ids: list[int]) -> list[tuple]:
    """CHUNK_COLUMNS of the chunks with these ids (any order)."""
    return conn.execute(f"SELECT {CHUNK_COLUMNS} FROM chunks WHERE id IN ({','.join('?' * len(ids))})",
                        ids).fetchall()


def chunks_named(conn: sqlite3.Connection, name: str) -> list[tuple]:
    """CHUNK_COLUMNS of every chunk whose source is `name` or has `name`'s file name, in document order."""
    return conn.execute(f"SELECT {CHUNK_COLUMNS} FROM chunks WHERE source = ? OR source LIKE ? ESCAPE '\\' "
                        "ORDER BY source, start", (name, "%/" + like_escape(Path(name).name))).fetchall()


def chunks_with_vectors(conn: sqlite3.Connection, sources: list[str]) -> list[tuple]:
    """CHUNK_COLUMNS plus the vector bytes of every chunk of `sources`, in id order."""
    return conn.execute(f"SELECT {CHUNK_COLUMNS}, vec FROM chunks WHERE source IN ({','.join('?' * len(sources))}) "
                        "ORDER BY id", sources).fetchall()


def all_chunks(conn: sqlite3.Connection) -> list[tuple]:
    """(source, heading, text) of every chunk, in id order."""
    return conn.execute("SELECT source, heading, text FROM chunks ORDER BY id").fetchall()


def count_files(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]


def all_sources(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT source FROM files ORDER BY source")]
