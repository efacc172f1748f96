"""GET /images/<id> answers from a per-process cache valid for the versions of the tables it reads:
a commit to any of them (here a metadata import) is seen on the next read after the refresh."""

from __future__ import annotations

import pytest

from api import API_PREFIX
from conftest import write_images
from jobs.ingest.driver import run_ingest
from jobs.runner import LocalRunner
from lake.catalog import Lake
from lake.commit import open_table
from lake.metadata import import_metadata
from lake.settings import Settings


@pytest.fixture
def lake(lake_factory, tmp_path) -> Lake:
    lake = lake_factory()
    write_images(tmp_path / "imgs", 3)
    run_ingest(lake, Settings(lake=lake.root, runner="local"), str(tmp_path / "imgs"), runner=LocalRunner())
    return lake


def test_image_answers_are_cached_per_table_version(lake, client, tmp_path):
    rows = open_table(lake, "images").to_pyarrow_table(columns=["image_id", "uri"]).to_pylist()
    image_id = next(r["image_id"] for r in rows if r["uri"].endswith("img_00001.jpg"))
    first = client.get(f"{API_PREFIX}/images/{image_id}").get_json()["image"]
    assert first["metadata"] == {}
    assert client.get(f"{API_PREFIX}/images/{image_id}").get_json()["image"] == first  # from the cache
    assert client.get(f"{API_PREFIX}/images/{'0' * 64}").status_code == 404

    path = tmp_path / "meta.csv"
    path.write_text("id,year\nimg_00001,1950\n")
    import_metadata(lake, path, key="filename", run_id="r1")
    after = client.get(f"{API_PREFIX}/images/{image_id}").get_json()["image"]  # refresh_s = 0: the new version
    assert after["metadata"]["year"] == 1950
    assert {k: v for k, v in after.items() if k != "metadata"} == {k: v for k, v in first.items() if k != "metadata"}
