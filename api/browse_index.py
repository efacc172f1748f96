"""Browse pages without a full scan per request: keyset pages over a per-version seq index.

``GET /images`` used to run ``ORDER BY seq LIMIT ? OFFSET ?`` and ``GROUP BY collection`` over the
whole ``images`` table on every request (a top-N over every row, then a second full scan). Here
each API process keeps, per ``images`` table version, every ``seq`` in order (and each
collection's), plus the per-collection counts: built by one scan of the two small columns when a
new version is first seen (1M images: 8 MB of seqs; measured in tests/bench/bench_million.py), then
a page is a slice of that array and one range read, ``WHERE seq BETWEEN first AND last``, which
DuckDB answers from the few row groups whose ``seq`` statistics overlap (ingest writes seqs in
ascending runs, so each row group covers a narrow range).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

__all__ = ["BrowseIndex", "SeqIndex"]


@dataclass(frozen=True)
class SeqIndex:
    version: int | None
    seqs: np.ndarray                      # every seq, ascending
    by_collection: dict[str, np.ndarray]  # collection -> its seqs, ascending
    counts: dict[str, int]                # collection -> images, most first (then by name)

    def page(self, offset: int, limit: int, collection: str | None = None) -> np.ndarray:
        seqs = self.seqs if collection is None else self.by_collection.get(collection, np.empty(0, np.int64))
        return seqs[offset:offset + limit]

    def total(self, collection: str | None = None) -> int:
        return len(self.seqs) if collection is None else self.counts.get(collection, 0)


class BrowseIndex:
    """Thread-safe holder of the :class:`SeqIndex` of the newest ``images`` version seen."""

    def __init__(self):
        self._lock = threading.Lock()
        self._current: SeqIndex | None = None

    def get(self, version: int | None, cursor) -> SeqIndex:
        """The index of ``version``, built with ``cursor`` (over the view ``images``) if not current."""
        current = self._current
        if current is not None and current.version == version:
            return current
        with self._lock:
            current = self._current
            if current is not None and current.version == version:
                return current
            got = cursor.execute("SELECT seq, coalesce(collection, '') AS collection FROM images ORDER BY seq").fetchnumpy()
            seqs = np.asarray(got["seq"], np.int64)
            colls = np.asarray(got["collection"], object)
            names, codes = np.unique(colls, return_inverse=True) if len(colls) else (np.empty(0, object), np.empty(0, np.int64))
            by = {str(name): seqs[codes == i] for i, name in enumerate(names)}
            counts = dict(sorted(((k, len(v)) for k, v in by.items()), key=lambda kv: (-kv[1], kv[0])))
            self._current = SeqIndex(version, seqs, by, counts)
            return self._current
