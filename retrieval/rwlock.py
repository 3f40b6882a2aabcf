"""A readers-writer lock: many concurrent searches, or one mutation, never both.

hnswlib's knn_query calls are safe against each other, but not against add_items, mark_deleted or
resize_index (nmslib/hnswlib README; issues #29, #205, #562), and our in-memory exact-search matrix is
compacted in place on removal. So searches take the lock shared, mutations take it exclusive.

Writer preference: once a writer waits, new readers queue behind it, so a steady stream of searches cannot
starve an add forever. Not re-entrant.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
