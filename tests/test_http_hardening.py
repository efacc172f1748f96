"""Issue 15, items 3-5 over real HTTP machinery: login CSRF, leaks in public and 5xx answers,
private caching, bucket-name rules, JSON nesting, form limits that name themselves, and slow or
silent clients against a real ``imagelake serve``."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from api import API_PREFIX, create_app
from browser import running_server
from lake.catalog import Lake
from lake.commit import commit_rows, ensure_tables, now_utc
from lake.settings import Settings
from lake.tokens import create_token

HERE = "http://localhost"   # the Flask test client's own origin


def assert_error(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"ok", "error", "status"} and body["ok"] is False and body["status"] == status
    return body


# -- a small lake with images, thumbnails, features, a grid layout and index builds ----------------

N = 64
MODEL = "synthetic@1"


def _jpeg(rgb) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), rgb).save(out, "JPEG", quality=85)
    return out.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Lake:
    from jobs.grid.driver import run_grid
    from jobs.index.driver import run_index
    from jobs.runner import LocalRunner

    lake = Lake.at(tmp_path_factory.mktemp("hardening") / "lake")
    ensure_tables(lake)
    rng = np.random.default_rng(3)
    ids = [hashlib.sha256(f"h-{i}".encode()).hexdigest() for i in range(N)]
    vectors = (rng.normal(size=(4, 16))[np.arange(N) % 4] + 0.1 * rng.normal(size=(N, 16))).astype(np.float32)
    commit_rows(lake, "images", [dict(image_id=i, seq=s, uri=f"/data/{s}.jpg", collection="c", format="JPEG",
                                      width=64, height=48, bytes=1000, ingested_at=now_utc())
                                 for s, i in enumerate(ids)], run_id="t-images")
    commit_rows(lake, "thumbnails", [dict(image_id=i, size=64, width=64, height=48, jpeg=_jpeg((s * 3, 80, 160)))
                                     for s, i in enumerate(ids)], run_id="t-thumbs")
    commit_rows(lake, "features", [dict(image_id=i, model=MODEL, embedding=v.tolist(), created_at=now_utc())
                                   for i, v in zip(ids, vectors)], run_id="t-features")
    run_grid(lake, Settings(lake=lake.root), seed=1, layout_id="L1")
    run_index(lake, Settings(lake=lake.root, runner="local"), runner=LocalRunner(), rebuild=True)
    return lake


def _copy(lake: Lake, dest: Path) -> Lake:
    import shutil

    shutil.copytree(lake.root, dest)
    return Lake.at(dest)


def _app(lake: Lake, **settings):
    app = create_app(Settings(lake=lake.root, refresh_s=0.0, **settings), {"TESTING": True})
    return app


def _bearer(app, lake: Lake, scope: str = "admin"):
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {create_token(lake, scope)[1]}"
    return client


# -- item 3: login CSRF ------------------------------------------------------------------------

def test_cross_site_text_plain_login_is_refused_and_sets_no_cookie(app, lake):
    _, token = create_token(lake, "curate")
    client = app.test_client()
    body = json.dumps({"token": token})
    # what a cross-site <form enctype="text/plain"> or no-cors fetch can send
    for headers in ({"Origin": "http://evil.example"}, {"Origin": HERE}, {"Sec-Fetch-Site": "cross-site"}, {}):
        response = client.post(f"{API_PREFIX}/session", data=body, content_type="text/plain", headers=headers)
        error = assert_error(response, 415)["error"]
        assert "application/json" in error and "Set-Cookie" not in response.headers
    # JSON from another site (only possible after a CORS preflight this server never grants)
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {},
                    {"Referer": "http://evil.example/page"}):
        response = client.post(f"{API_PREFIX}/session", json={"token": token}, headers=headers)
        assert "cross-site login" in assert_error(response, 403)["error"]
        assert "Set-Cookie" not in response.headers
    assert client.get(f"{API_PREFIX}/images").status_code == 401   # no cookie was set


def test_an_origin_with_another_scheme_or_port_is_not_this_site(app, lake):
    _, token = create_token(lake, "curate")
    client = app.test_client()
    for origin in ("https://localhost", "http://localhost:8080", "https://localhost:80", "ftp://localhost",
                   "http://localhost:notaport", "null"):
        response = client.post(f"{API_PREFIX}/session", json={"token": token}, headers={"Origin": origin})
        assert response.status_code == 403, origin
    response = client.post(f"{API_PREFIX}/session", json={"token": token}, headers={"Origin": "http://localhost:80"})
    assert response.status_code == 200   # the default port spelled out is the same origin
    create = {"name": "mine"}
    for origin in ("https://localhost", "http://localhost:8080"):   # cookie writes: the same rule
        assert client.post(f"{API_PREFIX}/buckets", json=create, headers={"Origin": origin}).status_code == 403
    wrong_referer = client.post(f"{API_PREFIX}/buckets", json=create, headers={"Referer": "https://localhost/"})
    assert wrong_referer.status_code == 403
    assert client.post(f"{API_PREFIX}/buckets", json=create, headers={"Origin": HERE}).status_code == 201
    assert client.post(f"{API_PREFIX}/buckets", json=create, headers={"Referer": f"{HERE}/"}).status_code == 201
    # behind a TLS proxy the scheme comes from the proxy: an https page matches an https server
    secure = client.post(f"{API_PREFIX}/buckets", json=create, base_url="https://localhost",
                         headers={"Origin": "https://localhost"})
    assert secure.status_code == 201


def test_the_dashboard_login_still_works(lake):
    from dashboards import create_app as create_dashboard

    _, token = create_token(lake, "curate", "ann")
    app = create_dashboard(Settings(lake=lake.root, refresh_s=0.0), {"TESTING": True})
    try:
        client = app.test_client()
        response = client.post(f"{API_PREFIX}/session", json={"token": token}, headers={"Origin": HERE})
        assert response.status_code == 200 and response.get_json()["name"] == "ann"
        assert "HttpOnly" in response.headers["Set-Cookie"]
        assert client.get("/").status_code == 200   # the shell opens with the cookie
        # browsers that send only Sec-Fetch-Site (no Origin) on a same-origin fetch
        other = app.test_client()
        assert other.post(f"{API_PREFIX}/session", json={"token": token},
                          headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
        # the login page's form post (works without JavaScript)
        form = app.test_client()
        done = form.post("/login", data={"token": token}, headers={"Origin": HERE})
        assert done.status_code == 303 and form.get("/").status_code == 200
        assert app.test_client().post("/login", data={"token": token},
                                      headers={"Origin": "https://localhost"}).status_code == 403
    finally:
        app.extensions["imagelake"].close()


# -- item 4: public and 5xx answers name nothing internal; private caching -------------------------

def _no_internals(text: str, lake: Lake) -> None:
    assert "/" not in text, text
    assert lake.root not in text and os.path.basename(lake.root) not in text.split()
    for raw in ("Traceback", "Error:", "DeltaError", "Generic", "Errno", "object at 0x"):
        assert raw not in text, text


def test_health_names_no_lake_path_and_refused_builds_without_paths(built, tmp_path):
    from jobs.index.driver import latest_build, run_index
    from jobs.runner import LocalRunner

    lake = _copy(built, tmp_path / "lake")
    second = run_index(lake, Settings(lake=lake.root, runner="local"), runner=LocalRunner(), rebuild=True)["build_id"]
    shard = Path(lake.artifacts_dir("index", second)) / "shard-00000.faiss"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert latest_build(lake)["build_id"] == second
    app = _app(lake)
    try:
        response = app.test_client().get(f"{API_PREFIX}/health")   # public: no token
        assert response.status_code == 200
        body = response.get_json()
        assert "lake" not in body and lake.root not in response.get_data(as_text=True)
        index = body["builds"]["index"]
        assert index["state"] == "serving_previous" and index["published_build_id"] == second
        [refused] = index["refused"]
        assert refused["build_id"] == second
        assert "sha256" in refused["error"] and "shard-00000.faiss" in refused["error"]   # still useful
        assert "/" not in refused["error"] and lake.root not in refused["error"]
    finally:
        app.extensions["imagelake"].close()


def test_a_corrupt_tile_artifact_is_a_500_that_names_only_a_request_id(built, tmp_path, caplog):
    lake = _copy(built, tmp_path / "lake")
    with open(Path(lake.artifacts_dir("tiles", "L1")) / "cells.idx", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    app = _app(lake)
    try:
        with caplog.at_level(logging.ERROR):
            response = _bearer(app, lake).get(f"{API_PREFIX}/grid/L1/tiles/0/0_0.jpg")
        error = assert_error(response, 500)["error"]
        request_id = response.headers["X-Request-Id"]
        assert error == f"internal error (request id {request_id}; the server log has the details)"
        _no_internals(response.get_data(as_text=True), lake)
        # the detail is in the log, under the same id
        assert f"request {request_id}" in caplog.text and "cells.idx does not match the manifest" in caplog.text
    finally:
        app.extensions["imagelake"].close()


def test_unexpected_exceptions_and_library_errors_leave_no_trace_in_the_body(lake, caplog):
    app = _app(lake, auth=False)

    @app.get(f"{API_PREFIX}/_boom")
    def boom():
        raise OSError(2, "No such file or directory", f"{lake.root}/_delta_log/00000.json")

    try:
        with caplog.at_level(logging.ERROR):
            response = app.test_client().get(f"{API_PREFIX}/_boom")
        assert_error(response, 500)
        _no_internals(response.get_data(as_text=True), lake)
        assert response.headers["X-Request-Id"] in caplog.text and "_delta_log" in caplog.text
    finally:
        app.extensions["imagelake"].close()


def test_a_bucket_history_version_past_the_log_is_a_clean_404(client):
    created = client.post(f"{API_PREFIX}/buckets", json={"name": "b"}).get_json()
    bucket_id = created["bucket"]["bucket_id"]
    response = client.get(f"{API_PREFIX}/buckets/{bucket_id}/history", query_string={"version": 999999})
    error = assert_error(response, 404)["error"]
    assert "999999" in error and "versions are 0 to" in error
    assert "/" not in error and "Generic" not in error and "DeltaError" not in error


def test_thumbnails_and_tiles_are_privately_cacheable(built):
    app = _app(built)
    try:
        client = _bearer(app, built, "read")
        image_id = hashlib.sha256(b"h-0").hexdigest()
        for url in (f"{API_PREFIX}/images/{image_id}/thumbnail?size=64", f"{API_PREFIX}/grid/L1/tiles/0/0_0.jpg"):
            response = client.get(url)
            assert response.status_code == 200 and response.mimetype == "image/jpeg", url
            cache = [d.strip() for d in response.headers["Cache-Control"].split(",")]
            assert "private" in cache and "public" not in cache and "immutable" in cache, url
            again = client.get(url, headers={"If-None-Match": response.headers["ETag"]})
            assert again.status_code == 304 and "private" in again.headers["Cache-Control"]
    finally:
        app.extensions["imagelake"].close()


# -- item 5: bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "rule"), [
    ("a\x00b", "control characters"),
    ("line\nbreak", "control characters"),
    ("tab\there", "control characters"),
    ("a\u2028b", "line breaks"),
    ("\x85next", "control characters"),
    ("txt.\u202eexe", "bidirectional"),
    ("\u2066isolate\u2069", "bidirectional"),
    ("x" * 201, "at most 200"),
    ("   ", "empty"),
    ("", "empty"),
])
def test_bucket_names_that_break_a_rule_are_refused_naming_it(client, name, rule):
    response = client.post(f"{API_PREFIX}/buckets", json={"name": name})
    assert rule in assert_error(response, 400)["error"]
    bucket_id = client.post(f"{API_PREFIX}/buckets", json={"name": "ok"}).get_json()["bucket"]["bucket_id"]
    assert rule in assert_error(client.patch(f"{API_PREFIX}/buckets/{bucket_id}", json={"name": name}), 400)["error"]


def test_a_lone_surrogate_name_is_refused(client):
    raw = '{"name": "bad \\ud800 name"}'   # valid JSON text, not valid Unicode
    response = client.post(f"{API_PREFIX}/buckets", data=raw, content_type="application/json")
    assert "surrogate" in assert_error(response, 400)["error"]
    sql = client.post(f"{API_PREFIX}/sql", json={"sql": "SELECT payload->>'name' AS n FROM bucket_events"})
    assert sql.status_code == 200   # the log stays readable for everyone


def test_bucket_names_are_nfc_normalised_and_200_characters_fit(client):
    decomposed = "Cafe\u0301 " + "y" * 190
    assert unicodedata.normalize("NFC", decomposed) != decomposed
    response = client.post(f"{API_PREFIX}/buckets", json={"name": f"  {decomposed}  "})
    assert response.status_code == 201
    bucket = response.get_json()["bucket"]
    assert bucket["name"] == unicodedata.normalize("NFC", decomposed) and bucket["name"].startswith("Café ")
    renamed = client.patch(f"{API_PREFIX}/buckets/{bucket['bucket_id']}", json={"name": "n" * 200})
    assert renamed.status_code == 200 and renamed.get_json()["bucket"]["name"] == "n" * 200
    assert client.post(f"{API_PREFIX}/buckets", json={"name": "🐟 fish"}).status_code == 201


def test_deeply_nested_json_is_a_400_not_a_500(client):
    for depth in (100, 100_000):
        for route in ("/buckets", "/sql", "/undo"):
            response = client.post(f"{API_PREFIX}{route}", data="[" * depth + "]" * depth,
                                   content_type="application/json")
            assert "nests deeper than 64" in assert_error(response, 400)["error"], route
    deep_filter = '{"$not": ' * 5000 + "{}" + "}" * 5000
    response = client.get(f"{API_PREFIX}/facets", query_string={"column": "collection", "where": deep_filter})
    assert "nests deeper" in assert_error(response, 400)["error"]
    ok = client.post(f"{API_PREFIX}/buckets", json={"name": "fine", "color": None})   # shallow JSON still works
    assert ok.status_code == 201


def _multipart(parts: list[tuple[str, bytes, str | None]]) -> tuple[bytes, str]:
    boundary = "imagelake-test-boundary"
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_form_limits_say_which_limit_they_hit(lake):
    app = _app(lake, upload_max_bytes=1_000_000, auth=False)
    try:
        client = app.test_client()
        body, kind = _multipart([(f"f{i}", b"x", None) for i in range(2000)])
        assert len(body) < 200_000   # small: far below upload_max_bytes
        error = assert_error(client.post(f"{API_PREFIX}/tag", data=body, content_type=kind), 413)["error"]
        assert "more than 1000 parts" in error and "too large" not in error
        body, kind = _multipart([("note", b"t" * 600_000, None)])
        error = assert_error(client.post(f"{API_PREFIX}/tag", data=body, content_type=kind), 413)["error"]
        assert "text field" in error and "500000" in error
        body, kind = _multipart([("image", b"\xff" * 1_100_000, "big.jpg")])
        error = assert_error(client.post(f"{API_PREFIX}/tag", data=body, content_type=kind), 413)["error"]
        assert "too large" in error and "upload_max_bytes" in error and "1000000" in error
        # 999 parts and one file under every limit get past the form parser to the image check
        body, kind = _multipart([(f"f{i}", b"x", None) for i in range(999)] + [("image", b"not an image", "x.jpg")])
        response = client.post(f"{API_PREFIX}/tag", data=body, content_type=kind)
        assert response.status_code == 400 and "image" in response.get_json()["error"]
    finally:
        app.extensions["imagelake"].close()


# -- item 5: slow and silent clients against a real `imagelake serve` ---------------------------------

def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def test_idle_and_half_sent_connections_do_not_stall_a_real_server(lake):
    from imagelake.worker import HEADER_TIMEOUT_S

    _, token = create_token(lake, "curate")
    with running_server(lake.root, workers=1) as base:
        port = int(base.rsplit(":", 1)[1])
        idle = [_connect(port) for _ in range(50)]
        half = [_connect(port) for _ in range(50)]
        for s in half:
            s.sendall(b"POST /api/v1/session HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n")
        dribbler = _connect(port)
        dribbler.sendall(b"G")
        started = time.monotonic()
        time.sleep(0.5)
        try:
            worst = 0.0
            for i in range(6):   # one worker, 8 threads, 101 bad sockets: every answer still comes at once
                t = time.monotonic()
                assert requests.get(f"{base}/api/v1/health", timeout=10).status_code == 200
                worst = max(worst, time.monotonic() - t)
                dribbler.sendall(b"E")   # a byte a second keeps it under keepalive, not under the deadline
                time.sleep(1.0)
            assert worst < 3.0, worst
            session = requests.Session()   # keep-alive and bodies are unaffected
            login = session.post(f"{base}/api/v1/session", json={"token": token}, headers={"Origin": base},
                                 timeout=10)
            assert login.status_code == 200 and session.get(f"{base}/api/v1/images", timeout=10).status_code == 200
            # behind a TLS proxy on this host: the https page is this site once the proxy says https
            https_page = {"Origin": base.replace("http:", "https:")}
            assert requests.post(f"{base}/api/v1/session", json={"token": token}, headers=https_page,
                                 timeout=10).status_code == 403
            assert requests.post(f"{base}/api/v1/session", json={"token": token}, timeout=10,
                                 headers={**https_page, "X-Forwarded-Proto": "https"}).status_code == 200
            # the dribbler (now silent) is cut off with a 408 once its headers are HEADER_TIMEOUT_S late
            dribbler.settimeout(HEADER_TIMEOUT_S + 10)
            answer = b""
            while chunk := dribbler.recv(4096):
                answer += chunk
            took = time.monotonic() - started
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert HEADER_TIMEOUT_S - 1 <= took <= HEADER_TIMEOUT_S + 3, took
            half[0].settimeout(5)
            assert half[0].recv(4096).startswith(b"HTTP/1.1 408")
            # silent connections are closed after keepalive (5 s) of silence
            idle[0].settimeout(10)
            assert idle[0].recv(1) == b""
        finally:
            for s in idle + half + [dribbler]:
                s.close()


def test_the_gunicorn_config_file_matches_imagelake_serve():
    import runpy

    from gunicorn.config import Config

    from imagelake.serve import ImagelakeServer
    from imagelake.worker import BoundedThreadWorker

    server = ImagelakeServer(Settings())
    conf = runpy.run_path(str(Path(__file__).resolve().parents[1] / "infra" / "gunicorn.conf.py"))
    from_file = Config()
    for key in ("worker_class", "keepalive", "worker_connections", "timeout", "graceful_timeout", "preload_app",
                "limit_request_line", "limit_request_fields", "limit_request_field_size"):
        from_file.set(key, conf[key])
        assert getattr(from_file, key) == getattr(server.cfg, key), key
    assert server.cfg.worker_class is BoundedThreadWorker
