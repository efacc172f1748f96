"""Per-process state for the API: deltalake's runtime (and DuckDB connections, thread pools, memory
maps) must be created in the worker process that uses them, never before gunicorn forks.

Two shapes, one rule:

* :class:`PerProcess` — a value built by ``factory()`` on first use in each process (the bucket
  store, the suggester, the grid layout store): a forked child quietly builds its own.
* :class:`ProcessOwner` — for an object that opens its resources lazily itself (the lake reader,
  the search service): ``owns()`` says whether this process already opened them, and refuses
  (``ImagelakeError``) when another process did, because the object was used before a fork and
  its handles are not safe here.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Generic, TypeVar

from lake.errors import ImagelakeError

__all__ = ["PerProcess", "ProcessOwner"]

T = TypeVar("T")


class PerProcess(Generic[T]):
    """``factory()`` once per process, on first :meth:`get` (thread-safe)."""

    def __init__(self, factory: Callable[[], T]):
        self.factory = factory
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._value: T | None = None

    def get(self) -> T:
        with self._lock:
            if self._pid != os.getpid():
                self._value, self._pid = self.factory(), os.getpid()
            return self._value


class ProcessOwner:
    """Which process opened an object's resources. The caller holds its own lock around
    ``owns()`` … ``claim()``, so a failed open is retried by the next call."""

    def __init__(self, what: str):
        self.what = what
        self.pid: int | None = None

    def owns(self) -> bool:
        """True when this process opened the resources; False when nobody has (open them, then
        :meth:`claim`).

        Raises:
            ImagelakeError: another process opened them, i.e. the object was used before a fork.
        """
        if self.pid == os.getpid():
            return True
        if self.pid is not None:
            raise ImagelakeError(
                f"{self.what} was used before the server forked its workers, and deltalake cannot run in "
                "a forked child after that; build the app in each worker (no gunicorn --preload) or "
                "make no request before forking")
        return False

    def claim(self) -> None:
        self.pid = os.getpid()

    def release(self) -> bool:
        """Forget the owner (after closing); True when this process was it."""
        mine = self.pid == os.getpid()
        self.pid = None
        return mine
