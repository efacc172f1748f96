"""lake.store against a local folder and a real S3 server on loopback (moto, in its own process)."""

from __future__ import annotations

import socket
import threading
import time

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from lake.catalog import Lake
from lake.errors import BadInput, NotFound
from lake.store import LakeStore, StoreTimeouts, StoreUnavailable
from s3_server import S3Server, lake_root, s3_lake, s3_server  # noqa: F401  (fixtures)


@pytest.fixture
def store(lake_root) -> LakeStore:
    return LakeStore.for_lake(Lake.at(lake_root))


def test_round_trip_overwrite_and_head(store):
    etag = store.write_bytes("artifacts/a/one.bin", b"first")
    assert store.read("artifacts/a/one.bin") == (b"first", etag)
    info = store.head("artifacts/a/one.bin")
    assert (info.key, info.size, info.etag) == ("artifacts/a/one.bin", 5, etag)
    assert abs(info.mtime.timestamp() - time.time()) < 120

    etag2 = store.write_bytes("artifacts/a/one.bin", b"second!")
    assert etag2 != etag
    assert store.read_bytes("artifacts/a/one.bin") == b"second!"
    assert store.head("artifacts/a/one.bin").size == 7
    assert store.head("artifacts/a/none.bin") is None and not store.exists("artifacts/a/none.bin")
    with pytest.raises(NotFound, match="no object 'artifacts/a/none.bin'"):
        store.read_bytes("artifacts/a/none.bin")


def test_conditional_writes(store):
    etag = store.put_if_absent("_locks/x.lease", b"mine")
    assert etag
    assert store.put_if_absent("_locks/x.lease", b"yours") is None
    assert store.read_bytes("_locks/x.lease") == b"mine"

    new = store.put_if_match("_locks/x.lease", b"mine, renewed", etag)
    assert new and new != etag
    assert store.put_if_match("_locks/x.lease", b"stale writer", etag) is None
    assert store.read("_locks/x.lease") == (b"mine, renewed", new)
    assert store.put_if_match("_locks/gone.lease", b"x", new) is None
    assert not store.exists("_locks/gone.lease")


def test_list_and_delete(store):
    for key in ("t/b/2.bin", "t/a/1.bin", "t/a/sub/3.bin", "other/4.bin"):
        store.write_bytes(key, key.encode())
    assert [o.key for o in store.list("t")] == ["t/a/1.bin", "t/a/sub/3.bin", "t/b/2.bin"]
    assert [o.key for o in store.list("t/a/")] == ["t/a/1.bin", "t/a/sub/3.bin"]
    assert {o.key: o.size for o in store.list()} == {
        "other/4.bin": 11, "t/a/1.bin": 9, "t/a/sub/3.bin": 13, "t/b/2.bin": 9}
    assert store.list("nothing/here") == []
    assert store.delete("t/a/1.bin") is True
    assert store.delete("t/a/1.bin") is False
    assert [o.key for o in store.list("t")] == ["t/a/sub/3.bin", "t/b/2.bin"]


