"""Tokens and scopes: 401 without a valid token, 403 with too small a scope or a cross-site cookie write."""

from __future__ import annotations

import glob

import pytest
from flask import jsonify

from api import API_PREFIX, create_app
from api.auth import COOKIE, requires
from imagelake.cli import main
from lake.tokens import create_token, list_tokens, revoke_token


@pytest.fixture
def app(settings):
    app = create_app(settings, {"TESTING": True})

    @app.post(f"{API_PREFIX}/_write")
    def write():
        return jsonify({"ok": True})

    @app.get(f"{API_PREFIX}/_admin")
    @requires("admin")
    def admin_only():
        return jsonify({"ok": True})

    yield app
    app.extensions["imagelake"].close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_reads_need_a_read_token_and_public_routes_are_open(app, lake):
    client = app.test_client()
    response = client.get(f"{API_PREFIX}/images")
    assert response.status_code == 401 and response.get_json()["status"] == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get(f"{API_PREFIX}/health").status_code == 200
    assert client.get(f"{API_PREFIX}/openapi.json").status_code == 200
    assert client.get(f"{API_PREFIX}/nope").status_code == 404  # unknown routes stay 404
    _, read = create_token(lake, "read")
    assert client.get(f"{API_PREFIX}/images", headers=bearer(read)).status_code == 200
    assert client.post(f"{API_PREFIX}/sql", json={"sql": "SELECT 1"}, headers=bearer(read)).status_code == 200


def test_scopes_nest(app, lake):
    client = app.test_client()
    tokens = {scope: create_token(lake, scope)[1] for scope in ("read", "curate", "admin")}
    assert client.post(f"{API_PREFIX}/_write", headers=bearer(tokens["read"])).status_code == 403
    assert client.post(f"{API_PREFIX}/_write", headers=bearer(tokens["curate"])).status_code == 200
    assert client.get(f"{API_PREFIX}/_admin", headers=bearer(tokens["curate"])).status_code == 403
    assert client.get(f"{API_PREFIX}/_admin", headers=bearer(tokens["admin"])).status_code == 200
    assert client.get(f"{API_PREFIX}/session", headers=bearer(tokens["curate"])).get_json()["scope"] == "curate"


@pytest.mark.parametrize("header", ["Bearer il_0000000000000000_" + "A" * 43, "Bearer nonsense", "Basic abc", "Bearer "])
def test_wrong_or_malformed_tokens_are_401(app, lake, header):
    create_token(lake, "admin")
    response = app.test_client().get(f"{API_PREFIX}/images", headers={"Authorization": header})
    assert response.status_code == 401 and response.get_json()["ok"] is False


def test_a_tampered_secret_and_a_revoked_token_are_refused(app, lake):
    token_id, token = create_token(lake, "read")
    client = app.test_client()
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert client.get(f"{API_PREFIX}/images", headers=bearer(tampered)).status_code == 401
    assert client.get(f"{API_PREFIX}/images", headers=bearer(token)).status_code == 200
    revoke_token(lake, token_id)
    assert client.get(f"{API_PREFIX}/images", headers=bearer(token)).status_code == 401
    assert [t["revoked_at"] is not None for t in list_tokens(lake)] == [True]


def test_secrets_are_stored_hashed(lake):
    _, token = create_token(lake, "admin")
    secret = token.rsplit("_", 1)[1].encode()
    for path in glob.glob(f"{lake.table_uri('tokens')}/**/*", recursive=True):
        if not path.endswith("/"):
            try:
                assert secret not in open(path, "rb").read()
            except IsADirectoryError:
                pass


def test_cookie_login_allows_same_site_writes_and_refuses_cross_site_ones(app, lake):
    _, token = create_token(lake, "curate")
    client = app.test_client()
    here = {"Origin": "http://localhost"}
    assert client.post(f"{API_PREFIX}/session", json={"token": "il_bad"}, headers=here).status_code == 401
    response = client.post(f"{API_PREFIX}/session", json={"token": token}, headers=here)
    assert response.status_code == 200 and response.get_json()["scope"] == "curate"
    cookie = response.headers["Set-Cookie"]
    assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert client.get(f"{API_PREFIX}/images").status_code == 200  # the cookie authenticates reads
    same = client.post(f"{API_PREFIX}/_write", headers={"Origin": "http://localhost"})
    assert same.status_code == 200
    cross = client.post(f"{API_PREFIX}/_write", headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403 and "cross-site" in cross.get_json()["error"]
    assert client.post(f"{API_PREFIX}/_write", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.post(f"{API_PREFIX}/_write").status_code == 403  # no origin evidence at all
    assert client.delete(f"{API_PREFIX}/session").status_code == 200
    assert client.get(f"{API_PREFIX}/images").status_code == 401


def test_auth_off_opens_every_route(settings):
    app = create_app(settings.replace(auth=False), {"TESTING": True})
    try:
        assert app.test_client().get(f"{API_PREFIX}/images").status_code == 200
    finally:
        app.extensions["imagelake"].close()


def test_token_cli_create_list_revoke(lake, capsys):
    assert main(["--lake", lake.root, "token", "create", "--scope", "curate", "--name", "ann"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("il_")
    assert main(["--lake", lake.root, "token", "list"]) == 0
    listing = capsys.readouterr().out
    token_id = token.split("_")[1]
    assert token_id in listing and "curate" in listing and "ann" in listing and token not in listing
    assert main(["--lake", lake.root, "token", "revoke", "nope"]) == 2
    assert main(["--lake", lake.root, "token", "revoke", token_id]) == 0
