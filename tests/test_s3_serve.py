"""Serving from an object-store lake: the same lake on local disk and on a real S3 server on
loopback (moto, its own process) answer search, a suggestion round, thumbnails and tiles alike over
real HTTP; the index is built straight into the store (`imagelake index` on the s3:// lake); the
artifacts are served from the node's verified cache; a dead store is a quick 503.

The lake's tables and its grid layout are made locally (ingest, embed, grid) and copied into the
bucket, because this test is about serving; the pipeline into ``s3://`` has its own tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from api import API_PREFIX, create_app
from jobs.grid.driver import run_grid
from jobs.index.driver import run_index
from jobs.runner import LocalRunner
from lake.catalog import Lake
from lake.commit import open_table
from lake.settings import Settings
from lake.store import LakeStore
from photo_lake import copy_lake, photo_template
from s3_server import S3Server

ROOT = Path(__file__).resolve().parents[1]
SHARDS = 700  # 2,000 vectors in 3 shards: three encode tasks, each reading its own rows from the store


def _settings(root: str, cache: Path) -> Settings:
    return Settings(lake=root, runner="local", auth=False, refresh_s=0.0, artifact_cache_dir=str(cache))


class _Server:
    """The app over real HTTP (werkzeug's threaded server on loopback)."""

    def __init__(self, settings: Settings):
        self.app = create_app(settings)
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}{API_PREFIX}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def request(self, method: str, path: str, body=None, timeout: float = 60) -> tuple[int, bytes, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def json(self, method: str, path: str, body=None, status: int = 200) -> dict:
        code, data, _ = self.request(method, path, body)
        assert code == status, (path, code, data[:500])
        return json.loads(data)

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


def _upload_tree(store: LakeStore, local_root: str, prefixes: tuple[str, ...]) -> int:
    n = 0
    for prefix in prefixes:
        for dirpath, _, files in os.walk(os.path.join(local_root, prefix)):
            for name in files:
                path = os.path.join(dirpath, name)
                store.upload(os.path.relpath(path, local_root).replace(os.sep, "/"), path)
                n += 1
    return n


@pytest.fixture(scope="module")
def lakes(tmp_path_factory):
    """(local server, s3 server, S3 server process, s3 lake root, image ids by label, index summary)."""
    template = photo_template(tmp_path_factory.getbasetemp(), 2000)[0]
    base = tmp_path_factory.mktemp("s3serve")
    local = copy_lake(template, base / "local")
    grid = run_grid(local, Settings(lake=local.root, runner="local"), seed=3)

    s3 = S3Server()  # its own server: the test stops it at the end
    old_env = {k: os.environ.get(k) for k in s3.storage_options()}
    os.environ.update(s3.storage_options())
    try:
        root = f"s3://{s3.make_bucket()}/lake"
        store = LakeStore.for_lake(root)
        # the tables and the finished tile artifact of the local lake, before any index exists
        assert _upload_tree(store, local.root, ("tables", f"artifacts/tiles/{grid['layout_id']}")) > 0

        # `imagelake index` on the s3:// lake: built in a temporary folder, placed into the store
        proc = subprocess.run(
            [sys.executable, "-m", "imagelake", "--lake", root, "--runner", "local", "index", "--shard-size",
             str(SHARDS), "--no-progress"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        s3_index = run_index(Lake.at(root), _settings(root, base / "unused"), runner=LocalRunner(), shard_size=SHARDS)
        local_index = run_index(local, Settings(lake=local.root, runner="local"), runner=LocalRunner(),
                                shard_size=SHARDS)
        assert s3_index["action"] == "up_to_date" and local_index["action"] == "full"

        local_srv = _Server(_settings(local.root, base / "cache-local"))
        s3_srv = _Server(_settings(root, base / "cache-s3"))
        ids = sorted(open_table(local, "images").to_pyarrow_table(columns=["image_id"]).column(0).to_pylist())
        assert len(ids) == 2000
        yield local_srv, s3_srv, s3, root, ids, s3_index, base
        local_srv.stop()
        s3_srv.stop()
    finally:
        s3.stop()
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_index_build_lives_in_the_store_with_its_manifest(lakes):
    _, _, _, root, _, summary, _ = lakes
    store = LakeStore.for_lake(root)
    names = {o.key.rsplit("/", 1)[-1] for o in store.list(f"artifacts/index/{summary['build_id']}")}
    assert {"manifest.json", "seqs.npy", "ids.npy", "vectors.npy", "trained.faiss",
            "shard-00000.faiss", "shard-00001.faiss", "shard-00002.faiss"} <= names
    manifest = json.loads(store.read_bytes(f"artifacts/index/{summary['build_id']}/manifest.json"))
    assert manifest["ntotal"] == 2000 and len(manifest["shards"]) == 3
    assert sum(s["ntotal"] for s in manifest["shards"]) == 2000


def test_search_answers_the_same_as_the_local_lake(lakes):
    local, s3, _, root, ids, summary, base = lakes
    for image_id in ids[:: len(ids) // 5][:5]:
        a = local.json("GET", f"/search/similar?image_id={image_id}&k=10")
        b = s3.json("GET", f"/search/similar?image_id={image_id}&k=10")
        assert [h["image_id"] for h in a["results"]] == [h["image_id"] for h in b["results"]]
        assert [round(h["score"], 5) for h in a["results"]] == [round(h["score"], 5) for h in b["results"]]
    # served from the node's verified cache: every file of the build is there, named by its sha256
    cached = {f[:-4] for _, _, files in os.walk(base / "cache-s3") for f in files if f.endswith(".bin")}
    manifest = json.loads(LakeStore.for_lake(root).read_bytes(f"artifacts/index/{summary['build_id']}/manifest.json"))
    assert {m["sha256"] for m in manifest["files"].values()} <= cached
    assert not (base / "cache-local").exists()  # a local lake maps its own files


def test_thumbnails_answer_the_same(lakes):
    local, s3, _, _, ids, _, _ = lakes
    for image_id in ids[:4]:
        for size in (64, 256):
            a = local.request("GET", f"/images/{image_id}/thumbnail?size={size}")
            b = s3.request("GET", f"/images/{image_id}/thumbnail?size={size}")
            assert a[0] == b[0] == 200 and a[1] == b[1] and a[1][:2] == b"\xff\xd8"


def test_a_suggestion_round_answers_the_same(lakes):
    local, s3, _, root, ids, _, base = lakes
    members = ids[:5]
    out = []
    for srv in (local, s3):
        bucket = srv.json("POST", "/buckets", {"name": "round"}, status=201)["bucket"]["bucket_id"]
        srv.json("POST", f"/buckets/{bucket}/images", {"image_ids": members})
        first = [s["image_id"] for s in srv.json("GET", f"/buckets/{bucket}/suggestions?n=12&explore=false")["suggestions"]]
        assert len(first) == 12 and not set(first) & set(members)
        srv.json("POST", f"/buckets/{bucket}/feedback", {"accepted": first[:1], "rejected": first[-1:]})
        assert first[0] in srv.json("GET", f"/buckets/{bucket}")["members"]
        second = [s["image_id"] for s in srv.json("GET", f"/buckets/{bucket}/suggestions?n=12&explore=false")["suggestions"]]
        assert len(second) == 12 and not {first[0], first[-1]} & set(second)
        out.append(first)
    # the same matrix on both: the s3 server built it into the store and maps its verified cache copy
    local_lake = Lake.at(base / "local")
    [local_manifest] = Path(local_lake.artifacts_dir("suggest")).rglob("manifest.json")
    store = LakeStore.for_lake(root)
    [s3_manifest] = [o.key for o in store.list("artifacts/suggest") if o.key.endswith("/manifest.json")]
    files = lambda m: {n: f["sha256"] for n, f in json.loads(m)["files"].items()}  # noqa: E731
    same = ("index.faiss", "image_ids.bin")  # pca.npz is a zip: its bytes carry the time it was written
    assert [files(local_manifest.read_bytes())[n] for n in same] == [files(store.read_bytes(s3_manifest))[n] for n in same]
    cached = {f[:-4] for _, _, names in os.walk(base / "cache-s3") for f in names if f.endswith(".bin")}
    assert set(files(store.read_bytes(s3_manifest)).values()) <= cached
    # random negatives are seeded by the bucket id, which differs: most of the ranking is the same
    assert len(set(out[0]) & set(out[1])) >= 6, out


def test_tiles_answer_the_same(lakes):
    local, s3, _, _, _, _, _ = lakes
    a, b = local.json("GET", "/grid/latest"), s3.json("GET", "/grid/latest")
    assert a["layout"]["layout_id"] == b["layout"]["layout_id"] and a["dzi"] == b["dzi"]
    lid, top = a["layout"]["layout_id"], a["dzi"]["max_level"]
    for z in (0, 5, top - 1, top):  # pre-rendered overview levels and deep levels drawn from the pack
        la, lb = local.request("GET", f"/grid/{lid}/tiles/{z}/0_0.jpg"), s3.request("GET", f"/grid/{lid}/tiles/{z}/0_0.jpg")
        assert la[0] == lb[0] == 200 and la[1] == lb[1], z
    cell = local.json("GET", f"/grid/{lid}/cell?x=0&y=0")
    assert s3.json("GET", f"/grid/{lid}/cell?x=0&y=0") == cell


def test_an_ivfpq_rebuild_into_the_store_is_picked_up(lakes):
    _, s3, _, root, ids, first, _ = lakes
    summary = run_index(Lake.at(root), _settings(root, Path("unused")), runner=LocalRunner(), rebuild=True,
                        flat_below=0, shard_size=SHARDS)
    assert summary["action"] == "full" and summary["factory"].startswith("IVF")
    health = s3.json("GET", "/health")
    assert health["builds"]["index"]["build_id"] == summary["build_id"], health["builds"]["index"]
    hits = s3.json("GET", f"/search/similar?image_id={ids[3]}&k=10")["results"]
    assert len(hits) == 10 and ids[3] not in {h["image_id"] for h in hits}


def test_a_dead_store_is_a_quick_503(lakes):
    _, s3, server, _, ids, _, _ = lakes
    server.stop()
    for path in (f"/images/{ids[7]}", f"/images/{ids[9]}/thumbnail?size=64", "/images?limit=5"):
        t0 = time.monotonic()
        code, body, headers = s3.request("GET", path, timeout=60)
        took = time.monotonic() - t0
        data = json.loads(body)
        assert code == 503, (path, code, body[:300])
        assert set(data) == {"ok", "error", "status"} and data["status"] == 503
        assert "object store" in data["error"] and "s3://" not in data["error"]
        print(f"{path}: 503 in {took:.2f} s")
        assert took < 20  # bounded (about 1-2 s idle); a hang would be minutes
