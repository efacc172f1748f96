"""Leases: mutual exclusion between machines that share nothing but the lake's store.

A lease is one small JSON object in the lake (``_locks/<name>.lease``)::

    {"owner": "imagelake run", "host": "node-3", "pid": 4711, "token": "<uuid>",
     "acquired_at": 1767225600.0, "expires_at": 1767225630.0, "state": "held"}

Every change is a conditional write, so the store itself decides races:

* **acquire**: create the object if absent (``If-None-Match``); or, if the lease found there is
  released or expired, replace exactly that version (``If-Match: <its etag>``). Of two processes
  racing for the same free lease exactly one write succeeds. Taking over an *expired* lease (its
  holder died or stalled) logs a warning naming the old holder.
* **renew**: a background thread rewrites the lease with a later ``expires_at`` every ``ttl/3``
  seconds, conditional on the etag of its own last write. If that fails the lease was taken
  over: the holder marks itself :attr:`Lease.lost` and logs an error (:meth:`Lease.check` raises).
* **release**: a conditional write of a ``released`` record over our own version. Not a DELETE:
  S3's DELETE is unconditional, so a holder whose lease had expired and been taken over could
  delete the new holder's lease. A released record is free for the next acquirer.

Expiry compares ``expires_at`` with the reader's wall clock, so nodes' clocks must agree to within
``skew_s`` (NTP does far better); a lease is taken over only ``skew_s`` after it expired.

The store must enforce conditional puts (AWS S3, MinIO, R2, GCS, Azure, and local disks do); a
store configured with ``AWS_S3_ALLOW_UNSAFE_RENAME`` for lack of them cannot host leases.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from lake.errors import LockHeld, NotFound
from lake.store import LakeStore, StoreUnavailable

__all__ = ["Lease", "LeaseRecord"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    host: str
    pid: int
    token: str
    acquired_at: float
    expires_at: float
    state: str = "held"

    @classmethod
    def parse(cls, data: bytes) -> "LeaseRecord | None":
        """``None`` for bytes that are not a lease (treated as free, with a warning)."""
        try:
            d = json.loads(data)
            return cls(str(d["owner"]), str(d["host"]), int(d["pid"]), str(d["token"]),
                       float(d["acquired_at"]), float(d["expires_at"]), str(d.get("state", "held")))
        except (ValueError, KeyError, TypeError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    def describe(self) -> str:
        until = time.strftime("%H:%M:%SZ", time.gmtime(self.expires_at))
        return f"pid {self.pid} on {self.host} {self.owner}".rstrip() + f" (lease until {until})"


class Lease:
    """``lease = Lease(store, "_locks/pipeline.lease", owner="imagelake run"); lease.acquire(timeout=0)``
    ... ``lease.release()`` (or ``with Lease(...):``, which tries once).

    One holder per object; not re-entrant (``LakeLock`` counts nesting). Reusable after release.

    Args:
        ttl_s: how long a lease lasts without renewal: how long a crashed holder blocks others.
        skew_s: extra wait after expiry before a take-over (clock differences between nodes).
        renew: run the background renewal thread while held (off only in tests of expiry).
    """

    def __init__(self, store: LakeStore, key: str, owner: str = "", ttl_s: float = 30.0,
                 skew_s: float = 2.0, renew: bool = True):
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.store, self.key, self.owner = store, key, owner
        self.ttl_s, self.skew_s, self.renew_in_background = ttl_s, skew_s, renew
        self.token = ""
        self.lost = False
        self.last_seen: LeaseRecord | None = None  # the other holder, after a failed try
        self._etag: str | None = None
        self._record: LeaseRecord | None = None
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._etag is not None and not self.lost

    # -- acquire -------------------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """One attempt (two requests when the lease is free): ``True`` when the lease is now ours."""
        if self._etag is not None:
            raise RuntimeError(f"lease {self.key} is already held by this object")
        now = time.time()
        record = self._new_record(now)
        try:
            current, etag = self.store.read(self.key)
        except NotFound:
            new = self.store.put_if_absent(self.key, record.to_bytes())
            return self._won(new, record)
        seen = LeaseRecord.parse(current)
        if seen is None:
            log.warning("lease %s holds no valid lease record; taking it over", self.key)
        elif seen.state == "held" and seen.expires_at + self.skew_s > now:
            self.last_seen = seen
            return False
        new = self.store.put_if_match(self.key, record.to_bytes(), etag)
        if new and seen is not None and seen.state == "held":
            log.warning("took over the expired lease %s from %s, expired %.1f s ago",
                        self.key, seen.describe(), now - seen.expires_at)
        return self._won(new, record)

    def acquire(self, timeout: float, poll: tuple[float, float] = (0.05, 1.0)) -> None:
        """Try until ``timeout`` seconds have passed (``0``: once), waiting ``poll[0]`` doubling to
        ``poll[1]`` between tries (with jitter, so waiters do not retry in lockstep).

        Raises:
            LockHeld: someone else holds the lease past the timeout.
        """
        deadline, pause = time.monotonic() + timeout, poll[0]
        while not self.try_acquire():
            left = deadline - time.monotonic()
            if left <= 0:
                who = self.last_seen.describe() if self.last_seen else "another process"
                raise LockHeld(f"the lease {self.key} is held by {who}")
            time.sleep(min(left, pause * random.uniform(0.5, 1.0)))
            pause = min(pause * 2, poll[1])

    def _new_record(self, now: float) -> LeaseRecord:
        self.token = uuid.uuid4().hex  # new per acquisition: a record names one tenure
        return LeaseRecord(self.owner, socket.gethostname(), os.getpid(), self.token, now, now + self.ttl_s)

    def _won(self, etag: str | None, record: LeaseRecord) -> bool:
        if not etag:
            return False
        self._etag, self._record, self.lost, self.last_seen = etag, record, False, None
        if self.renew_in_background:
            self._stop.clear()
            self._thread = threading.Thread(target=self._renew_loop, name=f"lease-renew {self.key}", daemon=True)
            self._thread.start()
        return True

    # -- while held ----------------------------------------------------------------------------

    def renew(self) -> bool:
        """Push ``expires_at`` to now + ttl; ``False`` (and :attr:`lost`) if someone else took it."""
        with self._mu:
            if self._etag is None or self.lost:
                return False
            now = time.time()
            record = LeaseRecord(self.owner, self._record.host, self._record.pid, self.token,
                                 self._record.acquired_at, now + self.ttl_s)
            new = self.store.put_if_match(self.key, record.to_bytes(), self._etag)
            if not new:
                self.lost = True
                log.error("lost the lease %s: another process took it over (this holder stalled past "
                          "its expiry); work done under it may overlap with the new holder's", self.key)
                return False
            self._etag, self._record = new, record
            return True

    def check(self) -> None:
        """Raise :class:`LockHeld` unless the lease is still ours (fencing before a critical write)."""
        if not self.held or self._record is None or time.time() >= self._record.expires_at:
            raise LockHeld(f"the lease {self.key} is no longer held by this process")

    def _renew_loop(self) -> None:
        interval = self.ttl_s / 3
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    return
            except StoreUnavailable as e:  # keep trying: the lease stays valid until it expires
                log.warning("could not renew the lease %s: %s", self.key, e)
                with self._mu:
                    if self._record is not None and time.time() >= self._record.expires_at:
                        self.lost = True
                        log.error("the lease %s expired while the store was unreachable", self.key)
                        return

    # -- release -------------------------------------------------------------------------------

    def release(self) -> bool:
        """Give the lease back; ``False`` when it had already been lost to another holder."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        with self._mu:
            etag, record = self._etag, self._record
            self._etag = self._record = None
            if etag is None or self.lost or record is None:
                return False
            done = LeaseRecord(record.owner, record.host, record.pid, record.token, record.acquired_at,
                               time.time(), state="released")
            if self.store.put_if_match(self.key, done.to_bytes(), etag):
                return True
            self.lost = True
            log.warning("the lease %s had been taken over before it was released", self.key)
            return False

    def __enter__(self) -> "Lease":
        if not self.held:
            self.acquire(0)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

