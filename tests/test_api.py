"""The HTTP API on a real lake: Delta tables in tmp_path, real JPEGs, the real Flask test client."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from flask import Flask
from PIL import Image, ImageDraw

from api import API_PREFIX, create_app
from api.services import LakeReader
from lake.catalog import TABLES, Lake
from lake.commit import commit_rows, ensure_tables
from lake.settings import Settings

MTIME = dt.datetime(2024, 5, 17, 12, 30, tzinfo=dt.timezone.utc)
SIZES = (64, 256)


def make_photo(seed: int, size: tuple[int, int] = (320, 200)) -> bytes:
    """A small JPEG whose bytes (and so whose sha256) depend on ``seed``."""
    img = Image.new("RGB", size, ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256))
    ImageDraw.Draw(img).rectangle([seed % 50, 10, 100 + seed % 50, 90], fill=(255, 255, 255))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def commit_photos(lake: Lake, photos: list[tuple[bytes, list[str]]], *, run_id: str, first_seq: int = 0) -> list[str]:
    """Commit ``(jpeg, uris)`` pairs to images, sources and thumbnails as ingest would; return the ids."""
    images, sources, thumbs, ids = [], [], [], []
    now = dt.datetime.now(dt.timezone.utc)
    for seq, (jpeg, uris) in enumerate(photos, start=first_seq):
        image_id = hashlib.sha256(jpeg).hexdigest()
        ids.append(image_id)
        with Image.open(io.BytesIO(jpeg)) as img:
            width, height = img.size
            images.append(dict(image_id=image_id, seq=seq, uri=uris[0], collection="test", format="JPEG",
                               width=width, height=height, bytes=len(jpeg), mtime=MTIME,
                               run_id=run_id, ingested_at=now))
            for size in SIZES:
                thumb = img.convert("RGB")
                thumb.thumbnail((size, size))
                out = io.BytesIO()
                thumb.save(out, "JPEG", quality=85)
                thumbs.append(dict(image_id=image_id, size=size, width=thumb.width,
                                   height=thumb.height, jpeg=out.getvalue()))
        sources += [dict(uri=u, image_id=image_id, collection="test", bytes=len(jpeg), mtime=MTIME,
                         run_id=run_id, ingested_at=now) for u in uris]
    for table, rows in (("images", images), ("sources", sources), ("thumbnails", thumbs)):
        commit_rows(lake, table, rows, run_id=run_id)
    return ids


@pytest.fixture(scope="module")
def photo_lake(tmp_path_factory) -> tuple[Lake, list[str]]:
    lake = Lake.at(tmp_path_factory.mktemp("photos") / "lake")
    ensure_tables(lake)
    ids = commit_photos(lake, [
        (make_photo(1), ["/photos/a.jpg", "/backup/a-copy.jpg"]),
        (make_photo(2), ["/photos/b.jpg"]),
        (make_photo(3, (200, 320)), ["/photos/c.jpg"]),
    ], run_id="run-1")
    return lake, ids


@pytest.fixture
def lake(photo_lake) -> Lake:
    return photo_lake[0]


@pytest.fixture
def ids(photo_lake) -> list[str]:
    return photo_lake[1]


def assert_error(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert set(body) == {"ok", "error", "status"}
    assert body["ok"] is False and body["status"] == status
    assert isinstance(body["error"], str) and body["error"]
    return body


def api_rules(app: Flask):
    return [r for r in app.url_map.iter_rules() if r.rule.startswith(API_PREFIX + "/")]


# -- health, images, thumbnails -------------------------------------------------------------

def test_health_lists_every_table_with_its_version(client, lake):
    body = client.get(f"{API_PREFIX}/health").get_json()
    assert body["ok"] is True and body["builds"] == {} and "lake" not in body
    assert set(body["tables"]) == set(TABLES)
    # create (version 0) + one commit for the three written tables
    assert {t: body["tables"][t] for t in ("images", "sources", "thumbnails")} == \
        {"images": 1, "sources": 1, "thumbnails": 1}
    assert all(v == 0 for t, v in body["tables"].items() if t not in ("images", "sources", "thumbnails", "tokens"))


def test_image_metadata_round_trip_with_every_uri(client, ids):
    response = client.get(f"{API_PREFIX}/images/{ids[0]}")
    assert response.status_code == 200
    image = response.get_json()["image"]
    assert image["image_id"] == ids[0] and image["seq"] == 0
    assert (image["width"], image["height"], image["format"], image["collection"]) == (320, 200, "JPEG", "test")
    assert image["bytes"] == len(make_photo(1))
    assert dt.datetime.fromisoformat(image["mtime"]) == MTIME
    assert image["uri"] == "/photos/a.jpg"
    assert image["uris"] == ["/backup/a-copy.jpg", "/photos/a.jpg"]

    portrait = client.get(f"{API_PREFIX}/images/{ids[2]}").get_json()["image"]
    assert (portrait["width"], portrait["height"], portrait["uris"]) == (200, 320, ["/photos/c.jpg"])


def test_browse_pages_images_in_seq_order(client, ids):
    body = client.get(f"{API_PREFIX}/images?limit=2").get_json()
    assert body["total"] == 3 and body["collections"] == {"test": 3}
    assert [i["image_id"] for i in body["images"]] == ids[:2]
    rest = client.get(f"{API_PREFIX}/images?limit=2&offset=2").get_json()
    assert [i["seq"] for i in rest["images"]] == [2]
    assert client.get(f"{API_PREFIX}/images?collection=nope").get_json()["total"] == 0
    for bad in ("limit=0", "limit=501", "offset=-1", "limit=ten"):
        assert_error(client.get(f"{API_PREFIX}/images?{bad}"), 400)


@pytest.mark.parametrize("size", SIZES)
def test_thumbnail_is_a_cacheable_jpeg_of_the_asked_size(client, ids, size):
    url = f"{API_PREFIX}/images/{ids[0]}/thumbnail?size={size}"
    response = client.get(url)
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    with Image.open(io.BytesIO(response.data)) as img:
        assert img.format == "JPEG"
        assert max(img.size) == min(size, 320)
        assert img.size[0] > img.size[1]
    assert response.headers["Cache-Control"] == "private, max-age=31536000, immutable"
    etag = response.headers["ETag"]
    assert etag == f'"{ids[0]}-{size}"'  # strong: no W/ prefix

    again = client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.data == b""
    assert again.headers["ETag"] == etag
    other = client.get(url, headers={"If-None-Match": '"something-else"'})
    assert other.status_code == 200 and other.data == response.data


def test_thumbnail_defaults_to_256(client, ids):
    response = client.get(f"{API_PREFIX}/images/{ids[2]}/thumbnail")
    with Image.open(io.BytesIO(response.data)) as img:
        assert img.size == (160, 256)


def test_malformed_unknown_and_bad_size_are_client_errors(client, ids):
    for bad in ("abc", ids[0].upper(), ids[0][:-1], ids[0] + "0", "z" * 64):
        body = assert_error(client.get(f"{API_PREFIX}/images/{bad}"), 400)
        assert "malformed image id" in body["error"]
        assert_error(client.get(f"{API_PREFIX}/images/{bad}/thumbnail"), 400)
    unknown = hashlib.sha256(b"never ingested").hexdigest()
    assert unknown in assert_error(client.get(f"{API_PREFIX}/images/{unknown}"), 404)["error"]
    assert_error(client.get(f"{API_PREFIX}/images/{unknown}/thumbnail?size=64"), 404)
    for size in ("128", "abc", "", "64.0"):
        body = assert_error(client.get(f"{API_PREFIX}/images/{ids[0]}/thumbnail?size={size}"), 400)
        assert "64, 256" in body["error"]


# -- SQL ------------------------------------------------------------------------------------

def test_sql_returns_columns_types_rows(client, ids):
    response = client.post(f"{API_PREFIX}/sql", json={
        "sql": "SELECT i.image_id, i.width, i.mtime, count(s.uri) AS n_uris "
               "FROM images i JOIN sources s USING (image_id) GROUP BY i.image_id, i.width, i.mtime, i.seq ORDER BY i.seq"})
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["ok"] is True and body["truncated"] is False
    assert body["columns"] == ["image_id", "width", "mtime", "n_uris"]
    assert len(body["types"]) == 4 and body["types"][1].upper() == "INTEGER"
    assert [row[0] for row in body["rows"]] == ids
    assert [row[3] for row in body["rows"]] == [2, 1, 1]
    assert dt.datetime.fromisoformat(body["rows"][0][2]) == MTIME
    assert isinstance(body["elapsed_ms"], (int, float))

    thumbs = client.post(f"{API_PREFIX}/sql", json={"sql": "SELECT jpeg FROM thumbnails ORDER BY image_id, size", "max_rows": 2}).get_json()
    assert thumbs["truncated"] is True and len(thumbs["rows"]) == 2
    assert thumbs["rows"][0][0]["$bytes"] > 100


@pytest.mark.parametrize("sql", [
    "DROP TABLE images",
    "DELETE FROM images",
    "CREATE TABLE x AS SELECT 1",
    "SELECT 1; SELECT 2",
    "SELEC 1",
    "SELECT * FROM no_such_table",
])
def test_forbidden_or_bad_sql_is_400(client, sql):
    assert_error(client.post(f"{API_PREFIX}/sql", json={"sql": sql}), 400)
    assert client.post(f"{API_PREFIX}/sql", json={"sql": "SELECT count(*) FROM images"}).get_json()["rows"] == [[3]]


def test_slow_sql_is_stopped_with_a_400(settings):
    app = create_app(settings.replace(sql_timeout_s=0.3, auth=False), {"TESTING": True})
    try:
        started = time.monotonic()
        response = app.test_client().post(f"{API_PREFIX}/sql", json={
            "sql": "SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b"})
        assert_error(response, 400)
        assert time.monotonic() - started < 10
    finally:
        app.extensions["imagelake"].close()


@pytest.mark.parametrize("kwargs", [
    {"data": "{not json", "content_type": "application/json"},
    {"data": "SELECT 1", "content_type": "text/plain"},
    {"json": ["SELECT 1"]},
    {"json": {"query": "SELECT 1"}},
    {"json": {"sql": ""}},
    {"json": {"sql": "SELECT 1", "max_rows": 10**9}},
    {"json": {"sql": "SELECT 1", "max_rows": "5"}},
])
def test_bad_sql_request_body_is_400(client, kwargs):
    assert_error(client.post(f"{API_PREFIX}/sql", **kwargs), 400)


# -- the error funnel -----------------------------------------------------------------------

def test_every_route_answers_bad_requests_with_the_error_shape(app, client):
    rules = api_rules(app)
    assert len(rules) >= 5
    for rule in rules:
        same_path = {m for r in rules if r.rule == rule.rule for m in r.methods}
        bad_method = next(m for m in ("DELETE", "PUT", "PATCH", "POST", "GET") if m not in same_path)
        plain = re.sub(r"<(?:[^:>]+:)?([^>]+)>", "0" * 64, rule.rule)
        response = client.open(plain, method=bad_method)
        assert_error(response, 405)
        assert set(response.headers["Allow"].split(", ")) == same_path

        for method in rule.methods - {"HEAD", "OPTIONS"}:
            if rule.arguments:
                malformed = re.sub(r"<(?:[^:>]+:)?([^>]+)>", "not-an-id", rule.rule)
                response = client.open(malformed, method=method)
                assert 400 <= response.status_code < 500
                assert_error(response, response.status_code)
            if method in ("POST", "PUT", "PATCH"):
                assert_error(client.open(plain, method=method, data="{bad json", content_type="application/json"), 400)


def test_unknown_path_and_wrong_method(client):
    assert "/api/v1/nope" in assert_error(client.get(f"{API_PREFIX}/nope"), 404)["error"]
    assert_error(client.get("/no/such/page"), 404)
    body = assert_error(client.delete(f"{API_PREFIX}/health"), 405)
    assert "DELETE" in body["error"] and "GET" in body["error"]
    assert_error(client.get(f"{API_PREFIX}/sql"), 405)


def test_body_too_large_is_413(settings):
    app = create_app(settings.replace(upload_max_bytes=100, auth=False), {"TESTING": True})
    try:
        body = assert_error(app.test_client().post(f"{API_PREFIX}/sql", json={"sql": "SELECT 1 -- " + "x" * 200}), 413)
        assert "100 bytes" in body["error"]
    finally:
        app.extensions["imagelake"].close()


def test_unexpected_errors_are_500_without_internals_and_logged(settings, caplog):
    app = create_app(settings.replace(auth=False), {"TESTING": True})

    @app.get(f"{API_PREFIX}/boom")
    def boom():
        raise RuntimeError("secret internals at /srv/lake")

    with caplog.at_level(logging.ERROR):
        body = assert_error(app.test_client().get(f"{API_PREFIX}/boom"), 500)
    assert body["error"].startswith("internal error (request id ") and "secret" not in body["error"]
    assert "Traceback" in caplog.text and "secret internals" in caplog.text


# -- the OpenAPI document -------------------------------------------------------------------

def test_openapi_describes_every_route(app, client):
    spec = client.get(f"{API_PREFIX}/openapi.json").get_json()
    assert spec["openapi"].startswith("3.1") and spec["servers"] == [{"url": API_PREFIX}]
    assert set(spec["components"]["schemas"]["Error"]["required"]) == {"ok", "error", "status"}
    for rule in api_rules(app):
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule[len(API_PREFIX):])
        assert path in spec["paths"], f"{rule.rule} is not in openapi.json"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            operation = spec["paths"][path].get(method.lower())
            assert operation is not None, f"{method} {rule.rule} is not in openapi.json"
            assert "405" in operation["responses"] and "500" in operation["responses"]


# -- freshness ------------------------------------------------------------------------------

def test_a_new_commit_becomes_visible_after_refresh(lake_factory):
    lake = lake_factory("fresh")
    first = commit_photos(lake, [(make_photo(10), ["/in/10.jpg"])], run_id="run-a")
    app = create_app(Settings().replace(auth=False, lake=lake.root, refresh_s=3600.0), {"TESTING": True})
    client = app.test_client()
    try:
        assert client.get(f"{API_PREFIX}/images/{first[0]}").status_code == 200
        before = client.get(f"{API_PREFIX}/health").get_json()["tables"]["images"]

        new = commit_photos(lake, [(make_photo(11), ["/in/11.jpg"])], run_id="run-b", first_seq=1)
        # Within refresh_s the reader keeps serving the version it has.
        assert_error(client.get(f"{API_PREFIX}/images/{new[0]}"), 404)

        app.extensions["imagelake"].refresh(force=True)
        image = client.get(f"{API_PREFIX}/images/{new[0]}").get_json()["image"]
        assert image["uris"] == ["/in/11.jpg"] and image["seq"] == 1
        assert client.get(f"{API_PREFIX}/health").get_json()["tables"]["images"] == before + 1
        thumb = client.get(f"{API_PREFIX}/images/{new[0]}/thumbnail?size=64")
        assert thumb.status_code == 200
    finally:
        app.extensions["imagelake"].close()


def test_refresh_s_zero_sees_commits_on_the_next_request(lake_factory):
    lake = lake_factory("live")
    app = create_app(Settings().replace(auth=False, lake=lake.root, refresh_s=0.0), {"TESTING": True})
    client = app.test_client()
    try:
        assert client.post(f"{API_PREFIX}/sql", json={"sql": "SELECT count(*) FROM images"}).get_json()["rows"] == [[0]]
        new = commit_photos(lake, [(make_photo(12), ["/in/12.jpg"])], run_id="run-c")
        assert client.get(f"{API_PREFIX}/images/{new[0]}").status_code == 200
        assert client.post(f"{API_PREFIX}/sql", json={"sql": "SELECT count(*) FROM images"}).get_json()["rows"] == [[1]]
    finally:
        app.extensions["imagelake"].close()


def test_a_lake_with_no_tables_yet_serves_health_and_404s(tmp_path):
    app = create_app(Settings().replace(auth=False, lake=str(tmp_path / "not-yet"), refresh_s=0.0), {"TESTING": True})
    client = app.test_client()
    try:
        body = client.get(f"{API_PREFIX}/health").get_json()
        assert body["ok"] is True and body["tables"] == {name: None for name in TABLES}
        assert_error(client.get(f"{API_PREFIX}/images/{'0' * 64}"), 404)
        assert_error(client.get(f"{API_PREFIX}/images/{'0' * 64}/thumbnail"), 404)
    finally:
        app.extensions["imagelake"].close()


def test_concurrent_reads_while_a_commit_lands(lake_factory):
    lake = lake_factory("busy")
    ids = commit_photos(lake, [(make_photo(20 + i), [f"/in/{i}.jpg"]) for i in range(4)], run_id="run-1")
    app = create_app(Settings().replace(auth=False, lake=lake.root, refresh_s=0.0), {"TESTING": True})

    def read(n: int) -> tuple[int, int]:
        client = app.test_client()
        image_id = ids[n % len(ids)]
        return (client.get(f"{API_PREFIX}/images/{image_id}").status_code,
                client.get(f"{API_PREFIX}/images/{image_id}/thumbnail?size=64").status_code)

    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(read, n) for n in range(40)]
            commit_photos(lake, [(make_photo(30), ["/in/30.jpg"])], run_id="run-2", first_seq=4)
            assert {f.result() for f in futures} == {(200, 200)}
        assert app.test_client().get(f"{API_PREFIX}/health").get_json()["tables"]["images"] == 2
    finally:
        app.extensions["imagelake"].close()


class _LocalLakeTreatedAsRemote(Lake):
    """Forces the object-store code path (Arrow datasets, not read_parquet) on a local lake."""

    @property
    def is_local(self) -> bool:
        return False


def test_object_store_code_path_serves_the_same_rows(photo_lake):
    lake, ids = photo_lake
    reader = LakeReader(Settings().replace(auth=False, lake=lake.root, refresh_s=0.0))
    reader.lake = _LocalLakeTreatedAsRemote(lake.root)
    try:
        image = reader.image(ids[0])
        assert image["uris"] == ["/backup/a-copy.jpg", "/photos/a.jpg"] and image["width"] == 320
        with Image.open(io.BytesIO(reader.thumbnail(ids[1], 64))) as img:
            assert max(img.size) == 64
    finally:
        reader.close()


_FORK_SCRIPT = """
import os, sys
from api import create_app
from lake.settings import Settings

