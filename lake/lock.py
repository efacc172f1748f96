"""Lake-wide locks, so that overlapping runs and concurrent commits never interleave.

Local lakes use ``fcntl`` locks on files under ``<lake>/_locks``: the kernel drops them when a
process dies, so a ``kill -9`` never leaves a stale lock. Object-store lakes have no such primitive:
there a single scheduler must own the lake (and deltalake's own locking provider guards commits).
"""

from __future__ import annotations

import fcntl
import os
import time

from lake.catalog import Lake
from lake.errors import LockHeld

__all__ = ["LakeLock"]


class LakeLock:
    """``with LakeLock(lake, "commit"):`` — blocks up to ``timeout`` s; ``timeout=0`` fails at once.

    While waiting it re-tries after ``poll[0]`` seconds, doubling up to ``poll[1]``: the default
    50 ms suits jobs; a lock held for a few ms per commit (the bucket log) wants (0.0005, 0.004),
    or the poll would be most of a curator's latency when server processes take turns.

    Raises:
        LockHeld: another process holds the lock past the timeout.
    """

    def __init__(self, lake: Lake, name: str, timeout: float = 60.0, holder: str = "",
                 poll: tuple[float, float] = (0.05, 0.05)):
        self.lake, self.name, self.timeout, self.holder = lake, name, timeout, holder
        self.poll = poll
        self._fd: int | None = None
        self._depth = 0

    def __enter__(self) -> "LakeLock":
        if self._depth:
            self._depth += 1
            return self
        if not self.lake.is_local:
            self._depth = 1
            return self
        os.makedirs(self.lake.locks_dir(), exist_ok=True)
        path = os.path.join(self.lake.locks_dir(), f"{self.name}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline, pause = time.monotonic() + self.timeout, self.poll[0]
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    try:
                        who = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    finally:
                        os.close(fd)
                    raise LockHeld(
                        f"the lake's {self.name!r} lock is held by {who}; "
                        "wait for that run to finish (or let the scheduler skip this one)") from None
                time.sleep(pause)
                pause = min(pause * 2, self.poll[1])
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} {self.holder}".strip().encode(), 0)
        self._fd = fd
        self._depth = 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth or self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None
