"""The bucket log's append path: how the writer of :class:`lake.bucket_store.BucketStore` commits a
batch, and the upkeep after it (merging its small files, compaction, checkpoints).

A batch is one small Parquet file (statistics for every flat column, as :mod:`lake.commit` states
them) and one commit file ``_delta_log/<V+1>.json`` holding a ``commitInfo`` and one ``add``
action, created with put-if-absent (``link(2)`` locally, ``If-None-Match`` on S3) — the same
conditional create deltalake's own commit ends in, without its per-commit rebuild of the table
snapshot, whose cost grows with the files in the table (measured 30 to 190 ms per commit at 100 to
300 files on 2 cores; the append path takes a few ms whatever the table's size). It applies while
the table is a plain Delta table: reader version 1, writer version <= 2 without features or
invariants, no partitions, no column mapping, and the catalog's columns (a catalog that gained a
column commits through ``write_deltalake`` once, which merges the schema, then appends directly
again).

:class:`AppendPath` is a mixin of :class:`~lake.bucket_store.BucketStore`: it works on the store's
fold (``_seen``, ``state``, ``version``), its lock and its node link, and is not used on its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import threading
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError

from lake.bucket_stats import _row_stats
from lake.buckets import BucketState
from lake.catalog import table_spec
from lake.errors import Unavailable
from lake.lock import LakeLock
from lake.remote import retry_log_gap
from lake.store import open_delta, store_errors

__all__ = ["AppendPath", "retention_seconds", "retry_log_gap"]

log = logging.getLogger("lake.bucket_store")

_LOG_FILE = re.compile(r"^(\d{20})\.(?:json|crc|checkpoint(?:\.[^/]+)?\.parquet)$")
_INTERVAL = re.compile(r"^\s*interval\s+(\d+)\s+(\w+?)s?\s*$", re.IGNORECASE)
_UNIT_S = {"nanosecond": 1e-9, "microsecond": 1e-6, "millisecond": 1e-3, "second": 1, "minute": 60, "hour": 3600,
           "day": 86400, "week": 604800}



def retention_seconds(value: str) -> float | None:
    """A Delta interval property (``"interval 30 days"``) in seconds; None when it is not one."""
    m = _INTERVAL.match(str(value))
    if not m or m.group(2).lower() not in _UNIT_S:
        return None
    return int(m.group(1)) * _UNIT_S[m.group(2).lower()]


class AppendPath:
    """The commit and upkeep half of :class:`~lake.bucket_store.BucketStore` (see the module docstring)."""

    def _check_direct(self) -> None:
        """Whether a batch may be committed by the append path (see the class docstring)."""
        ok = self.direct_append and bool(self._table_key)
        if ok:
            p, meta = self._table.protocol(), self._table.metadata()
            config = meta.configuration or {}
            schema = self._table.schema().to_arrow()
            names = {f.name for f in schema}
            ok = (p.min_reader_version == 1 and p.min_writer_version <= 2 and not p.writer_features
                  and not p.reader_features and not meta.partition_columns
                  and config.get("delta.columnMapping.mode", "none") == "none"
                  and names == set(table_spec("bucket_events").schema.names)
                  and not any(b"delta.invariants" in (f.metadata or {}) for f in schema))
        self._direct = ok

    def _writing(self):
        """Held from writing the data file to the commit: the fcntl lock the janitor's orphan sweep
        waits on (local lakes; the janitor does not sweep object stores, and ordering needs no lock).
        Shared: two writers of one node (a hand-over, or a follower committing past a hung writer)
        never wait on each other, only the janitor's exclusive sweep waits for them."""
        if self.lake.is_local:
            return LakeLock(self.lake, "bucket_events", self.lock_timeout, holder="bucket log writer",
                            poll=(0.0005, 0.004), shared=True)
        return contextlib.nullcontext()

    def _encode(self, rows: list[dict[str, Any]], compression: str = "none") -> tuple[pa.Buffer, dict] | None:
        """``rows`` as one Parquet file and its Delta statistics; None when some column's bounds
        cannot be stated (then deltalake writes the rows and computes its own). A batch's file is
        a few KB and left uncompressed (zstd's setup per column cost more than the rest of the
        encoding); merged files are compressed."""
        spec = table_spec("bucket_events")
        stats = _row_stats(rows, spec.schema)
        if stats is None:
            return None
        sink = pa.BufferOutputStream()
        with pq.ParquetWriter(sink, spec.schema, compression=compression) as writer:
            writer.write_table(pa.Table.from_pylist(rows, schema=spec.schema))
        return sink.getvalue(), stats

    def _put_commit(self, base: int, operation: str, name: str, data: pa.Buffer, stats: dict, *,
                    data_change: bool = True, removes: list[dict[str, Any]] = ()) -> bool:
        """Write the data file ``name`` and create the commit file of version ``base + 1`` (one
        ``add``, plus ``removes``); False when another writer committed that version first (the
        data file is removed again: no commit refers to it)."""
        now = int(time.time() * 1000)
        info = {"timestamp": now, "operation": operation, "readVersion": base, "isolationLevel": "Serializable",
                "operationParameters": {"mode": "Append"} if operation == "WRITE" else {},
                "operationMetrics": {"num_added_files": 1, "num_removed_files": len(removes),
                                     "num_added_rows": stats["numRecords"]},
                "engineInfo": "imagelake-bucket-log", "clientVersion": "imagelake"}
        if operation == "WRITE":
            info["isBlindAppend"] = True
        actions = [{"commitInfo": info}, *removes,
                   {"add": {"path": name, "partitionValues": {}, "size": data.size, "modificationTime": now,
                            "dataChange": data_change, "stats": json.dumps(stats, separators=(",", ":"))}}]
        key = f"{self._table_key}/{name}"
        self._announce(base + 1)
        self._store.write_bytes(key, data.to_pybytes())
        body = "".join(json.dumps(a, separators=(",", ":")) + "\n" for a in actions).encode()
        if self._store.put_if_absent(self._log_key(base + 1), body) is None:
            self._store.delete(key)
            return False
        self._checked_at = time.monotonic()  # version base + 1 was the tail just now
        return True

    def _file_uri(self, name: str) -> str:
        return f"{self.lake.table_uri('bucket_events')}/{name}"

    def _append_direct(self, rows: list[dict[str, Any]], base: int) -> list[str] | None:
        """Commit ``rows`` as version ``base + 1`` by the append path; the added file's URI, or
        None when another writer committed that version first."""
        encoded = self._encode(rows)
        if encoded is None:
            return self._append_deltalake(rows, base)
        name = f"part-00000-{secrets.token_hex(16)}-c000.parquet"
        if not self._put_commit(base, "WRITE", name, *encoded):
            return None
        self._recent.append((name, encoded[0].size, rows))
        return [self._file_uri(name)]

    def _merge_recent(self) -> None:
        """Rewrite the files this writer appended since its last merge into one (same rows, one
        ``remove`` each and one ``add``, committed like a batch), so the table keeps few files
        without rewriting the older ones. Skipped when anything else committed since (the next
        batch re-reads the tail first)."""
        with self._writing(), self._lock:
            recent, self._recent = self._recent, []
            base = self.version
            if (base is None or self._must_sync or any(self._file_uri(n) not in self._seen for n, _, _ in recent)
                    or self._log_has(base + 1)):
                self._must_sync = True
                return
            rows = sorted((r for _, _, part in recent for r in part), key=lambda r: r["seq"])
            encoded = self._encode(rows, compression="zstd")
            if encoded is None:
                return
            now = int(time.time() * 1000)
            removes = [{"remove": {"path": n, "deletionTimestamp": now, "dataChange": False,
                                   "extendedFileMetadata": True, "partitionValues": {}, "size": size}}
                       for n, size, _ in recent]
            name = f"part-00000-{secrets.token_hex(16)}-c000.zstd.parquet"
            if not self._put_commit(base, "OPTIMIZE", name, *encoded, data_change=False, removes=removes):
                self._must_sync = True
                return
            gone = [self._file_uri(n) for n, _, _ in recent]
            self._seen.difference_update(gone)
            self._seen.add(self._file_uri(name))
            self.version = base + 1
            if self._node is not None:
                self._node.broadcast({"base": base, "version": self.version, "files": [self._file_uri(name)],
                                      "removed": gone, "rows": []})
            self._publish()

    def _append_deltalake(self, rows: list[dict[str, Any]], base: int) -> list[str] | None:
        """Commit ``rows`` as version ``base + 1`` through ``write_deltalake`` (no commit retries);
        the added files, or None when another writer committed that version first."""
        spec = table_spec("bucket_events")
        with store_errors(self.lake):
            if self._table.version() != base:
                self._catch_up_table()  # the append path's commits moved the log
                if self._table.version() != base:
                    return None
            self._announce(base + 1)
            try:
                write_deltalake(self._table, pa.Table.from_pylist(rows, schema=spec.schema), mode="append",
                                schema_mode="merge", writer_properties=WriterProperties(compression="ZSTD"),
                                commit_properties=CommitProperties(max_commit_retries=0))
            except CommitFailedError as e:
                self._table.update_incremental()
                if self._table.version() == base:  # nobody else committed: a real failure
                    raise Unavailable(f"the bucket log commit failed: {e}") from None
                return None
            if self._table.version() != base + 1:
                self._table.update_incremental()
            self._check_direct()  # the commit may have merged new columns into the schema
            return [f for f in self._table.file_uris() if f not in self._seen]

    def _maintain(self) -> None:
        """After a batch was answered: merge this writer's recent small files, compact a log of
        many files, or start the checkpoint due every ``checkpoint_every`` commits of the append path
        (deltalake writes its own) on its own thread."""
        if self._table is None or self.version is None:
            return
        try:
            if len(self._recent) >= self.merge_files:
                clock = self.stats.clock()
                self._merge_recent()
                self.stats.count("merges")
                clock("compact")
            elif len(self._seen) > self.compact_files:
                clock = self.stats.clock()
                with self._writing():
                    self.compact()
                self.stats.count("compactions")
                clock("compact")
            elif self._checkpointed is None:
                self._checkpointed = self.version
            elif self._direct and self.version - self._checkpointed >= self.checkpoint_every:
                self._start_upkeep()
        except Exception:  # upkeep only: the log stays correct without it
            log.exception("bucket log upkeep (merge, compaction or checkpoint) failed; trying again later")
            self._checkpointed = self.version

    def _start_upkeep(self) -> None:
        """Write the due checkpoint (and expire old log files) on a thread of its own, one at a
        time: it reads the whole log (deltalake replays the commits since the last checkpoint,
        ~40 + ~40 ms of CPU at 100 commits and 1,000 versions here, seconds of wall time on a loaded
        machine) and commits nothing, so the writer goes on committing meanwhile instead of every
        action that arrives waiting behind it. Counted as in flight: ``drain`` and ``close`` wait
        for it."""
        with self._idle:
            if self._upkeep_running or self._closed:
                return
            self._upkeep_running = True
            self._inflight += 1
        threading.Thread(target=self._upkeep, name="bucket-log-upkeep", daemon=True).start()

    def _upkeep(self) -> None:
        try:
            while (self.version is not None and self._checkpointed is not None
                   and self.version - self._checkpointed >= self.checkpoint_every):
                started = time.perf_counter()
                with store_errors(self.lake):
                    if self._ckpt_table is None:
                        self._ckpt_table = retry_log_gap(lambda: open_delta(self.lake, "bucket_events"))
                    retry_log_gap(self._ckpt_table.update_incremental)
                    self._ckpt_table.create_checkpoint()
                self._checkpointed = self._ckpt_table.version()
                self.stats.count("checkpoints")
                if time.monotonic() - self._expired_at >= self.log_expiry_every_s:
                    self._expired_at = time.monotonic()
                    self.stats.count("expired_logs", self.expire_logs())
                self.stats.seconds["checkpoint"] += time.perf_counter() - started
        except Exception:  # upkeep only: the log stays correct without it
            log.exception("bucket log checkpoint failed; trying again after %d more commits", self.checkpoint_every)
            self._checkpointed = self.version
        finally:
            with self._idle:
                self._upkeep_running = False
                self._inflight -= 1
                self._idle.notify_all()

    def expire_logs(self, now: float | None = None) -> int:
        """Delete the log's commit, checksum and checkpoint files that are both older than the
        table's ``delta.logRetentionDuration`` (30 days unless set) and of a version below its
        latest checkpoint, as deltalake's post-commit cleanup does for the commits it makes, keeping
        the checkpoint that the oldest version inside the retention loads from; nothing
        when ``delta.enableExpiredLogCleanup`` is false or the retention cannot be read. Versions
        before the latest checkpoint then no longer load (time travel reaches back the retention).
        Returns the number of files deleted."""
        with store_errors(self.lake):
            if self._ckpt_table is None:
                self._ckpt_table = retry_log_gap(lambda: open_delta(self.lake, "bucket_events"))
            retry_log_gap(self._ckpt_table.update_incremental)
        config = self._ckpt_table.metadata().configuration or {}
        if str(config.get("delta.enableExpiredLogCleanup", "true")).lower() == "false":
            return 0
        retention_s = retention_seconds(config.get("delta.logRetentionDuration", "interval 30 days"))
        if retention_s is None:
            log.warning("bucket log: delta.logRetentionDuration %r is not an interval; no log files expire",
                        config.get("delta.logRetentionDuration"))
            return 0
        prefix = f"{self._table_key}/_delta_log"
        with store_errors(self.lake):
            try:
                checkpoint = int(json.loads(self._store.read_bytes(f"{prefix}/_last_checkpoint"))["version"])
            except (FileNotFoundError, KeyError, ValueError):
                return 0
            cutoff = (time.time() if now is None else now) - retention_s
            files = []  # (version, key, expired, is a checkpoint)
            for info in self._store.list(prefix):
                m = _LOG_FILE.match(info.key.rsplit("/", 1)[-1])
                if m:
                    files.append((int(m.group(1)), info.key, info.mtime.timestamp() < cutoff,
                                  ".checkpoint" in info.key))
            # keep the checkpoint that every version still inside the retention is loaded from
            young = min((v for v, key, expired, _ in files if not expired and key.endswith(".json")),
                        default=checkpoint)
            keep_from = max((v for v, _, _, ckpt in files if ckpt and v <= min(young, checkpoint)), default=0)
            doomed = [key for v, key, expired, _ in files if v < keep_from and expired]
            for key in doomed:
                self._store.delete(key)
        if doomed:
            log.info("bucket log: expired %d log file(s) before checkpoint %d", len(doomed), checkpoint)
        return len(doomed)

    def compact(self) -> None:
        """Rewrite the log's small files into a few (same rows). Call from the writer."""
        with self._lock:
            self.sync()
            base = self.version
            self._catch_up_table()  # sync reads nothing when nothing is new: the object may lag
            if self._table.version() != base:
                return  # another writer committed meanwhile: compact on a later round
            self._announce((base if base is not None else -1) + 1)
            with store_errors(self.lake):
                self._table.optimize.compact()
                self._table.update_incremental()
            self._recent = []
            if self._table.version() == (base if base is not None else -1) + 1:  # ours only: same rows
                self._seen, self.version = set(self._table.file_uris()), self._table.version()
                if self._node is not None and base is not None:  # followers swap their file list, no read
                    self._node.broadcast({"base": base, "version": self.version, "files": sorted(self._seen),
                                          "replace": True, "rows": []})
            else:  # another writer committed around the compaction: read everything again
                self._seen, self.state, self.version, self._recent = set(), BucketState(), None, []
                self.sync()
            self._publish()
