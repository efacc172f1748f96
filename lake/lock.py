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

    Raises:
        LockHeld: another process holds the lock past the timeout.
    """

    def __init__(self, lake: Lake, name: str, timeout: float = 60.0, holder: str = ""):
        self.lake, self.name, self.timeout, self.holder = lake, name, timeout, holder
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
        deadline = time.monotonic() + self.timeout
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
                time.sleep(0.05)
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
