"""Leases (lake.lease) on local disk and on a real S3 server, with real competing processes.

Processes are started with ``spawn``, never ``fork`` (deltalake's and obstore's runtimes do not
survive a fork); they reach the S3 server through the environment the fixture sets, as separate
machines would.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time

import pytest

from lake.catalog import Lake
from lake.errors import LockHeld
from lake.lease import Lease, LeaseRecord
from lake.lock import LakeLock
from lake.store import LakeStore, StoreUnavailable
from s3_server import lake_root, s3_lake, s3_server  # noqa: F401  (fixtures)

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def store(lake_root) -> LakeStore:
    return LakeStore.for_lake(Lake.at(lake_root))


# -- child processes (module level, so that spawn can import them) -------------------------------

def _race(root: str, key: str, rounds: int, start, after, results) -> None:
    store = LakeStore.for_lake(root)
    for r in range(rounds):
        lease = Lease(store, f"{key}-{r}", owner=f"racer {os.getpid()}")
        start.wait(120)
        won = lease.try_acquire()
        results.put((r, os.getpid(), won))
        after.wait(120)  # the winner holds until every racer has tried
        if won:
            lease.release()


def _hold_forever(root: str, key: str, ttl: float, ready) -> None:
    lease = Lease(LakeStore.for_lake(root), key, owner="doomed holder", ttl_s=ttl)
    lease.acquire(timeout=30)
    ready.set()
    time.sleep(600)


def _hold_lake_lock(root: str, name: str, ttl: float, ready, go) -> None:
    with LakeLock(Lake.at(root), name, timeout=0, holder="imagelake run", ttl_s=ttl):
        ready.set()
        go.wait(120)


# -- tests ------------------------------------------------------------------------------------

def test_racing_processes_exactly_one_wins(lake_root):
    racers, rounds = 3, 4
    start, after, results = SPAWN.Barrier(racers), SPAWN.Barrier(racers), SPAWN.Queue()
    procs = [SPAWN.Process(target=_race, args=(lake_root, "_locks/race", rounds, start, after, results))
             for _ in range(racers)]
    for p in procs:
        p.start()
    got = [results.get(timeout=180) for _ in range(racers * rounds)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for r in range(rounds):
        assert sum(won for rr, _, won in got if rr == r) == 1, got
    store = LakeStore.for_lake(lake_root)
    assert all(LeaseRecord.parse(store.read_bytes(f"_locks/race-{r}")).state == "released" for r in range(rounds))


def test_lease_held_excludes_then_release_frees(store):
    a = Lease(store, "_locks/x.lease", owner="job a")
    b = Lease(store, "_locks/x.lease", owner="job b")
    a.acquire(timeout=0)
    started = time.monotonic()
    with pytest.raises(LockHeld, match=r"held by pid \d+ on .* job a \(lease until"):
        b.acquire(timeout=0.5, poll=(0.05, 0.1))
    assert 0.4 < time.monotonic() - started < 5
    record = LeaseRecord.parse(store.read_bytes("_locks/x.lease"))
    assert (record.owner, record.pid, record.state, record.token) == ("job a", os.getpid(), "held", a.token)
    assert a.release() is True
    assert b.try_acquire() is True
    assert LeaseRecord.parse(store.read_bytes("_locks/x.lease")).owner == "job b"
    b.release()


def test_renewal_keeps_a_short_lease_alive(store):
    a = Lease(store, "_locks/r.lease", owner="long job", ttl_s=0.9, skew_s=0.0)
    a.acquire(timeout=0)
    time.sleep(2.5)  # almost three ttls: renewed about every 0.3 s
    b = Lease(store, "_locks/r.lease", owner="other", skew_s=0.0)
    assert b.try_acquire() is False
    a.check()
    assert LeaseRecord.parse(store.read_bytes("_locks/r.lease")).expires_at > time.time()
    a.release()
    assert b.try_acquire() is True
    b.release()


def test_expired_lease_is_taken_over_and_the_stale_holder_is_fenced(store, caplog):
    stale = Lease(store, "_locks/e.lease", owner="stalled job", ttl_s=0.5, skew_s=0.0, renew=False)
    stale.acquire(timeout=0)
    fresh = Lease(store, "_locks/e.lease", owner="next job", ttl_s=30, skew_s=0.0)
    assert fresh.try_acquire() is False
    time.sleep(0.7)
    with caplog.at_level(logging.WARNING, logger="lake.lease"):
        assert fresh.try_acquire() is True
    assert "took over the expired lease _locks/e.lease from pid" in caplog.text
    assert "stalled job" in caplog.text

    # the stalled holder wakes up: it can neither renew nor release the new holder's lease
    assert stale.renew() is False and stale.lost
    with pytest.raises(LockHeld, match="no longer held"):
        stale.check()
    assert stale.release() is False
    record = LeaseRecord.parse(store.read_bytes("_locks/e.lease"))
    assert (record.owner, record.token, record.state) == ("next job", fresh.token, "held")
    fresh.check()
    assert fresh.release() is True


def test_stale_holder_release_after_takeover_does_not_free_it(store):
    """Even without a renew first: release is conditional on the holder's own version."""
    stale = Lease(store, "_locks/s.lease", owner="old", ttl_s=0.3, skew_s=0.0, renew=False)
    stale.acquire(timeout=0)
    time.sleep(0.5)
    fresh = Lease(store, "_locks/s.lease", owner="new", skew_s=0.0)
    fresh.acquire(timeout=0)
    assert stale.release() is False
    third = Lease(store, "_locks/s.lease", owner="third")
    assert third.try_acquire() is False and third.last_seen.owner == "new"
    fresh.release()


