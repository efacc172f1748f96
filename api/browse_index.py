"""Browse pages without a full scan per request: keyset pages over a per-version seq index.

``GET /images`` used to run ``ORDER BY seq LIMIT ? OFFSET ?`` and ``GROUP BY collection`` over the
whole ``images`` table on every request (a top-N over every row, then a second full scan). Here
each API process keeps, per ``images`` table version, every ``seq`` in order (and each
collection's), plus the per-collection counts: built by one scan of the two small columns when a
new version is first seen (1M images: 8 MB of seqs; measured in tests/bench/bench_million.py), then
a page is a slice of that array and one range read, ``WHERE seq BETWEEN first AND last``, which
DuckDB answers from the few row groups whose ``seq`` statistics overlap (ingest writes seqs in
ascending runs, so each row group covers a narrow range).

A filtered Browse (``GET /images?tag=...``, :mod:`api.browse_filters`) gets the same kind of index
per filter: its first page runs the filter once, ``SELECT seq, collection ... WHERE <filter>``,
and keeps the matching seqs (:class:`FilteredIndexes`, keyed by the filter and the versions of the
tables it reads); the next pages, another collection under the same filter and the counts are
then slices and one range read, as above.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

__all__ = ["BrowseIndex", "FilteredIndexes", "SeqIndex", "seq_index"]


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


def seq_index(version, table) -> SeqIndex:
    """A :class:`SeqIndex` from an Arrow table of ``seq, collection`` in seq order (collections
    grouped through a dictionary encoding: no Python object per row)."""
    seqs = np.asarray(table.column("seq").to_numpy(), np.int64)
    coll = table.column("collection").combine_chunks().dictionary_encode()
    names = [str(n) for n in coll.dictionary.to_pylist()]
    if len(names) <= 1:
        by = {names[0]: seqs} if names else {}
    else:
        codes = coll.indices.to_numpy(zero_copy_only=False)
        order = np.argsort(codes, kind="stable")  # stable: each collection's seqs stay ascending
        bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
        by = {name: seqs[order[bounds[i]:bounds[i + 1]]] for i, name in enumerate(names)}
    counts = dict(sorted(((k, len(v)) for k, v in by.items()), key=lambda kv: (-kv[1], kv[0])))
    return SeqIndex(version, seqs, by, counts)


class FilteredIndexes:
    """The :class:`SeqIndex` of the last ``capacity`` filters used (thread-safe, least recently used
    dropped first); an index of more than ``max_rows`` seqs is not kept."""

    def __init__(self, capacity: int = 32, max_rows: int = 2_000_000):
        self._lock = threading.Lock()
        self._indexes: OrderedDict = OrderedDict()
        self._building: dict = {}
        self.capacity, self.max_rows = capacity, max_rows
        self.built = 0  # how many filters were run (a test and the bench read it)

    def get(self, key, build) -> SeqIndex:
        """The index for ``key`` (hashable: the filter and the versions it depends on), ``build()`` if new."""
        with self._lock:
            index = self._indexes.get(key)
            if index is not None:
                self._indexes.move_to_end(key)
                return index
            gate = self._building.setdefault(key, threading.Lock())
        with gate:  # one build per key at a time; others wait for it
            with self._lock:
                index = self._indexes.get(key)
            if index is not None:
                return index
            try:
                index = build()
            finally:
                with self._lock:
                    self._building.pop(key, None)
            with self._lock:
                self.built += 1
                if len(index.seqs) <= self.max_rows:
                    self._indexes[key] = index
                    while len(self._indexes) > self.capacity:
                        self._indexes.popitem(last=False)
            return index


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
            got = cursor.sql("SELECT seq, coalesce(collection, '') AS collection FROM images ORDER BY seq").to_arrow_table()
            self._current = seq_index(version, got)
            return self._current
