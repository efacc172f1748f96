"""The dashboard's first page, through the Flask client (browser tests come with the full dashboard)."""

from __future__ import annotations

import re

from conftest import write_images
from dashboards import create_app
from jobs.ingest.driver import run_ingest


def test_index_shows_collections_thumbnails_and_serves_its_assets(tmp_path, lake, local_settings):
    write_images(tmp_path / "cats", 3)
    write_images(tmp_path / "dogs", 2, start=100)
    for folder in ("cats", "dogs"):
        run_ingest(lake, local_settings, str(tmp_path / folder))
    client = create_app(local_settings.replace(refresh_s=0.0, auth=False), {"TESTING": True}).test_client()
    page = client.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "cats (3)" in html and "dogs (2)" in html and "all (5)" in html
    thumbs = re.findall(r'src="(/api/v1/images/[0-9a-f]{64}/thumbnail\?size=\d+)"', html)
    assert len(thumbs) == 5
    assert client.get(thumbs[0]).headers["Content-Type"] == "image/jpeg"
    for asset in re.findall(r'(?:href|src)="(/static/[^"]+)"', html):
        response = client.get(asset)
        assert response.status_code == 200, asset
    only_dogs = client.get("/?collection=dogs").get_data(as_text=True)
    assert len(re.findall(r"/thumbnail\?size=", only_dogs)) == 2
    bad = client.get("/?page=x")
    assert bad.status_code == 400 and bad.get_json()["ok"] is False