def test_dead_holder_lease_is_taken_over_after_expiry(lake_root, caplog):
    ready = SPAWN.Event()
    child = SPAWN.Process(target=_hold_forever, args=(lake_root, "_locks/dead.lease", 1.5, ready))
    child.start()
    try:
        assert ready.wait(120)
        store = LakeStore.for_lake(lake_root)
        mine = Lease(store, "_locks/dead.lease", owner="survivor", skew_s=0.5)
        assert mine.try_acquire() is False and mine.last_seen.pid == child.pid
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="lake.lease"):
            mine.acquire(timeout=15, poll=(0.1, 0.3))
        assert time.monotonic() - started < 4  # at most ttl + skew + a poll
        assert f"pid {child.pid}" in caplog.text and "doomed holder" in caplog.text
        assert json.loads(store.read_bytes("_locks/dead.lease"))["owner"] == "survivor"
        mine.release()
    finally:
        if child.is_alive():
            child.kill()
            child.join()


def test_garbage_in_the_lease_object_is_taken_over(store, caplog):
    store.write_bytes("_locks/g.lease", b"not json")
    lease = Lease(store, "_locks/g.lease", owner="me")
    with caplog.at_level(logging.WARNING, logger="lake.lease"):
        assert lease.try_acquire() is True
    assert "holds no valid lease record" in caplog.text
    lease.release()


# -- LakeLock on an object-store lake ------------------------------------------------------------

def _start_holder(root: str, name: str, ttl: float = 30.0):
    ready, go = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=_hold_lake_lock, args=(root, name, ttl, ready, go))
    child.start()
    assert ready.wait(120), "the holder process did not take the lock"
    return child, go


def test_lake_lock_on_s3_excludes_a_second_process(s3_lake):
    lake = Lake.at(s3_lake)
    child, go = _start_holder(s3_lake, "pipeline")
    try:
        with pytest.raises(LockHeld, match=rf"the lake's 'pipeline' lock is held by pid {child.pid} on .* "
                                           r"imagelake run \(lease until .*\); wait for that run"):
            with LakeLock(lake, "pipeline", timeout=0, holder="second run"):
                pytest.fail("two processes held the pipeline lock at once")
        record = LeaseRecord.parse(LakeStore.for_lake(lake).read_bytes("_locks/pipeline.lease"))
        assert (record.pid, record.state) == (child.pid, "held")

        # a blocking acquire waits for the holder to let go
        started = time.monotonic()
        go.set()
        with LakeLock(lake, "pipeline", timeout=30, holder="second run") as lock:
            waited = time.monotonic() - started
            lock.check()
            record = LeaseRecord.parse(LakeStore.for_lake(lake).read_bytes("_locks/pipeline.lease"))
            assert (record.pid, record.owner, record.state) == (os.getpid(), "second run", "held")
        assert waited < 10
        assert LeaseRecord.parse(LakeStore.for_lake(lake).read_bytes("_locks/pipeline.lease")).state == "released"
    finally:
        go.set()
        child.join(60)
    assert child.exitcode == 0


def test_lake_lock_on_s3_is_reentrant_and_per_name(s3_lake):
    lake = Lake.at(s3_lake)
    lock = LakeLock(lake, "commit", timeout=0)
    with lock:
        with lock:
            with LakeLock(lake, "ingest", timeout=0):  # another name is another lease
                pass
        with pytest.raises(LockHeld):
            with LakeLock(lake, "commit", timeout=0):
                pass
    with LakeLock(lake, "commit", timeout=0):
        pass


def test_lake_lock_of_a_killed_holder_is_taken_over(s3_lake, caplog):
    child, _ = _start_holder(s3_lake, "tag-model", ttl=1.5)
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lake.lease"):
        with LakeLock(Lake.at(s3_lake), "tag-model", timeout=20, holder="after the crash"):
            pass
    assert time.monotonic() - started < 6
    assert f"took over the expired lease _locks/tag-model.lease from pid {child.pid}" in caplog.text


def test_lake_lock_on_an_unreachable_store_fails_fast(s3_lake, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="is unreachable"):
        with LakeLock(Lake.at(s3_lake), "pipeline", timeout=0):
            pass
    assert time.monotonic() - started < 5


def test_local_lake_lock_stays_a_kernel_lock(tmp_path):
    """Local lakes keep fcntl (the kernel frees it when a holder dies; no requests): while held,
    the lock file is flock-ed and no lease object exists."""
    import fcntl

    lake = Lake.at(tmp_path / "lake")
    with LakeLock(lake, "bucket_events", timeout=1, holder="writer", poll=(0.0005, 0.004)):
        path = tmp_path / "lake" / "_locks" / "bucket_events.lock"
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert path.read_text() == f"pid {os.getpid()} writer"
    assert sorted(p.name for p in (tmp_path / "lake" / "_locks").iterdir()) == ["bucket_events.lock"]
