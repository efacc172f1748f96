"""A process's view of the bucket log plus its group-commit writer: actions are acknowledged only
once their Delta commit has landed.

Why group commit: a Delta append is a few ms, but commits to one table must serialize (the
``bucket_events`` fcntl lock, across every server process). One writer thread per process takes
every action queued while the previous commit was in flight, validates them in order against the
state they land on, writes them as one commit, and only then wakes the waiting requests. Sixteen
concurrent curators cost a handful of commits, not sixteen queued ones.

Consistency: under the lock the writer first reads the log's tail (files committed by other
processes), so validation (bucket exists, not deleted, images in the source bucket, what undo
cancels) and ``seq`` assignment see every earlier acknowledged action: the log is serializable.
Readers share the same in-memory fold and re-read the tail on each call (a no-op check of the
Delta log when nothing changed), so a write acknowledged by one server process is visible to the
next read on any other.

Retries: an action may carry a ``client_event_id``; the same (actor, client_event_id) again is
answered with the original event and writes nothing.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import threading
import unicodedata
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake import DeltaTable, WriterProperties, write_deltalake

from lake.buckets import DISCARD, BucketState, events_from_arrow, check_bucket_id
from lake.catalog import Lake, table_spec
from lake.commit import ensure_tables, now_utc
from lake.errors import BadInput, Conflict, ImagelakeError, NotFound
from lake.lock import LakeLock
from lake.staging import filesystem_for

__all__ = ["Action", "BucketStore"]

_COLOR = r"#[0-9a-fA-F]{6}"
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass(frozen=True)
class Action:
    """One curation request, before validation. ``actor`` is the token id (``""`` with auth off)."""

    action: str
    bucket_id: str | None = None
    image_ids: tuple[str, ...] = ()
    rejected_ids: tuple[str, ...] = ()
    from_bucket: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    actor: str = ""
    actor_name: str = ""
    client_event_id: str | None = None


class BucketStore:
    """Per-process, thread-safe. Create lazily in the process that uses it (deltalake must not be
    used before a fork); ``pid`` is checked on every call.

    Args:
        lake: the lake.
        lock_timeout: seconds to wait for another process's commit before answering LockHeld (409).
        ack_timeout: seconds a request waits for its commit before giving up (the action may still land).
        max_batch: most actions per commit.
        compact_files: when the log has more data files than this, the writer rewrites them into
            a few (Delta ``optimize.compact``, same rows) right after a commit, under the lock, so
            a process starting later reads a handful of files instead of one per commit.
    """

    def __init__(self, lake: Lake, lock_timeout: float = 30.0, ack_timeout: float = 60.0, max_batch: int = 512,
                 compact_files: int = 1000):
        self.lake, self.lock_timeout, self.ack_timeout = lake, lock_timeout, ack_timeout
        self.compact_files = compact_files
        self.max_batch = max_batch  # 1 turns group commit off (the benchmark's baseline)
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._table: DeltaTable | None = None
        self._seen: set[str] = set()
        self.state = BucketState()
        self.version: int | None = None
        self._queue: queue.Queue[tuple[Action, Future]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.commits = 0

    # -- reading the log -----------------------------------------------------------------------

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:
            raise ImagelakeError("a BucketStore was created before a fork; create one per process")

    def sync(self) -> BucketState:
        """Fold in every file committed since the last call (all of them after a compaction)."""
        with self._lock:
            self._check_pid()
            if self._table is None:
                ensure_tables(self.lake, ["bucket_events"])
                self._table = DeltaTable(self.lake.table_uri("bucket_events"))
            else:
                self._table.update_incremental()
            if self._table.version() == self.version:
                return self.state
            files = self._table.file_uris()
            if not self._seen.issubset(files):  # compacted or vacuumed: start over
                self._seen, self.state = set(), BucketState()
            new = [f for f in files if f not in self._seen]
            if new:
                fs, _ = filesystem_for(new[0])
                if len(new) <= 8:
                    parts = [pq.read_table(filesystem_for(f)[1], filesystem=fs) for f in new]
                    table = pa.concat_tables(parts, promote_options="default")
                else:  # a cold start: one multi-threaded dataset scan
                    table = pads.dataset([filesystem_for(f)[1] for f in new], filesystem=fs, format="parquet",
                                         schema=table_spec("bucket_events").schema).to_table()
                for event in events_from_arrow(table):
                    self.state.apply(event)
                self._seen.update(new)
            self.version = self._table.version()
            return self.state

    @contextmanager
    def reading(self, fresh: bool = True) -> Iterator[BucketState]:
        """``with store.reading() as state:`` — the current fold, consistent while the block runs.
        ``fresh=False`` skips the check for other processes' commits (right after our own write)."""
        with self._lock:
            yield self.sync() if fresh or self._table is None else self.state

    # -- writing -------------------------------------------------------------------------------

    def submit(self, action: Action) -> dict[str, Any]:
        """Validate and commit ``action``; returns its event once it is in the table.

        Raises:
            BadInput / NotFound / Conflict: the action does not fit the state it would land on.
            LockHeld: the table stayed locked by another process past ``lock_timeout``.
        """
        self._check_pid()
        future: Future = Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="bucket-writer", daemon=True)
                self._thread.start()
        self._queue.put((action, future))
        return future.result(timeout=self.ack_timeout)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                results = self._commit(batch)
            except BaseException as e:  # the commit failed: nobody is acknowledged
                results = [e] * len(batch)
            for (_, future), result in zip(batch, results):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _commit(self, batch: list[tuple[Action, Future]]) -> list[Any]:
        with LakeLock(self.lake, "bucket_events", self.lock_timeout, holder="bucket log writer",
                      poll=(0.0005, 0.004)), self._lock:
            state = self.sync()
            results: list[Any] = []
            rows: list[dict[str, Any]] = []
            for action, _ in batch:
                try:
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
            if rows:
                try:
                    spec = table_spec("bucket_events")
                    write_deltalake(self._table, pa.Table.from_pylist(rows, schema=spec.schema), mode="append",
                                    schema_mode="merge", writer_properties=WriterProperties(compression="ZSTD"))
                except BaseException:
                    self._seen, self.state, self.version = set(), BucketState(), None  # drop the unwritten folds
                    raise
                self.commits += 1
                self._adopt_own_commit()
                if len(self._seen) > self.compact_files:
                    self.compact()
            return results

    def compact(self) -> None:
        """Rewrite the log's small files into a few (same rows). Call with the table lock held."""
        with self._lock:
            self._table.optimize.compact()
            self._table.update_incremental()
            self._seen, self.version = set(self._table.file_uris()), self._table.version()

    def _adopt_own_commit(self) -> None:
        """After our write, under the lock: the only new files are ours, already folded in."""
        before = self.version
        if self._table.version() == before:
            self._table.update_incremental()
        if self._table.version() == (before if before is not None else -1) + 1:
            self._seen.update(self._table.file_uris())
            self.version = self._table.version()
        else:
            self.sync()


