"""lake.artifact_cache against a real S3 server on loopback (moto, its own process) and a local lake."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from lake.artifact_cache import ArtifactCache
from lake.catalog import Lake
from lake.errors import CorruptArtifact, NotFound
from lake.store import LakeStore
from s3_server import s3_lake, s3_server  # noqa: F401  (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _put(store: LakeStore, key: str, data: bytes) -> str:
    store.write_bytes(key, data)
    return hashlib.sha256(data).hexdigest()


def test_fetch_verify_and_hit(s3_lake, tmp_path):
    store = LakeStore.for_lake(Lake.at(s3_lake))
    data = os.urandom(300_000)
    sha = _put(store, "artifacts/index/b1/vectors.npy", data)
    cache = ArtifactCache(tmp_path / "cache", max_bytes=10 << 20)
    path = cache.path(store, "artifacts/index/b1/vectors.npy", sha256=sha, size=len(data))
    assert path.startswith(str(tmp_path / "cache")) and open(path, "rb").read() == data
    assert (cache.fetched, cache.hits) == (1, 0)
    # a second call is served from the cache: no download
    assert cache.path(store, "artifacts/index/b1/vectors.npy", sha256=sha, size=len(data)) == path
    assert (cache.fetched, cache.hits) == (1, 1)
    # content-addressed: the same bytes under another key are the same entry
    store.write_bytes("artifacts/index/b2/vectors.npy", data)
    assert cache.path(store, "artifacts/index/b2/vectors.npy", sha256=sha) == path and cache.fetched == 1
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]
    with pytest.raises(NotFound):
        cache.path(store, "artifacts/index/none.npy", sha256="0" * 64)


def test_corrupted_object_is_refused_and_nothing_cached(s3_lake, tmp_path):
    store = LakeStore.for_lake(Lake.at(s3_lake))
    good = b"the bytes the manifest describes" * 1000
    sha = hashlib.sha256(good).hexdigest()
    store.write_bytes("artifacts/x/shard-00000.faiss", good[:-1] + b"!")  # one byte changed
    cache = ArtifactCache(tmp_path / "cache", max_bytes=10 << 20)
    with pytest.raises(CorruptArtifact, match=r"artifacts/x/shard-00000.faiss .*does not match the sha256"):
        cache.path(store, "artifacts/x/shard-00000.faiss", sha256=sha, size=len(good))
    store.write_bytes("artifacts/x/shard-00000.faiss", good[:100])  # truncated
    with pytest.raises(CorruptArtifact, match="has 100 bytes, its manifest says"):
        cache.path(store, "artifacts/x/shard-00000.faiss", sha256=sha, size=len(good))
    assert cache.entries() == [] and cache.fetched == 0
    leftovers = [f for _, _, files in os.walk(tmp_path / "cache") for f in files if not f.endswith(".lock")]
    assert leftovers == []
    # once the object is repaired, it is fetched
    store.write_bytes("artifacts/x/shard-00000.faiss", good)
    assert open(cache.path(store, "artifacts/x/shard-00000.faiss", sha256=sha, size=len(good)), "rb").read() == good


def test_lru_eviction_keeps_the_bound(s3_lake, tmp_path):
    store = LakeStore.for_lake(Lake.at(s3_lake))
    cache = ArtifactCache(tmp_path / "cache", max_bytes=250_000, min_age_s=0)
    paths = []
    for i in range(4):
        data = bytes([i]) * 100_000
        sha = _put(store, f"artifacts/a/{i}.bin", data)
        paths.append(cache.path(store, f"artifacts/a/{i}.bin", sha256=sha))
        os.utime(paths[-1], (time.time() - 100 + i, time.time() - 100 + i))  # distinct LRU order
        if i == 1:  # use entry 0 again: entry 1 becomes the least recently used
            cache.path(store, "artifacts/a/0.bin", sha256=hashlib.sha256(bytes([0]) * 100_000).hexdigest())
            os.utime(paths[0], (time.time() - 50, time.time() - 50))
    left = {p for p, _, _ in cache.entries()}
    assert cache.size() <= 250_000
    assert paths[3] in left and paths[0] in left and paths[1] not in left


def test_recently_used_entries_are_not_evicted(s3_lake, tmp_path):
    store = LakeStore.for_lake(Lake.at(s3_lake))
    cache = ArtifactCache(tmp_path / "cache", max_bytes=150_000, min_age_s=600)
    for i in range(3):
        data = bytes([i]) * 100_000
        cache.path(store, f"artifacts/b/{i}.bin", sha256=_put(store, f"artifacts/b/{i}.bin", data))
    assert len(cache.entries()) == 3  # all in use just now: kept over the bound (and a warning logged)


def test_local_lake_bypasses_the_cache(tmp_path):
    lake = Lake.at(tmp_path / "lake")
    store = LakeStore.for_lake(lake)
    sha = _put(store, "artifacts/index/b/seqs.npy", b"abc")
    cache = ArtifactCache(tmp_path / "cache")
    assert cache.path(store, "artifacts/index/b/seqs.npy", sha256=sha) == f"{lake.root}/artifacts/index/b/seqs.npy"
    assert not (tmp_path / "cache").exists()


_CHILD = """
import json, sys, time
from lake.artifact_cache import ArtifactCache
from lake.store import LakeStore
root, key, sha, size, folder, start = sys.argv[1:7]
store = LakeStore(root)
cache = ArtifactCache(folder, max_bytes=1 << 30)
while time.time() < float(start):
    time.sleep(0.005)
path = cache.path(store, key, sha256=sha, size=int(size))
print(json.dumps({"path": path, "fetched": cache.fetched, "hits": cache.hits}))
"""


def test_two_processes_fetch_one_entry_once(s3_lake, tmp_path):
    store = LakeStore.for_lake(Lake.at(s3_lake))
    data = os.urandom(24 << 20)
    sha = _put(store, "artifacts/index/big/vectors.npy", data)
    folder = str(tmp_path / "shared-cache")
    start = str(time.time() + 2.0)  # both children start the fetch at the same moment
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, s3_lake, "artifacts/index/big/vectors.npy", sha,
                               str(len(data)), folder, start], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["path"] == results[1]["path"]
    assert sorted(r["fetched"] for r in results) == [0, 1]   # one downloaded, the other waited and used it
    with open(results[0]["path"], "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == sha
    assert len(ArtifactCache(folder).entries()) == 1
