"""The console script end to end: real processes, real Spark, a real gunicorn server and HTTP client."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from conftest import write_images

REPO = Path(__file__).resolve().parent.parent


def imagelake(*args, env_extra=None, timeout=300, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "imagelake", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def spark_lake(tmp_path_factory):
    """A lake ingested by the CLI on real Spark local[2]."""
    root = tmp_path_factory.mktemp("cli")
    write_images(root / "imgs" / "sub", 12, size=(96, 64))
    (root / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    lake = root / "lake"
    done = imagelake("--lake", str(lake), "--master", "local[2]", "ingest", "--images", str(root / "imgs"),
                     "--collection", "cli", "--no-progress")
    assert done.returncode == 0, done.stderr
    return root, lake, done


@pytest.mark.spark
def test_ingest_on_spark_prints_a_summary(spark_lake):
    _, _, done = spark_lake
    assert "13 files listed, 13 new, 12 read, 1 rejected; committed 12 images" in done.stdout


@pytest.mark.spark
def test_sql_formats(spark_lake):
    _, lake, _ = spark_lake
    q = "SELECT collection, count(*) AS n FROM images GROUP BY 1"
    as_csv = imagelake("--lake", str(lake), "sql", q, "--format", "csv")
    assert list(csv.reader(io.StringIO(as_csv.stdout))) == [["collection", "n"], ["cli", "12"]]
    as_json = json.loads(imagelake("--lake", str(lake), "sql", q, "--format", "json").stdout)
    assert (as_json["columns"], as_json["rows"], as_json["truncated"]) == (["collection", "n"], [["cli", 12]], False)
    table = imagelake("--lake", str(lake), "sql", "SELECT reason FROM rejects").stdout
    assert "not_an_image" in table or "truncated" in table


@pytest.mark.spark
def test_status_reports_tables_and_runs(spark_lake):
    _, lake, _ = spark_lake
    status = json.loads(imagelake("--lake", str(lake), "status", "--format", "json").stdout)
    assert status["tables"]["images"]["rows"] == 12
    assert status["tables"]["thumbnails"]["rows"] == 24
    assert status["runs"][0]["job"] == "ingest" and status["runs"][0]["state"] == "succeeded"
    assert "images" in imagelake("--lake", str(lake), "status").stdout


@pytest.mark.parametrize("args, code, message", [
    (["sql", "DROP TABLE images"], 2, "only read-only SELECT"),
    (["sql", "SELECT * FROM nope"], 2, "nope"),
    (["ingest", "--images", "/definitely/not/here"], 2, "no such folder"),
    (["--config", "/no/such.toml", "status"], 2, "does not exist"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, args, code, message):
    done = imagelake("--lake", str(tmp_path / "lake"), *args)
    assert done.returncode == code
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagelake: error:") and message in lines[0]
    assert "Traceback" not in done.stderr


def test_bad_setting_in_environment_is_a_clear_error(tmp_path):
    done = imagelake("--lake", str(tmp_path / "lake"), "status", env_extra={"IMAGELAKE_WORKERS": "many"})
    assert done.returncode == 2 and "'workers' must be of type int" in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_gunicorn_and_answers_over_http(tmp_path):
    write_images(tmp_path / "imgs", 5)
    lake = tmp_path / "lake"
    done = imagelake("--lake", str(lake), "--runner", "local", "ingest", "--images", str(tmp_path / "imgs"))
    assert done.returncode == 0, done.stderr
    made = imagelake("--lake", str(lake), "token", "create", "--scope", "read")
    assert made.returncode == 0, made.stderr
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {made.stdout.strip()}"
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    server = subprocess.Popen([sys.executable, "-m", "imagelake", "--lake", str(lake), "serve", "--port", str(port),
                               "--workers", "2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90  # a loaded 2-core machine boots two workers slowly
        while time.monotonic() < deadline:
            try:
                health = http.get(f"{base}/api/v1/health", timeout=10)
                break
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.1)
        else:
            pytest.fail("server did not start: " + server.stderr.read() if server.poll() is not None else "")
        assert health.status_code == 200 and health.json()["tables"]["images"] >= 1
        page = http.get(f"{base}/api/v1/images?limit=5", timeout=30).json()
        assert page["total"] == 5
        image_id = page["images"][0]["image_id"]
        thumb = http.get(f"{base}/api/v1/images/{image_id}/thumbnail?size=64", timeout=30)
        assert thumb.headers["Content-Type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.content)).size == (64, 48)
        again = http.get(f"{base}/api/v1/images/{image_id}/thumbnail?size=64",
                             headers={"If-None-Match": thumb.headers["ETag"]}, timeout=30)
        assert again.status_code == 304
        sql = http.post(f"{base}/api/v1/sql", json={"sql": "SELECT count(*) FROM images"}, timeout=30).json()
        assert sql["rows"] == [[5]]
        bad = http.post(f"{base}/api/v1/sql", json={"sql": "COPY images TO '/tmp/x.csv'"}, timeout=30)
        assert bad.status_code == 400 and bad.json()["ok"] is False
        assert "gunicorn" in http.get(f"{base}/api/v1/health", timeout=30).headers.get("Server", "")
        index = http.get(f"{base}/", timeout=30)  # the dashboard logs in with a cookie, not a bearer token
        assert index.status_code == 200 and index.url.endswith("/login") and 'type="password"' in index.text
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_migrate_adds_new_catalog_columns_to_an_older_lakes_tables(tmp_path):
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from lake.catalog import table_spec

    lake = tmp_path / "lake"
    old = pa.schema([f for f in table_spec("clusters").schema if f.name != "model_run"])  # as before that column
    uri = str(lake / "tables" / "clusters")
    DeltaTable.create(uri, old, name="clusters")
    row = {f.name: None for f in old}
    row.update(run_id="cluster-old", kind="topic", cluster_id="t1", image_id="a" * 64, level=2)
    write_deltalake(uri, pa.Table.from_pylist([row], schema=old), mode="append")
    done = imagelake("--lake", str(lake), "migrate")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clusters: added model_run"
    table = DeltaTable(uri)
    assert "model_run" in pa.schema(table.schema()).names
    assert table.to_pyarrow_table().to_pylist()[0]["model_run"] is None and table.to_pyarrow_table().num_rows == 1
    again = imagelake("--lake", str(lake), "migrate")
    assert again.returncode == 0 and again.stdout.strip() == "every table is up to date"