def _clean_ids(ids: tuple[str, ...], what: str = "image_ids") -> list[str]:
    out = list(dict.fromkeys(ids))
    if not out:
        raise BadInput(f"{what} is empty; send at least one image id")
    return out


def _plan(state: BucketState, a: Action, seq: int) -> dict[str, Any]:
    """The event ``a`` becomes on top of ``state``. Raises BadInput, NotFound or Conflict."""
    event: dict[str, Any] = {"event_id": secrets.token_hex(16), "seq": seq, "bucket_id": a.bucket_id,
                             "action": a.action, "image_ids": None, "rejected_ids": None,
                             "from_bucket": None, "undo_of": None, "payload": None,
                             "client_event_id": a.client_event_id, "actor": a.actor,
                             "actor_name": a.actor_name, "at": now_utc()}
    kind = a.action
    if kind == "create":
        name, color = _name(a.payload.get("name")), _color(a.payload.get("color"))
        bucket_id = a.bucket_id or secrets.token_hex(8)
        if bucket_id in state.buckets:
            raise Conflict(f"bucket {bucket_id} exists already")
        color = color or _PALETTE[sum(1 for b in state.buckets.values() if not b["system"]) % len(_PALETTE)]
        return {**event, "bucket_id": bucket_id, "payload": json.dumps({"name": name, "color": color})}
    if kind == "undo":
        target = state.last_undoable(a.actor)
        if target is None:
            raise Conflict("nothing to undo: this token has no action left that is not undone")
        return {**event, "bucket_id": target["bucket_id"], "undo_of": target["event_id"]}
    if a.bucket_id == DISCARD and kind not in ("discard", "remove"):
        raise BadInput("the discard pile takes images with POST /api/v1/discard and gives them back with "
                       "DELETE /api/v1/buckets/discard/images/<image_id>")
    state.live_bucket(a.bucket_id)
    if kind == "update":
        payload = {}
        if a.payload.get("name") is not None:
            payload["name"] = _name(a.payload["name"])
        if a.payload.get("color") is not None:
            payload["color"] = _color(a.payload["color"])
        if not payload:
            raise BadInput('send {"name": ...} and/or {"color": "#rrggbb"}')
        return {**event, "payload": json.dumps(payload)}
    if kind == "delete":
        return event
    ids = _clean_ids(a.image_ids) if kind != "feedback" else list(dict.fromkeys(a.image_ids))
    members = state.members.get(a.bucket_id, {})
    if kind in ("move", "copy") or (kind == "discard" and a.from_bucket):
        source = check_bucket_id(a.from_bucket or "")
        if source == a.bucket_id:
            raise BadInput("from_bucket is the target bucket itself")
        state.live_bucket(source)
        source_members = state.members.get(source, {})
        missing = [i for i in ids if i not in source_members]
        if missing:
            raise Conflict(f"{len(missing)} of the images are not in bucket {source} (first: {missing[0]})")
        event["from_bucket"] = source
    elif kind == "remove":
        missing = [i for i in ids if i not in members]
        if missing:
            raise NotFound(f"{len(missing)} of the images are not in bucket {a.bucket_id} (first: {missing[0]})")
    elif kind == "pending":
        labeled = state.labeled(a.bucket_id)
        ids = [i for i in ids if i not in labeled]
        if not ids:
            raise Conflict("every image is labeled already; nothing to fast-forward")
    elif kind == "feedback":
        rejected = list(dict.fromkeys(a.rejected_ids))
        if not ids and not rejected:
            raise BadInput('send {"accepted": [image ids], "rejected": [image ids]} with at least one id')
        both = set(ids) & set(rejected)
        if both:
            raise BadInput(f"image {sorted(both)[0]} is both accepted and rejected")
        event["rejected_ids"] = rejected
    elif kind not in ("add", "discard"):
        raise BadInput(f"unknown action {kind!r}")
    event["image_ids"] = ids
    return event


