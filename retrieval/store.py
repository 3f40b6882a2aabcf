"""The document index: one folder holding chunk text and metadata in SQLite and vectors in an hnswlib graph.

    index/
      manifest.json        encoder, dim, space, count, generation, hnsw file + sha256 + size + M/ef/capacity
      chunks.sqlite        (WAL, retrieval/chunkdb.py) files(source, sha256, ...), chunks(id, source, heading,
                           start, end, text, hash, vec) and meta(generation, ...): the source of truth, vectors
                           included
      vectors-<gen>.hnsw   the graph, a rebuildable accelerator; named by generation, so a new one never
                           overwrites the file the current manifest vouches for

Search: below EXACT_THRESHOLD live chunks (set where bench/bench_retrieval.py finds the exact scan and the graph
walk break even on real MiniLM vectors) one matrix-vector product over all vectors is as fast as the graph walk
and exact; above it HNSW answers, with `ef` calibrated so recall@10 against the exact scan is >= 0.99 (see
VectorSet.calibrate_ef), stored in the manifest and set again after every load (hnswlib forgets it).

Durability and crashes:
* Each file's chunks are replaced in one SQLite transaction (synchronous=FULL): a crash mid-add loses at
  most the file being written; everything committed before stays.
* Every commit bumps `generation`. The graph is saved after each add/remove call to a temp file, fsynced,
  renamed, hashed, and only then does the manifest (written the same way) point at it. A crash between a
  commit and the save leaves manifest.generation behind the database's, and `open` rebuilds the graph from
  the vectors in SQLite.
* The sha256 in the manifest is checked *before* hnswlib's `load_index`: a corrupted graph file can pass
  hnswlib's own checks and then segfault the process on the first query. A mismatch raises IndexCorrupt
  (or, with `repair=True`, rebuilds the graph from SQLite).

Concurrency: searches share a readers-writer lock; the short critical section of a mutation (SQLite commit +
graph/matrix update) takes it exclusively, since hnswlib's add/resize/mark_deleted are unsafe during a query.
Encoding, the slow part of an add, runs outside the lock. One writer at a time (a plain mutex).

Incremental: a file whose bytes hash as before is not read again; a changed file has its chunks replaced,
and chunks whose text hash already has a vector anywhere in the index reuse it instead of being re-embedded.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phiforge.engine.atomic import write_atomic, write_json_atomic

from .chunkdb import (DB, all_sources, chunk_rows, chunks_named, connect_reader, count_files, drop_source, file_sha,
                      generation, known_vectors, open_db, replace_source, sources_matching)
from .chunking import Chunk, Skipped, chunk_file, collect_files, counting_tokenizer
from .encoder import Encoder, load_encoder
from .manifest import (MANIFEST, IndexCorrupt, IndexMismatch, built_with, new_manifest, read_manifest, sha256_file,
                       verify_graph_file)
from .rwlock import RWLock
from .vectors import EXACT_THRESHOLD, VectorSet

DEFAULT_ENCODER, DEFAULT_DIM = "sentence-transformers/all-MiniLM-L6-v2", 384
EMBED_BATCH = 256  # chunks gathered across files before one encode call (keeps length-sorted batches full)

class EmptyIndexError(LookupError):
    """Search on an index with no chunks."""


class NoIndexError(FileNotFoundError):
    """Index.open(create=False) on a folder that holds no index."""


@dataclass
class Hit:
    chunk_id: int
    source: str
    text: str
    score: float
    heading: str
    start: int
    end: int

    @classmethod
    def of(cls, row: tuple, score: float = 0.0) -> "Hit":
        """From a row of chunkdb.CHUNK_COLUMNS (id, source, text, heading, start, end)."""
        return cls(int(row[0]), row[1], row[2], float(score), row[3], row[4], row[5])


@dataclass
class AddReport:
    files_added: int = 0
    files_replaced: int = 0
    files_unchanged: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0
    files_removed: list[str] = field(default_factory=list)  # gone from a re-added folder, so dropped (synced)
    chunks_embedded: int = 0  # chunks_added minus those whose vector was reused by text hash
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Index:
    """Open with `Index.open(folder)`; use as a context manager or call close()."""

    def __init__(self, folder: Path, encoder, name: str, dim: int, vs: VectorSet, db: sqlite3.Connection,
                 manifest: dict):
        self.folder, self._encoder, self.encoder_name, self.dim = folder, encoder, name, dim
        self._vs, self._db, self._manifest = vs, db, manifest
        self._rw, self._wmutex = RWLock(), threading.Lock()
        self._local, self._readers = threading.local(), []

    # ------------------------------------------------------------------------------------------------ open
    @classmethod
    def open(cls, folder: str | Path, encoder=None, *, M: int = 16, ef_construction: int = 200,
             ef: int | None = None, repair: bool = False, create: bool = True) -> "Index":
        """Open the index in `folder`, creating it if missing (create=False: raise NoIndexError instead, and
        write nothing; readers use that, so a mistyped --index never leaves an index behind).

        encoder: any object with `.name`, `.dim` and `.encode(list[str]) -> (N, dim)`; default: the index's own
        (a tuned encoder is loaded from the folder its manifest names), else MiniLM; loaded only when first needed.
        Another encoder than the index was built with raises IndexMismatch naming both.
        M, ef_construction: graph build settings of a *new* index (an existing one keeps its own). ef: pin the
        query-time ef (saved; disables automatic calibration); None keeps the calibrated one. repair: rebuild a
        graph file that fails its checksum instead of raising.
        """
        folder = Path(folder)
        mpath, dbpath = folder / MANIFEST, folder / DB
        if not create and not mpath.exists() and not dbpath.exists():
            raise NoIndexError(f"{folder}: no index there (`phiforge index add PATH --index {folder}` creates one)")
        folder.mkdir(parents=True, exist_ok=True)
        name = getattr(encoder, "name", DEFAULT_ENCODER)
        dim = int(getattr(encoder, "dim", DEFAULT_DIM))
        if mpath.exists():
            if encoder is None:  # an index built with a tuned encoder opens with it (loaded when first needed)
                name, dim = built_with(folder, name, dim)
            manifest = read_manifest(folder, name, dim)
        elif dbpath.exists():
            raise IndexCorrupt(f"{mpath}: missing, but {dbpath} exists (not created by this version?)")
        else:
            manifest = new_manifest(name, dim, M, ef_construction, EXACT_THRESHOLD)
            if getattr(encoder, "path", None):
                manifest["encoder_path"] = encoder.path
        db, gen, ids, blobs = open_db(dbpath)
        if any(len(b) != 4 * dim for b in blobs):
            raise IndexCorrupt(f"{dbpath}: stored vectors are not {dim}-d float32")
        vs = VectorSet(dim, manifest["M"], manifest["ef_construction"], manifest["ef"])
        vs.ids = np.array(ids, dtype=np.int64)
        vs.vecs = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(-1, dim).copy()  # (n, d)
        vs.n = len(ids)
        self = cls(folder, encoder, name, dim, vs, db, manifest)
        h = manifest["hnsw"]
        if not mpath.exists():
            self._save()
        elif h is not None and manifest["generation"] == gen:
            try:
                self._load_graph(h)
            except IndexCorrupt:
                if not repair:
                    db.close()
                    raise
                self._rebuild_and_save()
        elif vs.n:  # the database moved on after the last graph save (a crash in between): rebuild
            self._rebuild_and_save()
        if ef is not None:
            self.set_ef(ef)
        return self

    def set_ef(self, ef: int) -> None:
        """Pin HNSW's query-time ef (candidate list size: higher is slower and more exact) and save it."""
        if ef < 1:
            raise ValueError(f"ef must be >= 1, got {ef}")
        with self._wmutex:
            with self._rw.write():
                self._vs.ef = ef
                if self._vs.hnsw is not None:
                    self._vs.hnsw.set_ef(ef)
            self._manifest["ef_pinned"] = True
            self._save()

    def _load_graph(self, h: dict) -> None:
        path = verify_graph_file(self.folder, h)  # before hnswlib reads a byte: corrupt files can segfault it
        try:
            self._vs.load_hnsw(str(path), h["capacity"])
        except RuntimeError as e:
            raise IndexCorrupt(f"{path}: hnswlib cannot load it ({e})") from None
        if self._vs.graph_nodes - self._vs.n != h["deleted"]:
            raise IndexCorrupt(f"{path}: {self._vs.graph_nodes} graph nodes do not match {self._vs.n} chunks "
                               f"+ {h['deleted']} tombstones")
        self._vs.calibrated_at = h.get("calibrated_at", 0)

    def _rebuild_and_save(self) -> None:
        self._vs.rebuild()
        self._vs.calibrated_at = 0
        self._save()

    # ------------------------------------------------------------------------------------------- persist
    def _save(self) -> None:
        """Calibrate ef if the size moved, write the graph under a new name, then the manifest. Writer only."""
        vs, gen = self._vs, generation(self._db)
        if not self._manifest.get("ef_pinned") and vs.n >= EXACT_THRESHOLD // 2 and \
                abs(vs.n - vs.calibrated_at) > 0.1 * max(vs.calibrated_at, 1):
            with self._rw.write():  # set_ef must not race a knn_query
                vs.calibrate_ef()
        old = self._manifest.get("hnsw")
        h = None
        if vs.hnsw is not None:
            path = self.folder / f"vectors-{gen}.hnsw"
            with self._rw.read():  # save_index only reads the graph, like a query
                write_atomic(path, vs.save_hnsw)
            h = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                 "capacity": vs.capacity, "elements": vs.graph_nodes, "deleted": vs.deleted,
                 "calibrated_at": vs.calibrated_at}
        self._manifest.update(count=vs.n, generation=gen, hnsw=h, ef=vs.ef, updated=time.time())
        write_json_atomic(self.folder / MANIFEST, self._manifest)
        keep = h["file"] if h else None
        for f in self.folder.glob("vectors-*.hnsw"):  # files no manifest points at any more
            if f.name != keep:
                f.unlink(missing_ok=True)
        del old

    # ------------------------------------------------------------------------------------------- writing
    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            path = self._manifest.get("encoder_path")
            if path and not Path(path).is_dir():
                raise FileNotFoundError(f"{self.folder}: built with encoder {self.encoder_name!r} from {path}, "
                                        "which is gone (put the tuned encoder back there)")
            enc = load_encoder(path)
            if enc.name != self.encoder_name:
                raise IndexMismatch(f"{self.folder}: index holds vectors from {self.encoder_name!r}, but {path} "
                                    f"now holds {enc.name!r}")
            self._encoder = enc
        return self._encoder

    def _replace_source(self, source: str, sha: str, size: int, chunks: list[Chunk], vecs: np.ndarray) -> int:
        """One transaction: drop a source's old chunks, insert the new ones; then update the vectors."""
        vecs = np.ascontiguousarray(vecs, dtype=np.float32).reshape(len(chunks), self.dim)  # (m, d)
        # normalise before storing, so the rows reloaded from SQLite equal the in-memory ones bit for bit
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        with self._rw.write():
            old, new = replace_source(self._db, source, sha, size, chunks, vecs)
            self._vs.remove(np.array(old, dtype=np.int64))
            self._vs.add(np.array(new, dtype=np.int64), vecs, normalized=True)
        return len(old)

    def add_chunks(self, chunks: list[Chunk], vecs: np.ndarray, sha: str = "") -> None:
        """Store pre-embedded chunks (grouped by source, replacing each source's chunks). For tests/benches."""
        by_source: dict[str, list[int]] = {}
        for i, c in enumerate(chunks):
            by_source.setdefault(c.source, []).append(i)
        with self._wmutex:
            for source, rows in by_source.items():
                self._replace_source(source, sha, 0, [chunks[i] for i in rows], vecs[rows])
            self._save()

    def _embed(self, chunks: list[Chunk], report: AddReport) -> np.ndarray:
        """Vectors for chunks: reuse stored ones with the same text hash, encode the rest once each."""
        known = known_vectors(self._db, {c.hash for c in chunks})
        todo = {c.hash: c.embed_text for c in chunks if c.hash not in known}
        if todo:
            fresh = self.encoder.encode(list(todo.values()))  # (m, d)
            if fresh.shape[1] != self.dim:
                raise IndexMismatch(f"encoder returned {fresh.shape[1]}-d vectors for a {self.dim}-d index")
            known.update((h, v.astype(np.float32).tobytes()) for h, v in zip(todo, fresh))
            report.chunks_embedded += len(todo)
        return np.stack([np.frombuffer(known[c.hash], dtype=np.float32) for c in chunks]) if chunks else \
            np.zeros((0, self.dim), np.float32)

    def add(self, paths: list[str | Path], log=None) -> AddReport:
        """Index files and folders incrementally. log: optional callable(str) for per-file progress."""
        files, skipped = collect_files([paths] if isinstance(paths, (str, Path)) else paths)
        own = self.folder.resolve()
        files = [f for f in files if own not in f.resolve().parents]  # never index the index itself
        skipped = [(p, r) for p, r in skipped if own not in Path(p).resolve().parents]
        report = AddReport(skipped=list(skipped))
        say = log or (lambda s: None)
        tok = counting_tokenizer()
        with self._wmutex:
            pending: list[tuple[str, str, int, list[Chunk]]] = []

            def flush():
                vecs = self._embed([c for *_, cs in pending for c in cs], report)
                row = 0
                for source, sha, size, cs in pending:
                    removed = self._replace_source(source, sha, size, cs, vecs[row:row + len(cs)])
                    row += len(cs)
                    report.chunks_added += len(cs)
                    report.chunks_removed += removed
                    say(f"{'replaced' if removed else 'added'} {source} ({len(cs)} chunks)")
                pending.clear()

            for f in files:
                source = str(f.resolve())
                try:
                    sha, size = sha256_file(f), f.stat().st_size
                except OSError as e:
                    report.skipped.append((str(f), f"unreadable: {e.strerror or e}"))
                    continue
                known = file_sha(self._db, source)
                if known == sha:
                    report.files_unchanged += 1
                    continue
                try:
                    doc, chunks = chunk_file(f, tok)
                except Skipped as e:
                    report.skipped.append((str(f), str(e)))
                    continue
                report.warnings += doc.warnings
                report.files_replaced += known is not None
                report.files_added += known is None
                pending.append((source, sha, size, chunks))
                if sum(len(p[3]) for p in pending) >= EMBED_BATCH:
                    flush()
            if pending:
                flush()
            if report.files_added or report.files_replaced:
                self._save()
        for src in self._gone_from_folders(paths, files):
            report.chunks_removed += self.remove(src)
            report.files_removed.append(src)
            say(f"removed {src} (no longer in its folder)")
        for path, reason in report.skipped:
            say(f"skipped {path}: {reason}")
        return report

    def _gone_from_folders(self, paths: list[str | Path] | str | Path, files: list[Path]) -> list[str]:
        """Indexed sources under a folder being re-added that the folder no longer holds (deleted or renamed):
        re-adding a folder syncs it."""
        present = {str(f.resolve()) for f in files}
        gone: list[str] = []
        for p in [paths] if isinstance(paths, (str, Path)) else paths:
            if not Path(p).is_dir():
                continue
            rows = sources_matching(self._db, under=str(Path(p).resolve()))
            gone += [src for src in rows if src not in present and not Path(src).exists() and src not in gone]
        return gone

    def remove(self, source: str | Path) -> int:
        """Remove a file's chunks (or every file under a folder). Returns chunks removed."""
        resolved = str(Path(source).resolve())
        with self._wmutex:
            rows = sources_matching(self._db, str(source), resolved, under=resolved)
            if not rows:
                raise KeyError(f"{source}: no such source in index {self.folder}")
            removed = 0
            for src in rows:
                with self._rw.write():
                    removed += self._vs.remove(np.array(drop_source(self._db, src), dtype=np.int64))
            self._save()
        return removed

    # ------------------------------------------------------------------------------------------- reading
    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect_reader(self.folder / DB)
            self._readers.append(conn)
        return conn

    def search(self, query: str, k: int = 5, mode: str = "auto") -> list[Hit]:
        """Top-k chunks for a text query, best first. mode: auto (threshold) | exact | hnsw."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("empty query: give some words to search for")
        if self._vs.n == 0:
            raise EmptyIndexError(f"index {self.folder} is empty: add documents first "
                                  f"(phiforge index add PATH --index {self.folder})")
        return self.search_vector(self.encoder.encode([query])[0], k, mode)

    def search_vector(self, q: np.ndarray, k: int = 5, mode: str = "auto") -> list[Hit]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        with self._rw.read():
            if self._vs.n == 0:
                raise EmptyIndexError(f"index {self.folder} is empty: add documents first")
            ids, scores, _ = self._vs.search(q, k, mode)
            rows = chunk_rows(self._reader(), ids.tolist())
        by_id = {r[0]: r for r in rows}
        return [Hit.of(by_id[i], s) for i, s in zip(ids.tolist(), scores.tolist()) if i in by_id]

    def chunks_of(self, name: str) -> list[Hit]:
        """Every chunk of the document whose file name (or full source path) is `name`, in document order, with
        score 0: how a Q/A set's `sources` (file names) find their chunks."""
        with self._rw.read():
            rows = chunks_named(self._reader(), name)
        return [Hit.of(r) for r in rows]

    def sources(self) -> list[str]:
        return all_sources(self._reader())

    def stats(self) -> dict:
        with self._rw.read():
            return self._stats()

    def _stats(self) -> dict:
        vs = self._vs
        files = count_files(self._reader())
        disk = sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())
        return {"folder": str(self.folder), "encoder": self.encoder_name, "dim": self.dim, "space": "cosine",
                "files": files, "chunks": vs.n, "graph_nodes": vs.graph_nodes, "tombstones": vs.deleted,
                "capacity": vs.capacity, "M": vs.M, "ef_construction": vs.ef_construction, "ef": vs.ef,
                "search_mode": "exact" if vs.n < EXACT_THRESHOLD else "hnsw",
                "exact_threshold": EXACT_THRESHOLD, "generation": self._manifest["generation"], "bytes": disk}

    def close(self) -> None:
        with self._wmutex, self._rw.write():
            for conn in self._readers:
                conn.close()
            self._readers.clear()
            self._db.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self._vs.n
