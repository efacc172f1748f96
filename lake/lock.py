"""Lake-wide locks, so that overlapping runs and concurrent commits never interleave.

Two implementations behind one interface, chosen by where the lake lives:

* **Local lakes**: ``fcntl`` locks on files under ``<lake>/_locks``. One machine's kernel is the
  coordinator: it drops a lock when its process dies (a ``kill -9`` never leaves a stale lock) and
  takes a free lock in microseconds, which the bucket log's per-write lock needs.
* **Object-store lakes** (``s3://``, ``gs://``, ``az://``): a lease object ``_locks/<name>.lease``
  in the lake itself, written with conditional puts (:mod:`lake.lease`), so processes on machines
  that share nothing but the store exclude each other. A crashed holder's lease expires after
  ``ttl_s`` (30 s) and the next acquirer takes it over with a log line. ``fcntl`` plays no part
  there: it would only exclude processes on the same machine.
"""

from __future__ import annotations

import fcntl
import os
import time

from lake.catalog import Lake
from lake.errors import LockHeld

__all__ = ["LakeLock", "LEASE_TTL_S"]

LEASE_TTL_S = 30.0
# Each try on an object store is a request; polling faster than this only loads the store.
_REMOTE_POLL_FLOOR = (0.01, 0.05)


class LakeLock:
    """``with LakeLock(lake, "commit"):`` — blocks up to ``timeout`` s; ``timeout=0`` fails at once.

    While waiting it re-tries after ``poll[0]`` seconds, doubling up to ``poll[1]``: the default
    50 ms suits jobs; a lock held for a few ms per commit (the bucket log) wants (0.0005, 0.004),
    or the poll would be most of a curator's latency when server processes take turns (on an
    object store the poll is at least 10 ms, doubling to at least 50 ms).

    Re-entrant per object: nested ``with`` on the same ``LakeLock`` holds it once.

    ``shared=True`` (local lakes) takes the lock shared: any number of shared holders at once, while
    an exclusive holder (the default) excludes them all and waits for them. The bucket log's writers
    hold it shared from writing a data file to committing it (they are ordered by Delta versions,
    not by this lock), so the janitor's exclusive sweep waits for every writer, but a writer stuck
    mid-commit does not block another. On object stores ``shared`` is ignored (a lease is exclusive).

    Raises:
        LockHeld: another process holds the lock past the timeout.
        StoreUnavailable: (object stores) the store cannot be reached to take the lease.
    """

    def __init__(self, lake: Lake, name: str, timeout: float = 60.0, holder: str = "",
                 poll: tuple[float, float] = (0.05, 0.05), ttl_s: float = LEASE_TTL_S, shared: bool = False):
        self.lake, self.name, self.timeout, self.holder = lake, name, timeout, holder
        self.shared = shared
        self.poll, self.ttl_s = poll, ttl_s
        self._fd: int | None = None
        self._lease = None
        self._depth = 0

    def __enter__(self) -> "LakeLock":
        if self._depth:
            self._depth += 1
            return self
        if self.lake.is_local:
            self._lock_local()
        else:
            self._lock_remote()
        self._depth = 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth:
            return
        if self._lease is not None:
            lease, self._lease = self._lease, None
            lease.release()
            return
        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def check(self) -> None:
        """Raise :class:`LockHeld` if this lock's lease was lost while held (a holder that stalled
        past its expiry); a no-op for local locks, which the kernel cannot take away."""
        if self._lease is not None:
            self._lease.check()

    def _held_message(self, who: str) -> str:
        return (f"the lake's {self.name!r} lock is held by {who}; "
                "wait for that run to finish (or let the scheduler skip this one)")

    def _lock_remote(self) -> None:
        from lake.lease import Lease
        from lake.store import LakeStore

        lease = Lease(LakeStore.for_lake(self.lake), f"_locks/{self.name}.lease", owner=self.holder,
                      ttl_s=self.ttl_s)
        poll = (max(self.poll[0], _REMOTE_POLL_FLOOR[0]), max(self.poll[1], _REMOTE_POLL_FLOOR[1]))
        try:
            lease.acquire(self.timeout, poll)
        except LockHeld:
            who = lease.last_seen.describe() if lease.last_seen else "another process"
            raise LockHeld(self._held_message(who)) from None
        self._lease = lease

    def _lock_local(self) -> None:
        os.makedirs(self.lake.locks_dir(), exist_ok=True)
        path = os.path.join(self.lake.locks_dir(), f"{self.name}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline, pause = time.monotonic() + self.timeout, self.poll[0]
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    try:
                        who = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    finally:
                        os.close(fd)
                    raise LockHeld(self._held_message(who)) from None
                time.sleep(pause)
                pause = min(pause * 2, self.poll[1])
        holder = f"pid {os.getpid()} {self.holder}".strip().encode()
        if os.pread(fd, len(holder) + 1, 0) != holder:  # a writer locking many times a second: no rewrite
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder, 0)
        self._fd = fd
