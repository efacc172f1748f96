"""A process's view of the bucket log plus its group-commit writer: actions are acknowledged only
once their Delta commit has landed.

Why group commit: a Delta append is a few ms, but commits to one table serialize. One writer
thread takes every action queued while the previous commit was in flight, validates them in order
against the state they land on, writes them as one commit, and only then wakes the waiting
requests. Sixteen concurrent curators cost a handful of commits, not sixteen queued ones. In the
server there is one such writer per node, not per process: the gunicorn workers elect one of
themselves and hand it their actions over a local socket (:mod:`lake.bucket_writer`).

Ordering (why ``seq`` is dense and never duplicated, on local disk and object stores alike): the
writer reads the log's tail (version ``V``), plans the batch on that state (validation — bucket
exists, not deleted, images in the source bucket, what undo cancels — and ``seq`` from
``last_seq + 1``), and commits it as exactly version ``V + 1`` (deltalake with no commit retries:
the commit file is created with put-if-absent, ``If-None-Match`` on S3). If another writer (another
node) took ``V + 1`` first, the commit fails, the planned events are dropped from the fold, the
tail is re-read and the batch is planned again on the new state. So every batch was validated
against the state it lands on and the log is serializable without any lock. On a local lake the
writer also holds the ``bucket_events`` fcntl lock from writing its data file to the commit, which
the janitor's sweep of orphaned files waits on (it costs microseconds with one writer per node).

Retries: every action carries an ``event_id`` chosen before it is sent (a re-sent action after a
writer crash is recognised and answered with the committed event), and may carry a
``client_event_id``; the same (actor, client_event_id) again is answered with the original event
and writes nothing.

Validation and planning of one action live in :mod:`lake.bucket_plan`, the writer's counters in
:mod:`lake.bucket_stats`, how the fold is kept current in :mod:`lake.bucket_read`, how a batch is committed (the append path) and the upkeep after it in
:mod:`lake.bucket_append`.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from contextlib import nullcontext
from typing import Any

from deltalake import DeltaTable

from lake.buckets import BucketState
from lake.catalog import Lake
from lake.errors import ImagelakeError, Unavailable
from lake.store import LakeStore

from lake.bucket_plan import MAX_NAME, Action, _plan  # noqa: F401  (Action, MAX_NAME, _plan re-exported)
from lake.bucket_append import AppendPath, retry_log_gap
from lake.bucket_read import LogReading
from lake.bucket_stats import WriterStats  # noqa: F401  (WriterStats re-exported)

__all__ = ["Action", "BucketStore", "WriterStats", "retry_log_gap"]

log = logging.getLogger(__name__)


class BucketStore(LogReading, AppendPath):
    """Per-process, thread-safe. Create lazily in the process that uses it (deltalake must not be
    used before a fork); ``pid`` is checked on every call.

    Args:
        lake: the lake.
        lock_timeout: seconds to wait for another process's commit before answering LockHeld (409).
        ack_timeout: seconds a request waits for its commit before giving up (the action may still land).
        max_batch: most actions per commit.
        compact_files: when the log has more data files than this, the writer rewrites them into
            a few (Delta ``optimize.compact``, same rows) right after a commit, so a process
            starting later reads a handful of files instead of one per commit.
        node_writer: hand actions to the node's elected writer process over a local socket
            (:mod:`lake.bucket_writer`; what the server does) instead of committing them here.
        max_replans: commits lost to another writer (another node) in a row before giving up (503).
        writer_hung_s: with ``node_writer``, a follower whose node writer has sent nothing (no answer,
            no push) for this long while an action waited commits that action, and its next ones,
            itself (ordered by Delta versions like a second node) until the writer answers again.
        refresh_s: with ``node_writer``, how often a read re-checks the Delta log for commits made
            elsewhere (other nodes); commits of this node's writer are seen at once (its version
            board). Without ``node_writer`` every read checks the log.
        direct_append: commit a batch by writing its Parquet file and the next Delta commit file
            ourselves (see "The append path" below); False commits through ``write_deltalake``
            (the benchmark's baseline; also used whenever the table needs more than a plain append).
        checkpoint_every: with ``direct_append``, the writer writes a Delta checkpoint after this
            many of its commits (deltalake's own interval), so readers replay a short log.
        merge_files: with ``direct_append``, the writer rewrites the files it appended into one
            once there are this many (one commit, same rows; older files are left alone), so the
            table keeps few files at a cost of milliseconds; ``compact_files`` stays the bound on
            all files (a full ``optimize.compact``).
        log_expiry_every_s: with ``direct_append``, after a checkpoint, at most this often, the
            writer deletes log files past the table's ``delta.logRetentionDuration`` that precede
            the latest checkpoint (:meth:`expire_logs`), as deltalake's post-commit cleanup would.

    The append path (how a batch is committed without ``write_deltalake``, and when it applies) is
    described in :mod:`lake.bucket_append`.
    """

    def __init__(self, lake: Lake, lock_timeout: float = 30.0, ack_timeout: float = 60.0, max_batch: int = 512,
                 compact_files: int = 1000, node_writer: bool = False, max_replans: int = 100,
                 refresh_s: float = 0.0, direct_append: bool = True, checkpoint_every: int = 100,
                 merge_files: int = 64, log_expiry_every_s: float = 600.0, writer_hung_s: float = 5.0):
        self.lake, self.lock_timeout, self.ack_timeout = lake, lock_timeout, ack_timeout
        self.max_replans = max_replans
        self.replans = 0  # commits lost to another writer and planned again
        self.refresh_s = refresh_s
        self._checked_at = float("-inf")
        self._node = None
        if node_writer:
            from lake.bucket_writer import NodeLink

            self._node = NodeLink(self, hung_s=writer_hung_s)
        self.compact_files = compact_files
        self.direct_append, self.checkpoint_every = direct_append, checkpoint_every
        self._direct = False  # the table allows the append path (checked on every new metadata)
        self._store: LakeStore | None = None
        self._table_key = ""
        self._must_sync = True
        self._checkpointed: int | None = None
        self._upkeep_running = False  # a checkpoint thread runs (lake.bucket_append); guarded by _idle
        self._ckpt_table: DeltaTable | None = None
        self.merge_files = merge_files
        self.log_expiry_every_s, self._expired_at = log_expiry_every_s, float("-inf")
        self._recent: list[tuple[str, int, list[dict[str, Any]]]] = []  # (name, size, rows) appended since the last merge
        self.max_batch = max_batch  # 1 turns group commit off (the benchmark's baseline)
        self._lock = threading.RLock()
        self._pushed = threading.Condition(self._lock)  # notified when a pushed commit was folded in
        self._pid = os.getpid()
        self._table: DeltaTable | None = None
        self._seen: set[str] = set()
        self.state = BucketState()
        self.version: int | None = None
        self._queue: queue.Queue[tuple[Action, Future]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._inflight = 0  # queued or being committed; guarded by _idle
        self._idle = threading.Condition(threading.Lock())
        self._closed = False
        self._stop_registered = False
        self.commits = 0
        self.stats = WriterStats()

    # -- writing -------------------------------------------------------------------------------

    @property
    def is_writer(self) -> bool:
        """True when this process commits (always without a node link)."""
        return self._node is None or self._node.is_writer

    def submit(self, action: Action) -> dict[str, Any]:
        """Validate and commit ``action``; returns its event once it is in the table (and in this
        process's fold: the caller's next read sees it).

        Raises:
            BadInput / NotFound / Conflict: the action does not fit the state it would land on.
            LockHeld: (local lakes) the table stayed locked past ``lock_timeout`` (the janitor).
            Unavailable: the commit kept failing, or no writer answered within ``ack_timeout``.
        """
        self._check_pid()
        action = action.with_event_id()
        if self._node is not None:
            return self._node.submit(action, self.ack_timeout)
        return wait_for(self.enqueue(action), self.ack_timeout)

    def enqueue(self, action: Action) -> Future:
        """Queue ``action`` (with its ``event_id``) for this process's writer thread; the future
        gets the event (or the action's error) once the batch it is in has committed."""
        self._check_pid()
        future: Future = Future()
        with self._idle:  # not self._lock: that is held through a commit, and queueing must not wait
            if self._closed:
                raise Unavailable("this process's bucket log writer has shut down; retry (another process "
                                  "takes the writes)")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="bucket-writer", daemon=True)
                self._thread.start()
                if not self._stop_registered:
                    atexit.register(_close_at_exit, weakref.ref(self))
                    self._stop_registered = True
            self._inflight += 1
            self._queue.put((action.with_event_id(), future, time.perf_counter()))
        return future

    def committed(self, event_id: str, replayed: bool = False) -> dict[str, Any]:
        """The committed event ``event_id`` from this process's fold (re-read if not there yet)."""
        with self._lock:
            event = self.state.by_id.get(event_id) or self.sync().by_id.get(event_id)
        if event is None:
            raise Unavailable(f"event {event_id} was acknowledged but is not in bucket_events yet; retry the read")
        return {**event, "replayed": True} if replayed else event

    def _run(self) -> None:
        dirty = False
        while True:
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:  # idle: publish the counters of the last batches
                if dirty and self._node is not None and self._node.is_writer:
                    self._node.board.publish_stats(self.stats.snapshot())
                dirty = False
                continue
            if first is None:  # close(): every queued action was committed first
                return
            batch = [first]
            started = time.perf_counter()
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            self.stats.picked(started, [t for _, _, t in batch])
            with self._node.batch() if self._node is not None else nullcontext():
                try:
                    results = self._commit([a for a, _, _ in batch])
                except BaseException as e:  # the commit failed: nobody is acknowledged
                    if isinstance(e, ImagelakeError):  # a clear one-line reason (e.g. the store is unreachable)
                        log.warning("bucket log commit failed: %s", e)
                    else:
                        log.exception("bucket log commit failed")
                    if not isinstance(e, ImagelakeError):
                        e = Unavailable(f"the bucket log commit failed ({type(e).__name__}); retry with the same "
                                        "client_event_id")
                    results = [e] * len(batch)
                for (_, future, _), result in zip(batch, results):
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
            self.stats.done(started)
            if self._queue.empty() or self.stats.counts["batches"] % 8 == 0:
                self._maintain()
            dirty = True
            if self._node is not None and self._node.is_writer and self.stats.due():
                self._node.board.publish_stats(self.stats.snapshot())
                dirty = False
            with self._idle:
                self._inflight -= len(batch)
                self._idle.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until every queued action has been committed (or refused); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    def close(self, timeout: float = 10.0) -> bool:
        """Commit what is queued, then stop the writer thread and refuse new actions (at exit,
        before pyarrow's S3 client is torn down: a commit running into interpreter shutdown
        crashes the process). True when everything queued was committed in time."""
        if os.getpid() != self._pid:  # a forked child: the queue and thread are the parent's
            return True
        with self._idle:
            self._closed = True
            thread = self._thread
        drained = self.drain(timeout)
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(max(0.1, timeout if drained else 1.0))
        return drained

    def _commit(self, batch: list[Action]) -> list[Any]:
        """Plan ``batch`` on the latest state and commit it as the next Delta version; when another
        writer took that version, drop the plan, re-read and plan again."""
        clock = self.stats.clock()
        for attempt in range(self.max_replans + 1):
            with self._writing(), self._lock:
                clock("lock")
                # Check the tail first (one stat or HEAD when nothing changed): planning on the
                # fold as it is would also be correct (a commit from elsewhere makes ours fail and
                # we re-plan), but each lost commit costs a data file written for nothing.
                state = self.sync()
                clock("sync")
                results, rows = self._plan_batch(state, batch)
                clock("plan")
                if not rows:
                    return results
                base = self.version
                try:
                    added = self._append_direct(rows, base) if self._direct else self._append_deltalake(rows, base)
                except BaseException:
                    self._seen, self.state, self.version, self._recent = set(), BucketState(), None, []  # drop the unwritten folds
                    raise
                clock("commit")
                if added is None:  # another writer took the version: plan again on the new state
                    self._drop_planned(rows)
                    self._must_sync = True
                    self.replans += 1
                    self.stats.count("replans")
                    log.info("bucket log: version %s was taken by another writer; planning %d action(s) again",
                             base + 1, len(batch))
                    continue
                self.commits += 1
                self.stats.committed(len(rows))
                self._adopt_own_commit(base, rows, added)
                clock("adopt")
                return results
        raise Unavailable(f"the bucket log commit lost to other writers {self.max_replans + 1} times in a row; retry")

    def _plan_batch(self, state: BucketState, batch: list[Action]) -> tuple[list[Any], list[dict[str, Any]]]:
        """Each action's event (folded into ``state``) or error, and the rows to commit."""
        results: list[Any] = []
        rows: list[dict[str, Any]] = []
        for action in batch:
            try:
                if action.event_id in state.by_id:  # re-sent after a writer crash: it landed
                    results.append(state.by_id[action.event_id])
                    continue
                known = action.client_event_id and state.client_ids.get((action.actor, action.client_event_id))
                if known:
                    results.append({**state.by_id[known], "replayed": True})
                    continue
                event = _plan(state, action, state.last_seq + 1)
                state.apply(event)
                rows.append(event)
                results.append(event)
            except ImagelakeError as e:
                results.append(e)
        return results, rows

    def _drop_planned(self, rows: list[dict[str, Any]]) -> None:
        """Forget events folded in for a commit that did not land (re-fold the rest, no I/O)."""
        planned = {r["event_id"] for r in rows}
        state = BucketState()
        for event in self.state.events:
            if event["event_id"] not in planned:
                state.apply(event)
        self.state = state

    def _adopt_own_commit(self, base: int, rows: list[dict[str, Any]], added: list[str]) -> None:
        """After our write at exactly the next version: the only new files are ours, already folded
        in. The node's followers get the commit pushed (rows and files) before anyone is answered."""
        self._seen.update(added)
        self.version = base + 1
        if self._node is not None:  # pushed first: a follower that sees the board ahead waits for it
            self._node.broadcast({"base": base, "version": self.version, "files": added, "rows": rows})
        self._publish()


def _close_at_exit(ref: "weakref.ref[BucketStore]") -> None:
    store = ref()
    if store is not None:
        if store._node is not None:  # hang up on this node's followers first: they elect another writer
            store._node.retire()
        store.close()


def wait_for(future: Future, timeout: float) -> dict[str, Any]:
    """The future's event, or Unavailable (503) when its commit did not land within ``timeout``."""
    from concurrent.futures import TimeoutError as FutureTimeout

    try:
        return future.result(timeout=max(0.0, timeout))
    except FutureTimeout:
        raise Unavailable(f"the bucket log commit did not land within {timeout:.0f} s (the action may still "
                          "land); retry with the same client_event_id") from None
