"""Nearest-neighbour search over unit vectors: an exact matrix scan below a size threshold, HNSW above it.

Every live vector sits twice in memory: rows of a dense float32 matrix (for the exact scan and for rebuilds)
and nodes of an hnswlib graph (space "cosine", labels = chunk ids). Which one answers is a pure latency
choice, measured by bench/bench_retrieval.py (see EXACT_THRESHOLD): a single query's matrix-vector product
reads every byte of the matrix, O(n) and memory-bound, while an HNSW walk touches a few hundred nodes.

hnswlib facts this file is built around (v0.8.0):
* `ef` is not saved with the graph; after `load_index` it is back to 10, so we store ours and set it again.
* `mark_deleted` only tombstones: the node stays in the graph and is still walked. `add_items(...,
  replace_deleted=True)` reuses tombstoned slots (the flag must be given at init *and* at load), and once
  tombstones exceed REBUILD_FRACTION of the graph we rebuild it from the live rows.
* `knn_query` raises when it finds fewer than k live results (tombstone-heavy neighbourhoods); we fall back to
  the exact scan then, so a search never fails for that reason.
* Capacity is fixed at init; we grow it geometrically with `resize_index`.
Thread safety is the caller's job (store.py holds a readers-writer lock): none of the mutators here may run
concurrently with a search.

Shapes: n live vectors, d dimension, k hits, q queries.
"""
from __future__ import annotations

import hnswlib
import numpy as np

# Where the exact scan and the HNSW walk break even: bench/bench_retrieval.py's "threshold" entry measures both on
# real MiniLM vectors (one query at a time, one thread, ef calibrated per size as calibrate_ef does). Both are
# small next to embedding the query, so below this size we take the exact answer; above it HNSW, whose advantage
# grows linearly with the index.
EXACT_THRESHOLD = 1000
REBUILD_FRACTION = 0.2  # tombstones / graph nodes that trigger a rebuild
EF_CANDIDATES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
TARGET_RECALL = 0.99


