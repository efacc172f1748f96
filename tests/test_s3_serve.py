"""Serving from an object-store lake: the same lake on local disk and on a real S3 server on
loopback (moto, its own process) answer search, a suggestion round, thumbnails and tiles alike over
real HTTP; the suggestion matrix and the index are built straight into the store (`imagelake run
--steps quality,suggest,index` on the s3:// lake), then served, by `imagelake serve` too; the
artifacts are served from the node's verified cache; a dead store is a quick 503.

The `run` and the `serve` are configured by a settings file alone (``[imagelake.storage_options]``
with the endpoint and the *names* of the credential variables; no ``AWS_*`` variable in their
environment), as a node of a cluster would be; the test process itself reaches the store through
the ``AWS_*`` variables. (Every step of `run` then `serve` on a small lake, settings only:
tests/test_storage_options.py.)

The lake's tables are made locally (ingest, embed) and copied into the bucket, because this test is
about serving (the pipeline into ``s3://`` has its own tests); the grid job then runs on each lake
with the same seed (on the s3 lake it writes its tiles into the store).
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
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
        return _request(self.url, method, path, body, timeout)

    def json(self, method: str, path: str, body=None, status: int = 200) -> dict:
        return _json(self.url, method, path, body, status)

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


def _request(url: str, method: str, path: str, body=None, timeout: float = 60) -> tuple[int, bytes, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _json(url: str, method: str, path: str, body=None, status: int = 200) -> dict:
    code, data, _ = _request(url, method, path, body)
    assert code == status, (path, code, data[:500])
    return json.loads(data)


def _settings_only_node(work: Path, root: str, endpoint: str, **env: str) -> dict[str, str]:
    """A node configured by ``work/imagelake.toml`` alone: the lake, and ``storage_options`` with the
    endpoint and the names of the credential variables. Returns its environment: no ``AWS_*``
    variable, the credentials in ``LAKE_KEY`` / ``LAKE_SECRET``."""
    options = {"endpoint": endpoint, "allow_http": True, "region": "us-east-1",
               "access_key_id_env": "LAKE_KEY", "secret_access_key_env": "LAKE_SECRET"}
    work.mkdir(parents=True, exist_ok=True)
    (work / "imagelake.toml").write_text(
        f'[imagelake]\nlake = "{root}"\nrunner = "local"\nauth = false\n\n[imagelake.storage_options]\n'
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in options.items()))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "IMAGELAKE_STORAGE_OPTIONS"}
    return {**clean, "PYTHONPATH": str(ROOT), "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": "127.0.0.1", "LAKE_KEY": "testing", "LAKE_SECRET": "testing", **env}


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
    run_grid(local, Settings(lake=local.root, runner="local"), seed=3)

    s3 = S3Server()  # its own server: the test stops it at the end
    old_env = {k: os.environ.get(k) for k in s3.storage_options()}
    os.environ.update(s3.storage_options())
    try:
        root = f"s3://{s3.make_bucket()}/lake"
        store = LakeStore.for_lake(root)
        # the ingested and embedded tables, before any grid or index exists, and the verified ONNX
        # export the embed made (what POST /images embeds an upload with)
        assert _upload_tree(store, template.root, ("tables", "artifacts/models")) > 0
        run_grid(Lake.at(root), Settings(lake=root, runner="local"), seed=3)

        # `imagelake run` on the s3:// lake from a node configured by a settings file alone (the
        # steps after embed that serving reads: the suggestion matrix and the index, built in a
        # temporary folder and placed into the store); the tests below then serve it, `imagelake
        # serve` included
        node = _settings_only_node(base / "node", root, s3.endpoint, IMAGELAKE_INDEX_SHARD_SIZE=str(SHARDS),
                                   IMAGELAKE_ARTIFACT_CACHE_DIR=str(base / "cache-run"))
        proc = subprocess.run([sys.executable, "-m", "imagelake", "run", "--steps", "quality,suggest,index",
                               "--no-progress"], cwd=base / "node", env=node, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert re.search(r"quality 2000 rows out.*suggest .*index 2000 rows out", proc.stdout), proc.stdout
        assert LakeStore.for_lake(root).list("artifacts/suggest"), "the run placed no suggestion matrix"
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
    # the same matrix on both: the run built it into the store, the s3 server maps its verified cache copy
    local_lake = Lake.at(base / "local")
    [local_manifest] = Path(local_lake.artifacts_dir("suggest")).rglob("manifest.json")
    store = LakeStore.for_lake(root)
    [s3_manifest] = [o.key for o in store.list("artifacts/suggest") if o.key.endswith("/manifest.json")]
    files = lambda m: {n: f["sha256"] for n, f in json.loads(m)["files"].items()}  # noqa: E731
    same = ("index.faiss", "image_ids.bin")  # pca.npz is a zip: its bytes carry the time it was written
    assert [files(local_manifest.read_bytes())[n] for n in same] == [files(store.read_bytes(s3_manifest))[n] for n in same]
    cached = {f[:-4] for _, _, names in os.walk(base / "cache-s3") for f in names if f.endswith(".bin")}
    assert set(files(store.read_bytes(s3_manifest)).values()) <= cached
    # the two rounds' buckets have different ids, which seed the random negatives; with the same
    # labels (same bucket id and log position) the two servers' suggesters answer exactly alike
    from api.suggester import BucketLabels

    labels = BucketLabels("same-bucket", members + out[0][:1], out[0][-1:], [], frozenset(members + out[0]), 1.0, 42)
    answers = [srv.app.extensions["imagelake.suggest"].get().suggest(labels, 12, explore=False)["suggestions"]
               for srv in (local, s3)]
    assert [(h["image_id"], round(h["score"], 5)) for h in answers[0]] == \
        [(h["image_id"], round(h["score"], 5)) for h in answers[1]]


def test_tiles_answer_the_same(lakes):
    local, s3, _, _, _, _, _ = lakes
    a, b = local.json("GET", "/grid/latest"), s3.json("GET", "/grid/latest")  # two runs: two layout ids
    la_id, lb_id, top = a["layout"]["layout_id"], b["layout"]["layout_id"], a["dzi"]["max_level"]
    assert {k: v for k, v in a["dzi"].items() if k not in ("url", "tiles")} == \
        {k: v for k, v in b["dzi"].items() if k not in ("url", "tiles")}
    for z in (0, 5, top - 1, top):  # pre-rendered overview levels and deep levels drawn from the pack
        ta = local.request("GET", f"/grid/{la_id}/tiles/{z}/0_0.jpg")
        tb = s3.request("GET", f"/grid/{lb_id}/tiles/{z}/0_0.jpg")
        assert ta[0] == tb[0] == 200 and ta[1] == tb[1], z
    for x, y in ((0, 0), (3, 2)):
        ca = local.json("GET", f"/grid/{la_id}/cell?x={x}&y={y}")
        cb = s3.json("GET", f"/grid/{lb_id}/cell?x={x}&y={y}")
        assert ca["image_id"] == cb["image_id"]


def test_imagelake_serve_with_two_workers_on_the_s3_lake(lakes, tmp_path):
    """A real gunicorn (`imagelake serve`, 2 worker processes sharing one artifact cache), configured
    by the settings file alone (no AWS_* variable): search and thumbnails the same as the local
    lake's. (Suggestions, bucket writes, undo and tiles through `imagelake serve` configured this
    way: tests/test_storage_options.py.)"""
    local, _, s3, root, ids, _, base = lakes
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cache = tmp_path / "gunicorn-cache"
    env = _settings_only_node(base / "node", root, s3.endpoint, IMAGELAKE_ARTIFACT_CACHE_DIR=str(cache))
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "imagelake", "serve", "--port", str(port), "--workers", "2"],
                                cwd=base / "node", env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}{API_PREFIX}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        for image_id in ids[100:106]:  # several requests: both workers answer, from one shared cache
            got = [h["image_id"] for h in _json(url, "GET", f"/search/similar?image_id={image_id}&k=5")["results"]]
            assert got == [h["image_id"] for h in local.json("GET", f"/search/similar?image_id={image_id}&k=5")["results"]]
        assert _request(url, "GET", f"/images/{ids[100]}/thumbnail?size=64")[1] == \
            local.request("GET", f"/images/{ids[100]}/thumbnail?size=64")[1]
        entries = [f for _, _, files in os.walk(cache) for f in files if f.endswith(".bin")]
        assert entries  # (a worker's warm-up may still be fetching more: its .tmp files are its own)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log, log[-3000:]


def test_ivfpq_and_incremental_builds_into_the_store_are_picked_up(lakes):
    """A full IVF-PQ build without 100 images, then those images back: an incremental build that
    reads its base (manifest, seqs, trained index) from the store. Both served without a restart."""
    from deltalake import DeltaTable, write_deltalake

    _, s3, _, root, ids, _, _ = lakes
    lake, settings = Lake.at(root), _settings(root, Path("unused"))
    from lake.catalog import TABLES

    schema = TABLES["features"].schema
    features = DeltaTable(lake.table_uri("features"))
    held_back = features.to_pyarrow_table(filters=[("image_id", "in", ids[:100])]).cast(schema)
    assert held_back.num_rows == 100
    # an overwrite, not DeltaTable.delete: deltalake's DML writes Parquet whose Arrow schema says
    # string_view, which pyarrow dataset filters on image_id (POST /images below) cannot compare
    kept = features.to_pyarrow_table(filters=[("image_id", "not in", ids[:100])]).cast(schema)
    write_deltalake(lake.table_uri("features"), kept, mode="overwrite")
    store = LakeStore.for_lake(root)
    store.write_bytes("artifacts/index/crashed-build/seqs.npy", b"a build that never got its manifest")
    full = run_index(lake, settings, runner=LocalRunner(), rebuild=True, flat_below=0, shard_size=SHARDS)
    assert full["action"] == "full" and full["factory"].startswith("IVF") and full["ntotal"] == 1900
    assert s3.json("GET", "/health")["builds"]["index"]["build_id"] == full["build_id"]
    write_deltalake(lake.table_uri("features"), held_back, mode="append")
    delta = run_index(lake, settings, runner=LocalRunner(), flat_below=0, shard_size=SHARDS)
    assert delta["action"] == "incremental" and delta["ntotal"] == 2000, delta
    health = s3.json("GET", "/health")["builds"]["index"]
    assert health["build_id"] == delta["build_id"] and health["kind"] == "incremental"
    hits = s3.json("GET", f"/search/similar?image_id={ids[3]}&k=10")["results"]  # an image of the delta
    assert len(hits) == 10 and ids[3] not in {h["image_id"] for h in hits}
    names = {o.key.split("/")[2] for o in store.list("artifacts/index")}
    assert {full["build_id"], delta["build_id"]} <= names and "crashed-build" not in names  # pruned


def test_suggestions_after_new_features_use_the_stored_matrix_plus_the_overlay(lakes):
    """The test above moved the s3 lake's features version past the matrix `run` built. A server
    maps that build from its cache plus the upload overlay's vectors in the store, and no request
    builds a matrix (before, the first request after an embed rebuilt it under the suggest-build
    lease). Uploads into an object-store lake are refused, so the overlay object is put here the
    way POST /images writes one on a local lake: a new image id with the vector of ids[0]."""
    import hashlib

    import numpy as np

    from api.suggest_overlay import served_matrix
    from api.upload_overlay import overlay_dir
    from lake.artifact_cache import ArtifactCache
    from lake.store import open_delta
    from lake.vectors import default_model_key, load_embeddings

    _, s3, _, root, ids, _, base = lakes
    lake, store, dims = Lake.at(root), LakeStore.for_lake(root), Settings().suggest_dims
    built = lambda: sorted(o.key for o in store.list("artifacts/suggest") if o.key.endswith("/manifest.json"))  # noqa: E731
    [manifest] = built()
    version = open_delta(lake, "features").version()
    build_version = json.loads(store.read_bytes(manifest))["features_version"]
    assert build_version < version
    model = default_model_key(lake)
    emb = load_embeddings(lake, model)
    vector = emb.normalized()[emb.image_ids.index(ids[0])]
    new_id = hashlib.sha256(b"an upload the matrix does not hold").hexdigest()
    folder = overlay_dir(lake, model)[len(root) + 1:]
    buf = io.BytesIO()
    np.save(buf, vector.astype(np.float32))
    store.write_bytes(f"{folder}/{10**9:012d}-{new_id}.npy", buf.getvalue())

    cache = ArtifactCache(base / "cache-overlay")
    m = served_matrix(lake, dims, cache=cache)
    assert m.features_version == build_version and len(m) == 2001 and m.ids.image_id(2000) == new_id
    assert list(m.ids.rows_of([new_id, ids[0]])) == [m.ids.rows_of([ids[0]])[0], 2000]
    np.testing.assert_allclose(m.index.reconstruct_batch(np.array([2000]))[0],
                               m.index.reconstruct_batch(m.ids.rows_of([ids[0]]))[0], atol=0.05)
    # over HTTP: the server re-checks (as after an upload) and answers a round from that matrix
    s3.app.extensions["imagelake.suggest"].get().refresh_soon()
    bucket = s3.json("POST", "/buckets", {"name": "after embed"}, status=201)["bucket"]["bucket_id"]
    s3.json("POST", f"/buckets/{bucket}/images", {"image_ids": [ids[0]]})
    got = [h["image_id"] for h in s3.json("GET", f"/buckets/{bucket}/suggestions?n=12&explore=false")["suggestions"]]
    assert len(got) == 12 and new_id in got[:3], got  # the same vector as the one positive
    assert built() == [manifest]  # no request built a matrix for the new features version


def _post_image(url: str, data: bytes, name: str = "upload.jpg") -> tuple[int, dict]:
    import requests  # a real HTTP client for multipart

    r = requests.post(f"{url}/images", files={"image": (name, data, "image/jpeg")}, timeout=120)
    return r.status_code, r.json()


def test_post_images_into_the_s3_lake(lakes):
    """POST /images on an s3:// lake: the original goes into the bucket (one conditional PUT through
    the store layer), ingest and embed as on a local lake, and the upload is searchable at once
    through the overlay, whose vector is an object in the store; a fresh app (another worker,
    nothing shared but the bucket) serves its thumbnail and finds it by id. A corrupt and a too
    large upload are refused with nothing stored."""
    import hashlib

    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    _, s3, _, root, ids, _, base = lakes
    store = LakeStore.for_lake(root)
    out = io.BytesIO()
    Image.fromarray(skdata.coffee()).resize((200, 133)).save(out, "JPEG", quality=90)
    jpeg = out.getvalue()
    sha = hashlib.sha256(jpeg).hexdigest()
    t0 = time.monotonic()
    code, body = _post_image(s3.url, jpeg)
    took = time.monotonic() - t0
    assert code == 201, body
    print(f"POST /images on the s3 lake: {took:.2f} s {body['seconds']}")
    assert body["image_id"] == sha and body["created"] and body["embedded"]
    assert body["indexed"] and body["index_action"] == "overlay", body
    assert body["uri"] == f"{root}/uploads/{sha[:2]}/{sha}.jpg"
    assert store.read_bytes(f"uploads/{sha[:2]}/{sha}.jpg") == jpeg           # the original, in the bucket
    [vec] = [o.key for o in store.list("artifacts/upload-overlay") if o.key.endswith(f"-{sha}.npy")]
    assert np.load(io.BytesIO(store.read_bytes(vec))).shape[0] > 0
    assert not list((base / "node").rglob("uploads")), "nothing of the upload on a local disk"
    # the answering worker finds it at once
    assert s3.json("GET", f"/images/{sha}")["image_id"] == sha
    hits = s3.json("GET", f"/search/similar?image_id={sha}&k=5")["results"]
    assert len(hits) == 5 and sha not in {h["image_id"] for h in hits}
    # the same bytes again: 200, the same id, nothing added
    code, again = _post_image(s3.url, jpeg)
    assert code == 200 and again["image_id"] == sha and not again["created"] and not again["embedded"], again

    # another worker (a fresh app and artifact cache: nothing shared but the bucket)
    other = _Server(Settings(lake=root, runner="local", auth=False, refresh_s=0.0, upload_max_bytes=200_000,
                             artifact_cache_dir=str(base / "cache-upload")))
    try:
        code, thumb, _ = other.request("GET", f"/images/{sha}/thumbnail?size=64")
        assert code == 200 and thumb[:2] == b"\xff\xd8"
        assert [h["image_id"] for h in other.json("GET", f"/search/similar?image_id={sha}&k=5")["results"]] == \
            [h["image_id"] for h in hits]
        before = {o.key for o in store.list("uploads")}
        code, bad = _post_image(other.url, b"\xff\xd8\xff\xe0 not a jpeg at all" * 50)
        assert code == 400 and bad["ok"] is False and bad["status"] == 400, bad
        code, big = _post_image(other.url, jpeg + os.urandom(250_000))
        assert code == 413 and big["status"] == 413, big
        assert {o.key for o in store.list("uploads")} == before == {f"uploads/{sha[:2]}/{sha}.jpg"}
    finally:
        other.stop()


def test_a_dead_store_is_a_quick_503(lakes):
    _, s3, server, _, ids, _, _ = lakes
    before = s3.json("GET", f"/search/similar?image_id={ids[11]}&k=5")
    server.stop()
    # the loaded build lives in the verified local cache: search by a known image keeps answering
    assert s3.json("GET", f"/search/similar?image_id={ids[11]}&k=5") == before
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