def fork_and_get(app, url):
    pid = os.fork()
    if pid == 0:
        response = app.test_client().get(url)
        ok = response.status_code == 200 or "request id" in response.get_json()["error"]
        os._exit(response.status_code // 100 if ok else 9)
    parent = app.test_client().get(url).status_code
    return parent, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

url = "/api/v1/images/" + sys.argv[2]
fresh = create_app(Settings().replace(auth=False, lake=sys.argv[1]))  # as gunicorn --preload does
print(*fork_and_get(fresh, url))
used = create_app(Settings().replace(auth=False, lake=sys.argv[1]))
assert used.test_client().get(url).status_code == 200  # a warm-up request before the fork
print(*fork_and_get(used, url))
"""


def test_app_created_before_fork_serves_in_the_child_and_a_used_one_refuses_clearly(photo_lake):
    lake, ids = photo_lake
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _FORK_SCRIPT, lake.root, ids[0]], env=env, cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # fresh app: parent 200, child 2xx; used app: parent 200, child a JSON 500 whose log names the fork
    assert done.stdout.split() == ["200", "2", "200", "5"], done.stdout + done.stderr
    assert "used before the server forked its workers" in done.stderr


def test_api_imports_only_from_its_layer_and_below():
    import ast
    for module in (Path(__file__).resolve().parents[1] / "api").glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in {"dashboards", "imagelake"}, f"{module.name} imports {name}"


def test_thumbnail_cache_is_bounded_and_least_recently_used():
    from api.services import ByteLRU

    cache = ByteLRU(100)
    for i in range(5):
        cache.put(i, bytes(10))
    assert cache.get(0) == bytes(10)          # 0 is now the most recent
    for i in range(5, 12):
        cache.put(i, bytes(10))
    assert cache.bytes <= 100 and cache.get(0) is not None and cache.get(1) is None
    cache.put("big", bytes(50))               # over an eighth of the budget: not cached
    assert cache.get("big") is None


def test_openapi_documents_the_search_parameters_the_route_reads(client):
    """GET and POST /search/similar read k, model and where (api/search.py); each is documented."""
    spec = client.get(f"{API_PREFIX}/openapi.json").get_json()
    for method in ("get", "post"):
        names = {p["name"] for p in spec["paths"]["/search/similar"][method]["parameters"]}
        assert {"k", "model", "where"} <= names, (method, names)
    form = spec["paths"]["/search/similar"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "k", "model", "where"} <= set(form["properties"])
