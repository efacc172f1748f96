"""The reading half of :class:`lake.bucket_store.BucketStore`: how a process keeps its fold of the
bucket log current — the log's tail read only when it moved (one ``stat`` or HEAD when not),
commits pushed by the node's writer folded in without any read, and files that a merge or
compaction rewrote read for their new rows only.

:class:`LogReading` is a mixin of :class:`~lake.bucket_store.BucketStore`: it works on the store's
fold (``_seen``, ``state``, ``version``), its lock and its node link, and is not used on its own.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake.exceptions import TableNotFoundError

from lake.buckets import BucketState, events_from_arrow
from lake.catalog import table_spec
from lake.commit import ensure_tables
from lake.errors import ImagelakeError
from lake.remote import retry_log_gap
from lake.store import LakeStore, StoreTimeouts, arrow_filesystem, open_delta, store_errors

__all__ = ["LogReading"]


class LogReading:
    """The fold-keeping half of :class:`~lake.bucket_store.BucketStore` (see the module docstring)."""

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:
            raise ImagelakeError("a BucketStore was created before a fork; create one per process")

    def sync(self) -> BucketState:
        """Fold in every file committed since the last call. Files that a merge or compaction
        rewrote (the same rows in new files) are read for the rows not folded yet only; the fold
        starts over only when the live files hold fewer or more rows than it has (rows went away).

        When nothing was committed since (no commit file for the next version: one ``stat`` locally,
        one HEAD on an object store) the log is not read at all."""
        with self._lock:
            self._check_pid()
            if self._table is None:
                self._open()
            elif self._nothing_new():
                self._checked_at = time.monotonic()
                return self.state
            else:
                self._catch_up_table()
            self._checked_at = time.monotonic()
            self._must_sync = False
            if self._table.version() == self.version:
                return self.state
            self._check_direct()
            files = self._table.file_uris()
            rewritten = not self._seen.issubset(files)  # merged or compacted since: the same rows in other files
            if rewritten:
                self._seen.intersection_update(files)
            new = [f for f in files if f not in self._seen]
            if new:
                fs, _ = arrow_filesystem(new[0])
                with store_errors(self.lake):
                    if len(new) <= 8:
                        parts = [pq.read_table(arrow_filesystem(f)[1], filesystem=fs) for f in new]
                        table = pa.concat_tables(parts, promote_options="default")
                    else:  # a cold start: one multi-threaded dataset scan
                        table = pads.dataset([arrow_filesystem(f)[1] for f in new], filesystem=fs, format="parquet",
                                             schema=table_spec("bucket_events").schema).to_table()
                for event in events_from_arrow(table):  # already folded ones (rewritten files) are skipped
                    self.state.apply(event)
                self._seen.update(new)
            if rewritten and len(self.state.events) != self._row_count():
                self._seen, self.state, self._recent = set(), BucketState(), []  # rows went away: read all again
                self.version = None
                return self.sync()
            self.version = self._table.version()
            self._publish()
            return self.state

    def _row_count(self) -> int:
        """Rows in the table's live files (their ``add`` statistics)."""
        adds = self._table.get_add_actions(flatten=True)
        return int(pc.sum(pa.table(adds).column("num_records")).as_py() or 0)

    def _nothing_new(self) -> bool:
        """True when the fold is at the log's tail: no commit file after ``self.version``, or (a
        follower) only commits of this node's writer whose push arrives within moments."""
        if self.version is None or self._must_sync:
            return False
        for _ in range(4):
            if not self._log_has(self.version + 1):
                return True
            if not self._await_push(self.version + 1):
                return False
        return False

    def _await_push(self, version: int, timeout: float = 0.5) -> bool:
        """A follower: wait (a few ms; at most 0.5 s on a starved machine) for the node writer's push
        of ``version``, when the writer announced it (:meth:`VersionBoard.announce`), to be
        folded in by the link's reader thread, instead of reading the log for it."""
        if self._node is None or self._node.is_writer or not self._node.connected:
            return False
        announced = self._node.board.announced()
        if announced is None or announced < version:  # not the node writer's commit: no push comes
            return False
        return self._pushed.wait_for(lambda: self.version is not None and self.version >= version, timeout)

    def _catch_up_table(self) -> None:
        """Bring the DeltaTable object to the log's tail. Commits of the append path and pushes
        leave it behind: far behind, loading the table afresh (from its checkpoint) is quicker
        than replaying every commit since."""
        with store_errors(self.lake):
            if self.version is None or self._table.version() + 2 * self.checkpoint_every < self.version:
                self._table = retry_log_gap(lambda: open_delta(self.lake, "bucket_events"))
            else:
                retry_log_gap(self._table.update_incremental)

    def _open(self) -> None:
        """Open the log with the store's bounded timeouts (an unreachable store is a quick 503)."""
        try:
            self._table = retry_log_gap(lambda: open_delta(self.lake, "bucket_events"))
        except TableNotFoundError:
            ensure_tables(self.lake, ["bucket_events"])
            self._table = retry_log_gap(lambda: open_delta(self.lake, "bucket_events"))
        self._store = LakeStore(self.lake.root, timeouts=StoreTimeouts(connect_s=2.0, request_s=10.0, read_s=5.0,
                                                                       retries=2, retry_total_s=2.0))
        uri = self.lake.table_uri("bucket_events")
        self._table_key = uri[len(self._store.root) + 1:] if uri.startswith(self._store.root + "/") else ""
        self._check_direct()

    def _log_key(self, version: int) -> str:
        return f"{self._table_key}/_delta_log/{version:020d}.json"

    def _log_has(self, version: int) -> bool:
        """Is there a commit file for ``version`` (another writer committed it)?"""
        if self._store is None or not self._table_key:
            return True  # cannot tell cheaply: read the log
        if self._store.is_local:
            return os.path.exists(self._store.uri(self._log_key(version)))
        return self._store.head(self._log_key(version)) is not None

    def _announce(self, version: int) -> None:
        """Tell the node's followers (the version board) that this writer creates ``version`` next."""
        if self._node is not None and self._node.is_writer:
            self._node.board.announce(version)

    def _publish(self) -> None:
        if self._node is not None and self._node.commits_here and self.version is not None:
            self._node.board.publish(self.version)

    def _fresh(self) -> BucketState:
        """The fold, re-reading the log's tail only when it may have moved (see ``refresh_s``)."""
        if self._table is None or self._node is None or self.refresh_s <= 0:
            return self.sync()
        if not self._node.is_writer:
            published = self._node.board.read()
            if published is None or published > (self.version if self.version is not None else -1):
                return self.sync()
        if time.monotonic() - self._checked_at >= self.refresh_s:
            return self.sync()
        return self.state

    @contextmanager
    def reading(self, fresh: bool = True) -> Iterator[BucketState]:
        """``with store.reading() as state:`` — the current fold, consistent while the block runs.
        ``fresh=False`` skips the check for other processes' commits (right after our own write)."""
        with self._lock:
            yield self._fresh() if fresh or self._table is None else self.state

    def apply_pushed(self, commit: dict[str, Any]) -> bool:
        """Fold in a commit the node's writer pushed (no I/O) when it follows what this process has
        folded; otherwise leave it to the next read's re-read of the tail. True when applied."""
        with self._lock:
            if self._table is None or self.version != commit["base"]:
                return False
            for event in commit["rows"]:
                self.state.apply(event)
            if commit.get("replace"):  # a compaction: the same rows in other files
                self._seen = set(commit["files"])
            else:
                self._seen.difference_update(commit.get("removed", ()))
                self._seen.update(commit["files"])
            self.version = commit["version"]
            self._pushed.notify_all()
            return True
