"""The dashboard's pages through the Flask client: login redirect, the shell, its assets and headers.

The same pages driven in a real headless Chromium are in tests/test_browser.py.
"""

from __future__ import annotations

import re

import pytest

from conftest import write_images
from dashboards import create_app
from jobs.ingest.driver import run_ingest
from lake.tokens import create_token


@pytest.fixture
def dashboard(tmp_path, lake, local_settings):
    write_images(tmp_path / "cats", 3)
    run_ingest(lake, local_settings, str(tmp_path / "cats"))
    app = create_app(local_settings.replace(refresh_s=0.0), {"TESTING": True})
    yield app
    app.extensions["imagelake"].close()


def test_without_a_login_the_shell_redirects_to_the_login_page(dashboard):
    client = dashboard.test_client()
    response = client.get("/")
    assert response.status_code == 302 and response.headers["Location"].endswith("/login")
    login = client.get("/login")
    assert login.status_code == 200 and 'type="password"' in login.get_data(as_text=True)
    assert client.get("/api/v1/images").status_code == 401


def test_login_cookie_opens_the_shell_with_every_view_and_asset(dashboard, lake):
    _, token = create_token(lake, "curate", "ann")
    client = dashboard.test_client()
    assert client.post("/api/v1/session", json={"token": token}, headers={"Origin": "http://localhost"}).status_code == 200
    page = client.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert token not in html and "il_" not in html  # no secrets in pages
    assert "ann · curate" in html
    for view in ("curate", "map", "search", "sql", "browse", "buckets"):
        assert f'id="view-{view}"' in html
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assets = re.findall(r'(?:href|src)="(/static/[^"]+)"', html)
    assert any(a.endswith("app.js") for a in assets)
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    modules = re.findall(r'from "\./([a-z]+\.js)"|import\("\./([a-z]+\.js)"\)', client.get("/static/js/app.js").get_data(as_text=True))
    for name in {a or b for a, b in modules}:
        assert client.get(f"/static/js/{name}").status_code == 200, name


def test_a_revoked_or_bogus_cookie_goes_back_to_login(dashboard):
    client = dashboard.test_client()
    client.set_cookie("imagelake_token", "il_0000000000000000_" + "x" * 43)
    assert client.get("/").status_code == 302


def test_the_login_form_sets_the_cookie_and_refuses_bad_or_cross_site_posts(dashboard, lake):
    _, token = create_token(lake, "read")
    client = dashboard.test_client()
    bad = client.post("/login", data={"token": "nope"}, headers={"Origin": "http://localhost"})
    assert bad.status_code == 401 and "unknown" in bad.get_data(as_text=True)
    cross = client.post("/login", data={"token": token}, headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403
    ok = client.post("/login", data={"token": token}, headers={"Origin": "http://localhost"})
    assert ok.status_code == 303 and ok.headers["Location"].endswith("/")
    assert "HttpOnly" in ok.headers["Set-Cookie"] and "SameSite=Strict" in ok.headers["Set-Cookie"]
    assert client.get("/").status_code == 200