def test_upload_download(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    store.upload("artifacts/big.bin", src)
    info = store.download("artifacts/big.bin", tmp_path / "cache" / "big.bin")
    assert (tmp_path / "cache" / "big.bin").read_bytes() == src.read_bytes()
    assert info.size == 1 << 20 and info.etag == store.head("artifacts/big.bin").etag


def test_compare_and_swap_is_atomic_under_contention(store):
    """8 threads increment one counter by read + put_if_match: no increment is lost."""
    store.write_bytes("counter", b"0")
    wins = []

    def bump():
        done = 0
        while done < 6:
            data, etag = store.read("counter")
            if store.put_if_match("counter", str(int(data) + 1).encode(), etag):
                done += 1
        wins.append(done)

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(wins) == 48
    assert store.read_bytes("counter") == b"48"


def test_local_write_leaves_no_temporary_files(tmp_path):
    store = LakeStore(str(tmp_path))
    store.write_bytes("a/x", b"1")
    store.put_if_absent("a/x", b"2")
    store.put_if_match("a/x", b"3", store.head("a/x").etag)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x"]
    assert LakeStore(f"file://{tmp_path}").read_bytes("a/x") == b"3"


def test_bad_keys_and_schemes(tmp_path):
    store = LakeStore(str(tmp_path))
    for key in ("", "/abs", "a/../b", "a//b"):
        with pytest.raises(BadInput, match="bad object key"):
            store.write_bytes(key, b"x")
    with pytest.raises(BadInput, match="ftp:// is not supported"):
        LakeStore("ftp://host/lake")


def test_deltalake_and_store_share_one_configuration(s3_lake):
    """The environment that points deltalake at the endpoint points the store there too."""
    lake = Lake.at(s3_lake)
    write_deltalake(lake.table_uri("tokens"), pa.table({"token_id": ["a", "b"]}))
    store = LakeStore.for_lake(lake)
    log = [o.key for o in store.list("tables/tokens/_delta_log")]
    assert log == ["tables/tokens/_delta_log/00000000000000000000.json"]
    store.write_bytes("artifacts/note.txt", b"hello")
    assert DeltaTable(lake.table_uri("tokens")).to_pyarrow_table().num_rows == 2
    assert LakeStore.for_lake(lake) is store


def test_a_server_reading_files_follows_a_changed_endpoint(s3_server, monkeypatch):
    """The reader's pyarrow client is cached per configuration, the endpoint taken from the
    environment included: pointed at a second server, it reads there, not from the first."""
    from lake.store import arrow_filesystem

    other = S3Server()
    try:
        for server, body in ((s3_server, b"first"), (other, b"second")):
            for k, v in server.storage_options().items():
                monkeypatch.setenv(k, v)
            bucket = server.make_bucket()
            LakeStore(f"s3://{bucket}").write_bytes("f.txt", body)
            fs, path = arrow_filesystem(f"s3://{bucket}/f.txt")
            with fs.open_input_file(path) as f:
                assert f.read() == body
    finally:
        other.stop()


# -- faults: one clear line, quickly -----------------------------------------------------------

def _opts(s3_server, **over):
    return {**s3_server.storage_options(), **over}


def test_missing_bucket(s3_server):
    store = LakeStore("s3://no-such-bucket-here/lake", _opts(s3_server))
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="the bucket does not exist") as e:
        store.read_bytes("x")
    assert time.monotonic() - started < 5
    assert "\n" not in str(e.value) and e.value.status == 503


def test_unreachable_endpoint(s3_server):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = LakeStore("s3://bucket/lake", _opts(s3_server, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}"))
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"is unreachable \(write x: connection refused\)") as e:
        store.write_bytes("x", b"1")
    assert time.monotonic() - started < 5
    assert f"127.0.0.1:{port}" in str(e.value) and "\n" not in str(e.value)


def test_stalled_endpoint_times_out(s3_server):
    """A server that accepts connections and never answers: the call ends at the timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        store = LakeStore("s3://bucket/lake", _opts(s3_server, AWS_ENDPOINT_URL=f"http://127.0.0.1:{silent.getsockname()[1]}"),
                          StoreTimeouts(request_s=1.0, read_s=1.0, retries=1, retry_total_s=2.0))
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="timed out"):
            store.head("x")
        assert time.monotonic() - started < 6


def test_wrong_credentials():
    server = S3Server(auth=True)  # checks signatures; no IAM user exists, so every key is wrong
    try:
        store = LakeStore("s3://bucket/lake", server.storage_options())
        with pytest.raises(StoreUnavailable, match="refused the credentials") as e:
            store.read_bytes("x")
        assert "AWS_ACCESS_KEY_ID" in str(e.value) and "\n" not in str(e.value)
    finally:
        server.stop()


def test_a_forked_child_gets_an_error_not_a_hang(s3_lake):
    """obstore's runtime does not survive fork: the child's first call must fail at once."""
    import os
    import signal
    import warnings

    store = LakeStore.for_lake(s3_lake)
    store.write_bytes("x", b"1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pid = os.fork()
    if pid == 0:  # the child: exit 7 on the expected error, 1 otherwise; never return into pytest
        code = 1
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest-timeout's Python-level handler
        signal.alarm(20)  # a hang ends the child (killed by SIGALRM) instead of the test run
        try:
            LakeStore.for_lake(s3_lake).read_bytes("x")
        except StoreUnavailable as e:
            code = 7 if "does not survive a fork" in str(e) else 1
        finally:
            os._exit(code)
    started = time.monotonic()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7
    assert time.monotonic() - started < 10