MAX_NAME = 200
# Bidirectional formatting controls: they reorder how the text around a name is shown (a name
# could make a listing read differently from what it holds).
_BIDI = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def _name(value: Any) -> str:
    """A bucket name as stored: NFC-normalised, trimmed, 1 to 200 characters, printable.

    Names end up in every listing, export and SQL result: a NUL, a line break, a lone surrogate
    (which fails every UTF-8 conversion of the log) or a bidi override would corrupt or disguise
    them, so each is refused with the rule it breaks."""
    if not isinstance(value, str):
        raise BadInput(f"a bucket name must be a string, got {type(value).__name__}")
    for i, ch in enumerate(value):
        code = ord(ch)
        category = unicodedata.category(ch)
        if category == "Cs":
            raise BadInput(f"a bucket name must be valid Unicode: a lone surrogate U+{code:04X} at position {i}")
        if category in ("Cc", "Zl", "Zp"):
            raise BadInput(f"a bucket name must not contain control characters or line breaks "
                           f"(U+{code:04X} at position {i})")
        if code in _BIDI:
            raise BadInput(f"a bucket name must not contain bidirectional formatting characters "
                           f"(U+{code:04X} at position {i})")
    name = unicodedata.normalize("NFC", value).strip()
    if not name:
        raise BadInput("a bucket name must not be empty or only spaces")
    if len(name) > MAX_NAME:
        raise BadInput(f"a bucket name must be at most {MAX_NAME} characters; this one has {len(name)}")
    return name


def _color(value: Any) -> str | None:
    import re

    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(_COLOR, value):
        raise BadInput(f"color must look like #1f77b4, got {value!r}")
    return value.lower()