class VectorSet:
    def __init__(self, dim: int, M: int = 16, ef_construction: int = 200, ef: int = 64, threads: int = -1):
        self.dim, self.M, self.ef_construction, self.ef, self.threads = dim, M, ef_construction, ef, threads
        self.ids = np.zeros(0, dtype=np.int64)  # (cap,) chunk id of each matrix row
        self.vecs = np.zeros((0, dim), dtype=np.float32)  # (cap, d); rows [0, n) are live
        self.n = 0
        self.hnsw = None  # built lazily by `_ensure_hnsw`
        self.calibrated_at = 0  # live count when ef was last calibrated

    # ---------------------------------------------------------------------------------------------- state
    @property
    def capacity(self) -> int:
        return self.hnsw.max_elements if self.hnsw is not None else 0

    @property
    def graph_nodes(self) -> int:
        return self.hnsw.element_count if self.hnsw is not None else 0

    @property
    def deleted(self) -> int:
        return self.graph_nodes - self.n

    def _new_hnsw(self, capacity: int):
        index = hnswlib.Index(space="cosine", dim=self.dim)
        index.init_index(max_elements=max(capacity, 16), M=self.M, ef_construction=self.ef_construction,
                         allow_replace_deleted=True)
        index.set_ef(self.ef)
        return index

    def _grow_matrix(self, extra: int) -> None:
        need = self.n + extra
        if need > len(self.ids):
            cap = max(need, 2 * len(self.ids), 1024)
            ids = np.zeros(cap, dtype=np.int64)
            vecs = np.zeros((cap, self.dim), dtype=np.float32)
            ids[:self.n], vecs[:self.n] = self.ids[:self.n], self.vecs[:self.n]
            self.ids, self.vecs = ids, vecs

    # ------------------------------------------------------------------------------------------ mutation
    def add(self, ids: np.ndarray, vecs: np.ndarray, normalized: bool = False) -> None:
        """Append rows (ids must be new). vecs: (m, d) float32, normalised here unless `normalized`.

        Normalising an already-unit row again can flip its last bits; the store passes normalized=True so
        the matrix equals the rows it persisted and a reopened index scores bit-identically.
        """
        vecs = np.ascontiguousarray(vecs, dtype=np.float32).reshape(-1, self.dim)  # (m, d)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(vecs):
            raise ValueError(f"{len(ids)} ids for {len(vecs)} vectors")
        if not len(ids):
            return
        if not normalized:
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        free = self.deleted  # tombstoned slots that replace_deleted will reuse first (count before n grows)
        self._grow_matrix(len(ids))
        self.ids[self.n:self.n + len(ids)] = ids
        self.vecs[self.n:self.n + len(ids)] = vecs
        self.n += len(ids)
        if self.hnsw is None:
            self.hnsw = self._new_hnsw(2 * self.n)
            self.hnsw.add_items(self.vecs[:self.n], self.ids[:self.n], num_threads=self.threads)
            return
        need = self.graph_nodes - free + len(ids)
        if need > self.capacity:
            self.hnsw.resize_index(max(need, 2 * self.capacity))
        self.hnsw.add_items(vecs, ids, num_threads=self.threads, replace_deleted=free > 0)

    def remove(self, ids: np.ndarray) -> int:
        """Drop rows by id (unknown ids ignored); returns how many were live."""
        gone = np.isin(self.ids[:self.n], np.asarray(ids, dtype=np.int64))
        removed = self.ids[:self.n][gone]
        keep = ~gone
        m = int(keep.sum())
        self.ids[:m], self.vecs[:m] = self.ids[:self.n][keep], self.vecs[:self.n][keep]
        self.n = m
        for label in removed.tolist():
            self.hnsw.mark_deleted(label)
        if self.graph_nodes and self.deleted > REBUILD_FRACTION * self.graph_nodes:
            self.rebuild()
        return len(removed)

    def rebuild(self) -> None:
        """A fresh graph of the live rows: drops tombstones, which still cost walk time and memory."""
        self.hnsw = None
        if self.n:
            self.hnsw = self._new_hnsw(2 * self.n)
            self.hnsw.add_items(self.vecs[:self.n], self.ids[:self.n], num_threads=self.threads)

    # -------------------------------------------------------------------------------------------- search
    def exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product (= cosine, rows are unit). q: (d,) -> ids (k,), scores (k,)."""
        scores = self.vecs[:self.n] @ q  # (n,)
        k = min(k, self.n)
        top = np.argpartition(-scores, k - 1)[:k] if k < self.n else np.arange(self.n)
        top = top[np.lexsort((self.ids[top], -scores[top]))]  # by score, ties by id: deterministic
        return self.ids[top].copy(), scores[top].astype(np.float32)

    def ann(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k through HNSW; falls back to exact when the graph cannot produce k live results."""
        k = min(k, self.n)
        try:
            labels, dist = self.hnsw.knn_query(q.reshape(1, -1), k=k, num_threads=1)  # (1, k) each
        except RuntimeError:
            return self.exact(q, k)
        return labels[0].astype(np.int64), (1.0 - dist[0]).astype(np.float32)

    def search(self, q: np.ndarray, k: int, mode: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
        """-> (ids, scores, mode used). mode: auto | exact | hnsw."""
        q = np.asarray(q, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise ValueError(f"query has dimension {q.shape[0]}, index has {self.dim}")
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        if mode == "auto":
            mode = "exact" if self.n < EXACT_THRESHOLD or self.hnsw is None else "hnsw"
        return (*(self.exact(q, k) if mode == "exact" else self.ann(q, k)), mode)

    def calibrate_ef(self, k: int = 10, n_queries: int = 200, seed: int = 0) -> int:
        """Smallest ef in EF_CANDIDATES whose recall@k against the exact scan is >= TARGET_RECALL.

        Queries are stored vectors plus Gaussian noise of norm ~1.5, renormalised: near the data like real
        queries, never members (self-matches would flatter recall), and deliberately a bit *farther* from the
        data than real queries, since far queries need a larger ef. Measured on 30k MiniLM docstring vectors
        with 1,000 held-out docstrings as real queries (bench/bench_retrieval.py): noise ~1.0 picked ef 48,
        whose real recall@10 was only 0.986; noise ~1.5 picks ef 96, real recall@10 0.997.
        """
        if self.n <= k or self.hnsw is None:
            return self.ef
        rng = np.random.default_rng(seed)
        rows = rng.choice(self.n, size=min(n_queries, self.n), replace=False)
        noise = 1.5 * rng.standard_normal((len(rows), self.dim)).astype(np.float32) / np.sqrt(self.dim)
        qs = self.vecs[rows] + noise  # (q, d); ~56 degrees from the seed row on average
        qs /= np.linalg.norm(qs, axis=1, keepdims=True)
        sims = qs @ self.vecs[:self.n].T  # (q, n): one GEMM instead of q matrix-vector scans
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # (q, k)
        exact_sets = [set(self.ids[row].tolist()) for row in top]
        best = EF_CANDIDATES[-1]
        for ef in EF_CANDIDATES:
            if ef < k:
                continue
            self.hnsw.set_ef(ef)
            try:
                labels, _ = self.hnsw.knn_query(qs, k=k)  # (q, k)
            except RuntimeError:
                continue
            recall = np.mean([len(exact_sets[i] & set(labels[i].tolist())) / k for i in range(len(qs))])
            if recall >= TARGET_RECALL:
                best = ef
                break
        self.ef = best
        self.hnsw.set_ef(best)
        self.calibrated_at = self.n
        return best

    # -------------------------------------------------------------------------------------- persistence
    def save_hnsw(self, path: str) -> None:
        self.hnsw.save_index(path)

    def load_hnsw(self, path: str, capacity: int) -> None:
        """Load a graph file (checksum already verified by the caller) and restore ef."""
        index = hnswlib.Index(space="cosine", dim=self.dim)
        index.load_index(path, max_elements=capacity, allow_replace_deleted=True)
        index.set_ef(self.ef)  # not stored in the file: it would silently be 10
        self.hnsw = index
