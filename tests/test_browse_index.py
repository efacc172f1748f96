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
    """Unfiltered, and under a filter (every image: {"width": {">=": 64}}), whose pages after the
    first are slices of one run of the filter (issue 18)."""
    from urllib.parse import quote

    from api import browse_filters

    wide = "where=" + quote('{"width": {">=": 64}}') + "&"
    client.get(f"{API}/images?{wide}limit=1")
    runs = browse_filters._indexes[str(lake.root)].built
    for collection in (None, "a", "b"):
        for offset, limit in ((0, 5), (3, 4), (8, 60), (15, 2), (16, 3), (100, 5)):
            for filtered in ("", wide):
                q = f"{filtered}limit={limit}&offset={offset}" + (f"&collection={collection}" if collection else "")
                body = client.get(f"{API}/images?{q}").get_json()
                assert [i["seq"] for i in body["images"]] == truth(lake, offset, limit, collection), q
                assert body["collections"] == {"a": 9, "b": 7}
                assert body["total"] == {None: 16, "a": 9, "b": 7}[collection]
                assert all(set(i) >= {"image_id", "seq", "collection", "format", "width", "height"} for i in body["images"])
                if collection:
                    assert {i["collection"] for i in body["images"]} <= {collection}
    assert browse_filters._indexes[str(lake.root)].built == runs  # 18 filtered pages, one run of the filter
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


def test_filters_by_folder_tag_bucket_and_where_and_bulk_tags(lake, client, tmp_path):
    """GET /images?folder=&tag=&bucket=&where= (with a collection), GET /browse/filters, and
    POST /tags/bulk tagging a selection in one request; bad input answers 400/404/413."""
    from urllib.parse import quote

    def page(q):
        body = client.get(f"{API}/images?limit=60&{q}").get_json()
        assert body["ok"] is True, body
        return body

    every = page("")["images"]
    a_ids = [i["image_id"] for i in every if i["collection"] == "a"]
    folder = page(f"folder={quote(str(tmp_path / 'b'))}")
    assert folder["total"] == 7 and folder["collections"] == {"b": 7}
    assert page(f"folder={quote(str(tmp_path))}")["total"] == 16  # a folder includes its sub-folders
    assert page(f"folder={quote(str(tmp_path)[:-1])}")["total"] == 0  # a folder, not a prefix of a name
    choices = client.get(f"{API}/browse/filters").get_json()
    assert {f["folder"]: f["images"] for f in choices["folders"]} == {str(tmp_path / "a"): 9, str(tmp_path / "b"): 7}
    # bulk tag three images of a, then filter by that tag and by a bucket
    tagged = client.post(f"{API}/tags/bulk", json={"image_ids": a_ids[:3], "add": ["Beach"]}).get_json()
    assert tagged["ok"] and tagged["images"] == 3 and tagged["added"] == {"beach": 3}
    by_tag = page("tag=beach")
    assert sorted(i["image_id"] for i in by_tag["images"]) == sorted(a_ids[:3]) and by_tag["filters"] == {"tag": "beach"}
    assert {"tag": "beach", "sources": ["user"], "images": 3} in client.get(f"{API}/browse/filters").get_json()["tags"]
    again = client.post(f"{API}/tags/bulk", json={"image_ids": a_ids[:4], "add": ["beach"], "remove": []}).get_json()
    assert again["added"] == {"beach": 1}  # only the one that had not got it
    client.post(f"{API}/tags/bulk", json={"image_ids": a_ids[:2], "remove": ["beach"]})
    assert page("tag=beach")["total"] == 2  # a new tags version runs the (kept) filter again
    paged = [client.get(f"{API}/images?tag=beach&limit=1&offset={o}").get_json()["images"] for o in (0, 1, 2)]
    assert [p[0]["image_id"] for p in paged[:2]] == sorted(a_ids[2:4], key=a_ids.index) and paged[2] == []
    bucket = client.post(f"{API}/buckets", json={"name": "sea"}).get_json()["bucket"]["bucket_id"]
    client.post(f"{API}/buckets/{bucket}/images", json={"image_ids": a_ids[2:6]})
    both = page(f"bucket={bucket}&tag=beach&collection=a")
    assert sorted(i["image_id"] for i in both["images"]) == sorted(a_ids[2:4])
    wide = quote('{"width": {">=": 64}, "format": "JPEG"}')
    assert page(f"where={wide}&bucket={bucket}")["total"] == 4
    narrow, unknown = quote('{"width": {">": 64}}'), quote('{"nope": 1}')
    assert page(f"where={narrow}")["total"] == 0
    assert page("where=%7B%7D")["total"] == 16  # an empty filter matches everything (the index path)
    assert client.post(f"{API}/dup-groups", json={"image_ids": a_ids[:2]}).get_json() == {"ok": True, "groups": {}}
    assert client.post(f"{API}/dup-groups", json={"image_ids": ["x"]}).status_code == 400  # (no cluster run here)
    for q, status in (("where=%7Bbad", 400), (f"where={unknown}", 400), ("bucket=xyz", 400),
                      ("bucket=0000000000000000", 404), ("cluster=no%20such", 400), ("cluster=nosuch", 404)):
        body = client.get(f"{API}/images?{q}").get_json()
        assert body["ok"] is False and body["status"] == status and body["error"], (q, body)
    for body, status in (({"image_ids": a_ids[:1]}, 400), ({"image_ids": ["f" * 64], "add": ["x"]}, 404),
                         ({"image_ids": a_ids[:1], "add": ["bad\ttag!"]}, 400), ({"image_ids": a_ids[:1], "correct": []}, 400),
                         ({"image_ids": ["f" * 64] * 100_001, "add": ["x"]}, 413)):
        answer = client.post(f"{API}/tags/bulk", json=body)
        assert answer.status_code == status, (body if len(str(body)) < 300 else "413 case", answer.get_json())

