"""GET /images from the per-version seq index (keyset pages, maintained collection counts): the
same pages as ORDER BY seq LIMIT/OFFSET over the table, per collection, across several commits,
and a new commit picked up on the next request. Real ingest (in process), Delta, DuckDB, Flask."""

from __future__ import annotations

import duckdb
import pytest
from deltalake import DeltaTable

from conftest import write_images
from jobs.ingest.driver import run_ingest
from lake.catalog import Lake
from lake.settings import Settings

API = "/api/v1"


@pytest.fixture
def lake(tmp_path) -> Lake:
    lake = Lake.at(tmp_path / "lake")
    s = Settings(lake=lake.root, runner="local", partition_files=3)
    write_images(tmp_path / "a", 9)
    write_images(tmp_path / "b", 7, start=100)
    run_ingest(lake, s, str(tmp_path / "a"))
    run_ingest(lake, s, str(tmp_path / "b"))
    return lake


def truth(lake: Lake, offset: int, limit: int, collection: str | None = None) -> list[int]:
    con = duckdb.connect()
    con.register("images", DeltaTable(lake.table_uri("images")).to_pyarrow_dataset())
    where = f"WHERE collection = '{collection}'" if collection else ""
    rows = con.execute(f"SELECT seq FROM images {where} ORDER BY seq LIMIT {limit} OFFSET {offset}").fetchall()
    return [r[0] for r in rows]


def test_pages_match_a_full_sort_and_follow_new_commits(lake, client, tmp_path):
    for collection in (None, "a", "b"):
        for offset, limit in ((0, 5), (3, 4), (8, 60), (15, 2), (16, 3), (100, 5)):
            q = f"limit={limit}&offset={offset}" + (f"&collection={collection}" if collection else "")
            body = client.get(f"{API}/images?{q}").get_json()
            assert [i["seq"] for i in body["images"]] == truth(lake, offset, limit, collection), q
            assert body["collections"] == {"a": 9, "b": 7}
            assert body["total"] == {None: 16, "a": 9, "b": 7}[collection]
            if collection:
                assert {i["collection"] for i in body["images"]} <= {collection}
    write_images(tmp_path / "a", 3, start=50)
    run_ingest(lake, Settings(lake=lake.root, runner="local"), str(tmp_path / "a"))
    body = client.get(f"{API}/images?limit=60&collection=a").get_json()
    assert body["total"] == 12 and body["collections"] == {"a": 12, "b": 7}
    assert [i["seq"] for i in body["images"]] == truth(lake, 0, 60, "a")
    assert client.get(f"{API}/images?collection=none").get_json() == {
        "ok": True, "images": [], "total": 0, "collections": {"a": 12, "b": 7}}


def test_facets_are_kept_per_table_version(lake, client, tmp_path):
    from api import facets

    def counts():
        body = client.get(f"{API}/facets?column=collection").get_json()
        return {v["value"]: v["count"] for v in body["values"]}

    assert counts() == {"a": 9, "b": 7}
    cached = len(facets._cache)
    assert counts() == {"a": 9, "b": 7} and len(facets._cache) == cached  # answered from the kept counts
    write_images(tmp_path / "b", 2, start=300)
    run_ingest(lake, Settings(lake=lake.root, runner="local"), str(tmp_path / "b"))
    assert counts() == {"a": 9, "b": 9}  # a new images version is counted again
    assert client.get(f"{API}/facets?column=collection&where=%7Bbad").status_code == 400
