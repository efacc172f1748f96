"""The ``storage_options`` setting is all a process needs to reach an ``s3://`` lake: no ``AWS_*``
variable anywhere, the credentials in variables the settings only name. The CLI ingests into the
loopback S3 server (moto, signature-checking off); an app made with those settings serves the
images, thumbnails and SQL, and the quality step runs on the lake; bad options are named, a missing credential variable is exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    """(server, root, options, work dir): 12 images ingested by the CLI with settings only."""
    server = S3Server()
    try:
        work = tmp_path_factory.mktemp("options")
        write_planted(work / "images", 10, 2)
        root = f"s3://{server.make_bucket()}/lake"
        options = {"endpoint": server.endpoint, "allow_http": True, "region": "us-east-1",
                   "access_key_id_env": "LAKE_KEY", "secret_access_key_env": "LAKE_SECRET"}
        table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
        (work / "imagelake.toml").write_text(f'[imagelake]\nlake = "{root}"\nrunner = "local"\nauth = false\n\n'
                                             f"[imagelake.storage_options]\n{table}\n")
        proc = _cli(work, _clean_env(), "ingest", "--images", str(work / "images"), "--no-progress")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield server, root, options, work
    finally:
        server.stop()


def test_an_app_made_with_the_settings_serves_the_s3_lake(lake, monkeypatch, tmp_path):
    from api import API_PREFIX, create_app

    _, root, options, _ = lake
    for k in _AWS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LAKE_KEY", "testing")
    monkeypatch.setenv("LAKE_SECRET", "testing")
    settings = Settings(lake=root, runner="local", auth=False, refresh_s=0.0,
                        artifact_cache_dir=str(tmp_path / "cache")).replace(storage_options=options)
    try:
        client = create_app(settings).test_client()
        images = client.get(f"{API_PREFIX}/images?limit=50")
        assert images.status_code == 200, images.data[:300]
        ids = [r["image_id"] for r in images.get_json()["images"]]
        assert len(ids) == 12
        thumb = client.get(f"{API_PREFIX}/images/{ids[0]}/thumbnail?size=64")
        assert thumb.status_code == 200 and thumb.data[:2] == b"\xff\xd8"
        sql = client.post(f"{API_PREFIX}/sql", json={"sql": "SELECT count(*) AS n FROM thumbnails"})
        assert sql.status_code == 200, sql.data[:300]
        assert sql.get_json()["rows"][0][0] == 24
        # bucket writes commit to the bucket log on the s3 lake with the same settings
        made = client.post(f"{API_PREFIX}/buckets", json={"name": "from settings"})
        assert made.status_code == 201, made.data[:300]
        bucket = made.get_json()["event"]["bucket_id"]
        added = client.post(f"{API_PREFIX}/buckets/{bucket}/images", json={"image_ids": ids[:2]})
        assert added.status_code in (200, 201), added.data[:300]
        from lake.buckets import bucket_members
        from lake.catalog import Lake as _Lake

        assert sorted(bucket_members(_Lake.at(root), bucket)) == sorted(ids[:2])
        # the quality step on the s3 lake: its input staged in the bucket, each task reading its own file
        from jobs.quality.driver import run_quality
        from jobs.runner import LocalRunner
        from lake.catalog import Lake
        from lake.store import LakeStore

        summary = run_quality(Lake.at(root), settings, runner=LocalRunner())
        assert summary["rows_in"] == summary["rows_out"] == 12, summary
        sql = client.post(f"{API_PREFIX}/sql", json={"sql": "SELECT count(DISTINCT image_id) FROM image_quality"})
        assert sql.get_json()["rows"][0][0] == 12
        store = LakeStore.for_lake(root)
        assert any(o.key.startswith("tables/images/_delta_log/") for o in store.list("tables/images"))
        assert store.list("_staging") == []  # the staged input and output are gone
    finally:
        from lake.remote import configure

        configure({})


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


def test_a_missing_bucket_refused_credentials_or_a_dead_endpoint_is_one_line_and_exit_2(lake, tmp_path):
    """The CLI checks the store with one bounded listing before a command starts; before, deltalake
    retried for 40 s and the command ended with a Rust error chain and exit 1."""
    import socket

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
    finally:
        signing.stop()


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
