"""Counters of a bucket-log writer (:class:`WriterStats`) and the Delta statistics of a batch's
rows (:func:`_row_stats`), for :mod:`lake.bucket_store`."""

from __future__ import annotations

import os
import time
from typing import Any

import pyarrow as pa

from lake.commit import _stat_value

__all__ = ["WriterStats"]


class WriterStats:
    """Counters of one process's log writer (what a batch costs and where the time goes), read by
    ``imagelake``'s load benchmark from the node's version board (:meth:`snapshot`).

    ``seconds`` sums wall time per phase over all batches: ``lock`` waiting for the table lock
    (local lakes), ``sync`` reading the log's tail before planning, ``plan`` validating the batch,
    ``commit`` writing its data file and commit, ``adopt`` folding in and pushing the commit to the
    node's followers, ``compact`` rewriting small files (merges and compactions), ``checkpoint``
    writing a Delta checkpoint (beside the commits, not in a batch's time); ``queue`` sums each action's wait from
    being queued to its batch being taken, ``batch`` each batch's time from taken to answered.
    Written by the writer thread only (``checkpoint`` and its count by the upkeep thread that
    writes checkpoints beside it)."""

    PHASES = ("lock", "sync", "plan", "commit", "adopt", "compact", "checkpoint")

    def __init__(self):
        self.pid = os.getpid()
        self.started = time.time()
        self.counts = {"batches": 0, "actions": 0, "commits": 0, "rows": 0, "max_batch": 0, "replans": 0,
                       "compactions": 0, "merges": 0, "checkpoints": 0, "expired_logs": 0}
        self.seconds = dict.fromkeys((*self.PHASES, "queue", "batch"), 0.0)
        self.max_queue_s = 0.0
        self._published = 0.0

    def clock(self):
        """A function ``lap(phase)`` adding the time since the last lap to ``phase``."""
        last = [time.perf_counter()]

        def lap(phase: str) -> None:
            now = time.perf_counter()
            self.seconds[phase] += now - last[0]
            last[0] = now
        return lap

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def picked(self, at: float, queued: list[float]) -> None:
        self.counts["batches"] += 1
        self.counts["actions"] += len(queued)
        self.counts["max_batch"] = max(self.counts["max_batch"], len(queued))
        waits = [at - t for t in queued]
        self.seconds["queue"] += sum(waits)
        self.max_queue_s = max(self.max_queue_s, *waits)

    def committed(self, rows: int) -> None:
        self.counts["commits"] += 1
        self.counts["rows"] += rows

    def done(self, started: float) -> None:
        self.seconds["batch"] += time.perf_counter() - started

    def due(self, every_s: float = 0.2) -> bool:
        """True at most every ``every_s`` (when the writer publishes a snapshot)."""
        now = time.monotonic()
        if now - self._published < every_s:
            return False
        self._published = now
        return True

    def snapshot(self) -> dict[str, Any]:
        return {"pid": self.pid, "started": self.started, "at": time.time(), **self.counts,
                "seconds": {k: round(v, 6) for k, v in self.seconds.items()}, "max_queue_s": round(self.max_queue_s, 6)}


def _row_stats(rows: list[dict[str, Any]], schema: pa.Schema) -> dict | None:
    """Delta file statistics of ``rows`` as :func:`lake.commit._file_stats` states them from a
    file's Parquet metadata (row count; null count, min and max of every flat column), computed
    from the values themselves: Python orders strings by code point, which is the byte order of
    their UTF-8 that Parquet's statistics use. None when a bound cannot be stated."""
    stats: dict = {"numRecords": len(rows), "minValues": {}, "maxValues": {}, "nullCount": {}}
    for f in schema:
        t = f.type
        if pa.types.is_nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
            continue
        values = [r[f.name] for r in rows if r.get(f.name) is not None]
        stats["nullCount"][f.name] = len(rows) - len(values)
        if not values:
            continue
        lo, hi = _stat_value(t, min(values), False), _stat_value(t, max(values), True)
        if lo is None or hi is None:
            return None
        stats["minValues"][f.name], stats["maxValues"][f.name] = lo, hi
    return stats
