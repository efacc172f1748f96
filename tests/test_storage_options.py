"""The ``storage_options`` setting is all a process needs to reach an ``s3://`` lake: no ``AWS_*``
variable anywhere, the credentials in variables the settings only name. `imagelake run` (every
step) fills a lake on the loopback S3 server (moto, signature-checking off); `imagelake serve`,
configured the same way, serves it over HTTP (images, thumbnails, SQL, search, a suggestion round,
bucket writes and undo, tiles); bad options are named; a missing credential variable, a missing
bucket, refused credentials and a dead endpoint are one line and exit 2.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lake.errors import BadInput
from lake.settings import Settings, load_settings
from planted_images import write_planted
from s3_server import S3Server

ROOT = Path(__file__).resolve().parents[1]
_AWS = [k for k in os.environ if k.startswith("AWS_")]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "IMAGELAKE_STORAGE_OPTIONS"}
    return {**env, "PYTHONPATH": str(ROOT), "LAKE_KEY": "testing", "LAKE_SECRET": "testing", **extra}


def _cli(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imagelake", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """(server, root, options, work dir): `imagelake run`, every step, over 12 images, settings only.

    The ONNX export of the embedding model is copied into the bucket from the shared photo lake
    first, as a lake that ran before would hold it (exporting it again costs 20-40 s of torch); the
    embed step still reads and checks it from the store and embeds the 12 images."""
    from lake.store import LakeStore
    from photo_lake import photo_template

    template = photo_template(tmp_path_factory.getbasetemp(), 2000)[0]
    server = S3Server()
    try:
        work = tmp_path_factory.mktemp("options")
        write_planted(work / "images", 10, 2)
        root = f"s3://{server.make_bucket()}/lake"
        store = LakeStore(root, server.storage_options())
        models = Path(template.artifacts_dir("models"))
        for path in models.rglob("*"):
            if path.is_file():
                store.upload(f"artifacts/models/{path.relative_to(models).as_posix()}", path)
        options = {"endpoint": server.endpoint, "allow_http": True, "region": "us-east-1",
                   "access_key_id_env": "LAKE_KEY", "secret_access_key_env": "LAKE_SECRET"}
        table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
        (work / "imagelake.toml").write_text(f'[imagelake]\nlake = "{root}"\nrunner = "local"\nauth = false\n\n'
                                             f"[imagelake.storage_options]\n{table}\n")
        proc = _cli(work, _clean_env(), "run", "--images", str(work / "images"), "--no-progress")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        steps = ("ingest", "quality", "embed", "suggest", "index", "outliers", "cluster", "tag", "grid")
        assert all(f"{step} " in proc.stdout for step in steps) and "ingest 12 rows out" in proc.stdout, proc.stdout
        assert "embed 12 rows out" in proc.stdout and "grid 12 rows out" in proc.stdout, proc.stdout
        yield server, root, options, work
    finally:
        server.stop()


def _request(url: str, method: str = "GET", body=None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_imagelake_serve_with_the_settings_serves_the_run(lake, monkeypatch, tmp_path):
    """`imagelake serve` (2 workers) on the lake `run` made, configured by the settings file alone."""
    from api import API_PREFIX
    from lake.buckets import bucket_members, read_events
    from lake.catalog import Lake
    from lake.remote import configure
    from lake.store import LakeStore

    _, root, options, work = lake
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = _clean_env(IMAGELAKE_ARTIFACT_CACHE_DIR=str(tmp_path / "cache"))
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "imagelake", "serve", "--port", str(port), "--workers", "2"],
                                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}{API_PREFIX}"

    def get(path: str, method: str = "GET", body=None, status: int = 200) -> dict:
        code, data = _request(url + path, method, body)
        assert code == status, (path, code, data[:300])
        return json.loads(data)
    try:
        deadline = time.monotonic() + 90
        while not _healthy(url):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        ids = [r["image_id"] for r in get("/images?limit=50")["images"]]
        assert len(ids) == 12
        code, thumb = _request(f"{url}/images/{ids[0]}/thumbnail?size=64")
        assert code == 200 and thumb[:2] == b"\xff\xd8"
        counts = get("/sql", "POST", {"sql": "SELECT (SELECT count(*) FROM thumbnails), "
                                             "(SELECT count(DISTINCT image_id) FROM image_quality)"})["rows"][0]
        assert counts == [24, 12]
        hits = get(f"/search/similar?image_id={ids[0]}&k=5")["results"]
        assert len(hits) == 5 and ids[0] not in {h["image_id"] for h in hits}
        # a suggestion round; the writes go to whichever worker answers and commit to the bucket log
        bucket = get("/buckets", "POST", {"name": "settings only"}, status=201)["bucket"]["bucket_id"]
        get(f"/buckets/{bucket}/images", "POST", {"image_ids": ids[:1]})
        get(f"/buckets/{bucket}/images", "POST", {"image_ids": ids[1:2]})
        first = [h["image_id"] for h in get(f"/buckets/{bucket}/suggestions?n=4&explore=false")["suggestions"]]
        assert len(first) == 4 and not set(first) & set(ids[:2])
        get(f"/buckets/{bucket}/feedback", "POST", {"accepted": first[:1], "rejected": first[-1:]})
        for _ in range(3):  # either worker
            assert sorted(get(f"/buckets/{bucket}")["members"]) == sorted(ids[:2] + first[:1])
        second = [h["image_id"] for h in get(f"/buckets/{bucket}/suggestions?n=4&explore=false")["suggestions"]]
        assert len(second) == 4 and not {first[0], first[-1]} & set(second)
        assert get("/undo", "POST", {})["undone"]["action"] == "feedback"
        for _ in range(3):
            assert sorted(get(f"/buckets/{bucket}")["members"]) == sorted(ids[:2])
        # the grid step's layout: its tiles from the store
        latest = get("/grid/latest")
        for z in (0, latest["dzi"]["max_level"]):
            code, tile = _request(f"{url}/grid/{latest['layout']['layout_id']}/tiles/{z}/0_0.jpg")
            assert code == 200 and tile[:2] == b"\xff\xd8", z
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for k in _AWS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LAKE_KEY", "testing")
    monkeypatch.setenv("LAKE_SECRET", "testing")
    configure(options, root)  # this process too: settings only
    try:
        assert sorted(bucket_members(Lake.at(root), bucket)) == sorted(ids[:2])
        seqs = [e["seq"] for e in read_events(Lake.at(root))[0]]
        assert seqs == list(range(len(seqs)))
        store = LakeStore.for_lake(root)
        assert store.list("_staging") == []  # every step's staged input and output are gone
        assert store.list("artifacts/index") and store.list("artifacts/suggest") and store.list("artifacts/tiles")
    finally:
        configure({})


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.mark.parametrize("options, message", [
    ({"endpoint": "http://127.0.0.1:1", "secret_access_key": "x"}, "unknown storage option 'secret_access_key'"),
    ({"allow_http": "maybe"}, "must be true or false"),
    ({"access_key_id_env": "not a name"}, "names an environment variable"),
    ({"conditional_put": "none"}, "must be 'etag'"),
    ({"endpoint": "127.0.0.1:9000"}, "must be a URL"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(BadInput, match=message):
        load_settings(env={"IMAGELAKE_STORAGE_OPTIONS": json.dumps(options)})


def test_a_missing_credential_variable_is_one_line_and_exit_2(lake):
    _, _, _, work = lake
    env = _clean_env()
    env.pop("LAKE_SECRET")
    proc = _cli(work, env, "status")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "LAKE_SECRET" in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_bucket_refused_credentials_or_a_dead_endpoint_is_one_line_and_exit_2(lake, tmp_path, monkeypatch):
    """The CLI checks the store with one bounded listing before a command starts (before, deltalake
    retried for 40 s and the command ended with a Rust error chain and exit 1); the API answers 503
    with the error shape."""
    from api import API_PREFIX, create_app
    from lake.remote import configure

    server, root, options, work = lake
    signing = S3Server(auth=True)  # checks signatures; no IAM user exists, so every key is wrong
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    cases = {"the bucket does not exist": (server.endpoint, "s3://no-such-bucket-here/lake"),
             "refused the credentials": (signing.endpoint, root),
             "is unreachable (list _locks: connection refused)": (dead, root)}
    try:
        procs = {}
        for i, (message, (endpoint, lake_root)) in enumerate(cases.items()):
            node = tmp_path / f"node{i}"
            node.mkdir()
            table = "".join(f"{k} = {json.dumps(v)}\n" for k, v in {**options, "endpoint": endpoint}.items())
            (node / "imagelake.toml").write_text(f'[imagelake]\nlake = "{lake_root}"\n\n[imagelake.storage_options]\n{table}')
            procs[message] = subprocess.Popen([sys.executable, "-m", "imagelake", "status"], cwd=node, env=_clean_env(),
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for message, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 2, (message, out, err)
            assert err.startswith("imagelake: error: the object store of the lake s3://") and message in err, err
            assert err.count("\n") == 1 and "Traceback" not in err
        for k in _AWS:
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("LAKE_KEY", "testing")
        monkeypatch.setenv("LAKE_SECRET", "testing")
        for why, (endpoint, lake_root) in zip(("the bucket does not exist", "the credentials were refused",
                                               "connection refused"), cases.values()):
            settings = Settings(lake=lake_root, runner="local", auth=False, artifact_cache_dir=str(tmp_path / "cache"))
            client = create_app(settings.replace(storage_options={**options, "endpoint": endpoint})).test_client()
            for path in ("/images?limit=5", "/buckets"):
                answer = client.get(API_PREFIX + path)
                body = answer.get_json()
                assert answer.status_code == 503 and set(body) == {"ok", "error", "status"}, (path, body)
                assert why in body["error"] and "s3://" not in body["error"], body
    finally:
        signing.stop()
        configure({})


def test_executors_get_the_options_by_name_never_the_secrets(monkeypatch):
    from jobs.spark import spark_conf
    from lake.remote import active_options, resolved_options

    options = {"endpoint": "http://10.0.0.9:9000", "secret_access_key_env": "LAKE_SECRET", "access_key_id_env": "LAKE_KEY"}
    monkeypatch.setenv("LAKE_SECRET", "s3cr3t")
    monkeypatch.setenv("LAKE_KEY", "k3y")
    conf = spark_conf(Settings(master="spark://h:7077").replace(storage_options=options))
    shipped = conf["spark.executorEnv.IMAGELAKE_STORAGE_OPTIONS"]
    assert json.loads(shipped) == options and "s3cr3t" not in shipped
    # an executor reads no settings: the variable alone gives it the options, its own env the secrets
    monkeypatch.setattr("lake.remote._ACTIVE", None)
    monkeypatch.setenv("IMAGELAKE_STORAGE_OPTIONS", shipped)
    assert active_options() == options
    assert resolved_options() == {"AWS_ENDPOINT_URL": "http://10.0.0.9:9000", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
                                  "AWS_ACCESS_KEY_ID": "k3y"}
    assert "spark.executorEnv.IMAGELAKE_STORAGE_OPTIONS" not in spark_conf(Settings())
