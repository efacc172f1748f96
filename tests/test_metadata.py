"""Bring-your-own metadata: import (keys, formats, MERGE, schema evolution, rejects), the SQL views,
GET /images/<id>, facets, the safe filter language, and the CLI. Real Delta, DuckDB and Flask on
small lakes ingested in process (LocalRunner) from generated images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from conftest import make_jpeg, write_images
from imagelake.cli import main
from jobs.ingest.driver import run_ingest
from lake.catalog import Lake
from lake.errors import BadInput, NotFound
from lake.metadata import compile_filter, import_metadata, matching_seqs, metadata_columns
from lake.metadata_filter import facet_counts, lake_connection
from lake.settings import Settings
from lake.sql import SqlSandbox

API = "/api/v1"


@pytest.fixture(scope="module")
def source_lake(tmp_path_factory):
    """Collection ``a``: img_00000..img_00005; collection ``b``: another img_00000.jpg (other bytes)
    and img_00100.jpg. Built once; each test gets a copy."""
    root = tmp_path_factory.mktemp("metadata-src")
    write_images(root / "a", 6)
    (root / "b").mkdir()
    (root / "b" / "img_00000.jpg").write_bytes(make_jpeg(500))
    (root / "b" / "img_00100.jpg").write_bytes(make_jpeg(100))
    lake = Lake.at(root / "lake")
    for folder in ("a", "b"):
        run_ingest(lake, Settings(lake=lake.root, runner="local"), str(root / folder))
    return root


@pytest.fixture
def lake(source_lake, tmp_path) -> Lake:
    shutil.copytree(source_lake / "lake", tmp_path / "lake")
    return Lake.at(tmp_path / "lake")


@pytest.fixture
def ids(lake) -> dict[str, str]:
    """``"a/img_00000.jpg"`` -> image_id (and the seq under ``"seq:" + image_id``)."""
    rows = DeltaTable(lake.table_uri("images")).to_pyarrow_table().to_pylist()
    out = {f"{r['collection']}/{r['uri'].rsplit('/', 1)[1]}": r["image_id"] for r in rows}
    out.update({f"seq:{r['image_id']}": r["seq"] for r in rows})
    return out


def metadata_rows(lake: Lake) -> dict[str, dict]:
    return {r["image_id"]: r for r in DeltaTable(lake.table_uri("metadata")).to_pyarrow_table().to_pylist()}


def rejects(lake: Lake, run_id: str) -> list[dict]:
    rows = DeltaTable(lake.table_uri("metadata_rejects")).to_pyarrow_table().to_pylist()
    return sorted((r for r in rows if r["run_id"] == run_id), key=lambda r: r["row_number"])


CSV = """id,Year,Scientific Name,subjects,keywords,catalogued
img_00001,1901,"It's a ""fish""; DROP TABLE metadata; --","[""fish"", ""cod""]",a;b,2020-01-31
img_00002.jpg,1950,Gadus,"[""fish""]",c,2020-02-01
img_00003,1999,Homo,[],,
nothing_like_it,2000,Nope,[],,
img_00000,1800,Ambiguous,[],,
,1,no key,[],,
img_00004,2001,first,[],,
img_00004,2002,second,[],,
"""


def test_csv_by_filename_types_lists_and_rejects(lake, ids, tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text(CSV)
    s = import_metadata(lake, path, key="filename", lists=["keywords"], run_id="r1")
    assert (s.rows, s.imported, s.inserted, s.updated, s.rejected) == (8, 4, 4, 0, 4)
    assert s.reasons == {"no_match": 1, "ambiguous": 1, "missing_key": 1, "duplicate": 1}
    assert s.columns == {"id": "string", "year": "int", "scientific_name": "string", "subjects": "list<string>",
                         "keywords": "list<string>", "catalogued": "date"}
    rows = metadata_rows(lake)
    one = rows[ids["a/img_00001.jpg"]]
    assert one["year"] == 1901 and one["subjects"] == ["fish", "cod"] and one["keywords"] == ["a", "b"]
    assert one["scientific_name"] == "It's a \"fish\"; DROP TABLE metadata; --"
    assert str(one["catalogued"]) == "2020-01-31" and one["source_file"] == str(path) and one["run_id"] == "r1"
    assert rows[ids["a/img_00002.jpg"]]["subjects"] == ["fish"]     # matched with its extension too
    assert rows[ids["a/img_00003.jpg"]]["subjects"] == []
    assert rows[ids["a/img_00004.jpg"]]["scientific_name"] == "second"   # the last row wins
    got = rejects(lake, "r1")
    assert [(r["row_number"], r["reason"]) for r in got] == [
        (4, "no_match"), (5, "ambiguous"), (6, "missing_key"), (7, "duplicate")]
    assert json.loads(got[0]["row"])["Scientific Name"] == "Nope" and got[0]["key"] == "nothing_like_it"
    assert ids["a/img_00000.jpg"] in got[1]["detail"] and ids["b/img_00000.jpg"] in got[1]["detail"]
    assert "row 8" in got[3]["detail"]


def test_collection_scope_resolves_an_ambiguous_file_name(lake, ids, tmp_path):
    path = tmp_path / "b.csv"
    path.write_text("filename,note\nimg_00000.jpg,from b\nimg_00001.jpg,only in a\n")
    s = import_metadata(lake, path, key="filename", collection="b", run_id="r1")
    assert (s.imported, s.reasons) == (1, {"no_match": 1})
    assert metadata_rows(lake)[ids["b/img_00000.jpg"]]["note"] == "from b"


def test_jsonl_by_uri_keeps_native_types(lake, ids, source_lake, tmp_path):
    path = tmp_path / "meta.jsonl"
    uri = str(source_lake / "a" / "img_00005.jpg")
    lines = [{"path": uri, "year": 1900, "keywords": ["x", "y"], "extra": {"k": 1}, "ok": True},
             {"path": "file://" + str(source_lake / "b" / "img_00100.jpg"), "year": None, "keywords": [], "ok": False},
             {"path": "/no/such/file.jpg", "year": 1, "keywords": [], "ok": True}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    s = import_metadata(lake, path, key="uri", run_id="r1")
    assert (s.imported, s.reasons) == (2, {"no_match": 1})
    assert s.columns == {"path": "string", "year": "int", "keywords": "list<string>", "extra": "string", "ok": "bool"}
    row = metadata_rows(lake)[ids["a/img_00005.jpg"]]
    assert (row["keywords"], json.loads(row["extra"]), row["ok"]) == (["x", "y"], {"k": 1}, True)
    assert metadata_rows(lake)[ids["b/img_00100.jpg"]]["ok"] is False


def test_parquet_by_image_id(lake, ids, tmp_path):
    path = tmp_path / "meta.parquet"
    pq.write_table(pa.table({
        "sha256": [ids["a/img_00001.jpg"].upper(), "f" * 64, "not-an-id"],
        "score": pa.array([0.5, 1.0, 2.0], pa.float32()),
        "tags": [["a"], ["b"], []],
        "seen": pa.array([1_600_000_000_000_000, None, None], pa.timestamp("us")),
    }), path)
    s = import_metadata(lake, path, key="image_id", run_id="r1")
    assert (s.imported, s.reasons) == (1, {"no_match": 1, "malformed_key": 1})
    assert s.columns == {"score": "float", "tags": "list<string>", "seen": "timestamp"}  # the key is image_id itself
    row = metadata_rows(lake)[ids["a/img_00001.jpg"]]
    assert row["score"] == 0.5 and row["tags"] == ["a"] and row["seen"].year == 2020 and row["seen"].tzinfo


def test_reimport_updates_rows_and_new_columns_evolve_the_schema(lake, ids, tmp_path):
    first = tmp_path / "first.csv"
    first.write_text("id,year,title\nimg_00001,1900,one\nimg_00002,1901,two\nimg_00003,1902,three\n")
    import_metadata(lake, first, key="filename", run_id="r1")
    second = tmp_path / "second.csv"
    second.write_text('id,year,subjects\nimg_00001,1999,"[""fish""]"\nimg_00005,2005,[]\n')
    s = import_metadata(lake, second, key="filename", run_id="r2")
    assert (s.inserted, s.updated, s.new_columns) == (1, 1, ["subjects"])
    rows = metadata_rows(lake)
    assert (rows[ids["a/img_00001.jpg"]]["year"], rows[ids["a/img_00001.jpg"]]["title"]) == (1999, "one")
    assert rows[ids["a/img_00001.jpg"]]["subjects"] == ["fish"] and rows[ids["a/img_00002.jpg"]]["subjects"] is None
    assert rows[ids["a/img_00005.jpg"]]["run_id"] == "r2" and rows[ids["a/img_00002.jpg"]]["run_id"] == "r1"
    # the same import again is the same content (MERGE on image_id)
    import_metadata(lake, second, key="filename", run_id="r3")
    assert len(metadata_rows(lake)) == 4
    # plain string files, so deltalake's own dataset can filter them (MERGE's string_view files could not)
    import pyarrow.dataset as pads
    dataset = DeltaTable(lake.table_uri("metadata")).to_pyarrow_dataset()
    assert dataset.to_table(filter=pads.field("run_id") == "r3").num_rows == 2
    columns = {c["name"]: c["type"] for c in metadata_columns(lake)}
    assert columns == {"image_id": "string", "source_file": "string", "run_id": "string", "imported_at": "timestamp",
                       "id": "string", "year": "int", "title": "string", "subjects": "list<string>"}


def test_sql_sandbox_joins_the_evolving_table(lake, ids, tmp_path):
    sandbox = SqlSandbox(lake, Settings(lake=lake.root, refresh_s=0.0))
    try:
        assert sandbox.query("SELECT count(*) FROM metadata").rows == [(0,)]
        (tmp_path / "1.csv").write_text("id,year\nimg_00001,1900\nimg_00002,1950\n")
        import_metadata(lake, tmp_path / "1.csv", key="filename", run_id="r1")
        (tmp_path / "2.csv").write_text("id,subjects\nimg_00003,\"[\"\"cod\"\"]\"\n")   # a file of the new schema only
        import_metadata(lake, tmp_path / "2.csv", key="filename", run_id="r2")
        result = sandbox.query("SELECT i.collection, m.year, m.subjects FROM images i JOIN metadata m "
                               "USING (image_id) ORDER BY m.year NULLS LAST")
        assert result.rows == [("a", 1900, None), ("a", 1950, None), ("a", None, ["cod"])]
    finally:
        sandbox.close()


def test_type_overrides_and_conflicts(lake, ids, tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,year,code\nimg_00001,1900,007\nimg_00002,nineteen,008\nimg_00003,1.5,009\n")
    s = import_metadata(lake, path, key="filename", types={"year": "int"}, run_id="r1")
    assert s.columns["code"] == "string"            # leading zeros keep a column text
    assert [(r["row_number"], r["reason"]) for r in rejects(lake, "r1")] == [(2, "bad_value"), (3, "bad_value")]
    assert "year: nineteen is not int" in rejects(lake, "r1")[0]["detail"]
    with pytest.raises(BadInput, match="is int in the lake"):
        import_metadata(lake, path, key="filename", types={"year": "string"}, run_id="r2")
    with pytest.raises(BadInput, match="unknown type"):
        from lake.metadata import parse_type_overrides
        parse_type_overrides(["year=banana"])
    with pytest.raises(BadInput, match="not a column of the file"):
        import_metadata(lake, path, key="filename", types={"nope": "int"}, run_id="r3")
    with pytest.raises(BadInput, match="no key column"):
        import_metadata(lake, path, key="uri", run_id="r4")
    (tmp_path / "bad.csv").write_text("id,run_id\nimg_00001,x\n")
    with pytest.raises(BadInput, match="reserved"):
        import_metadata(lake, tmp_path / "bad.csv", key="filename", run_id="r5")


# -- the filter language ------------------------------------------------------------------------

@pytest.fixture
def described(lake, ids, tmp_path) -> Lake:
    path = tmp_path / "described.csv"
    path.write_text(
        "id,year,title,subjects,found\n"
        'img_00000,1900,plain,"[""fish"", ""Cod""]",2020-01-01\n'
        "img_00001,1950,\"x' OR 1=1 --\",\"[\"\"bird\"\"]\",2021-06-01\n"
        'img_00002,2000,"a; DROP TABLE images; --","[""fish""]",\n'
        'img_00003,,"quote\'s",[],\n')
    import_metadata(lake, path, key="filename", collection="a", run_id="r1")
    return lake


def seqs_of(ids, *names):
    return sorted(ids[f"seq:{ids['a/' + n + '.jpg']}"] for n in names)


@pytest.mark.parametrize("flt, expected", [
    ({"year": {">=": 1950}}, ["img_00001", "img_00002"]),
    ({"year": {">": 1800, "lt": 1960}}, ["img_00000", "img_00001"]),
    ({"subjects": {"contains": "FISH"}}, ["img_00000", "img_00002"]),
    ({"subjects": "Cod"}, ["img_00000"]),
    ({"subjects": ["bird", "cod"]}, ["img_00001"]),
    ({"subjects": {"is_null": True}, "run_id": "r1"}, ["img_00003"]),
    ({"year": None, "metadata.run_id": {"is_null": False}}, ["img_00003"]),
    ({"year": None, "collection": "a"}, ["img_00003", "img_00004", "img_00005"]),   # no metadata row: null
    ({"found": {">=": "2021-01-01"}}, ["img_00001"]),
    ({"$or": [{"year": 1900}, {"title": {"contains": "DROP"}}]}, ["img_00000", "img_00002"]),
    ({"$not": {"subjects": {"contains": "fish"}}, "collection": "a", "images.format": "JPEG"}, ["img_00001", "img_00003"]),
    ({"title": "x' OR 1=1 --"}, ["img_00001"]),
    ({"title": "a; DROP TABLE images; --"}, ["img_00002"]),
    ({"title": "quote's"}, ["img_00003"]),
    ({"title": "' OR 1=1 --"}, []),
    ({"title": {"in": ["'); DROP TABLE metadata; --", "plain"]}}, ["img_00000"]),
])
def test_filter_matches_and_values_are_data(described, ids, flt, expected):
    assert matching_seqs(described, flt).tolist() == seqs_of(ids, *expected)
    assert matching_seqs(described, json.dumps(flt)).dtype == np.int64


def test_filter_compiles_to_bound_parameters():
    sql, params = compile_filter({"title": "x'; DROP TABLE t; --", "year": {">=": 1900}},
                                 {"title": pa.string(), "year": pa.int64()})
    assert "DROP" not in sql and "'" not in sql and sql.count("?") == 2
    assert params == ["x'; DROP TABLE t; --", 1900]
    assert compile_filter(None, {}) == ("TRUE", [])


@pytest.mark.parametrize("flt, message", [
    ({'year" OR 1=1 --': 1}, "unknown filter column"),
    ({"year": {"; DROP": 1}}, "unknown operator"),
    ({"year": "1900"}, "does not fit column 'year'"),
    ({"year": {"contains": 1}}, "contains works on text"),
    ({"subjects": {">": "a"}}, "does not apply to the list column"),
    ({"found": "yesterday"}, "not an ISO 8601 date"),
    ({"$or": []}, "non-empty array"),
    ("[1, 2]", "JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_filters_are_clear_errors(described, flt, message):
    with pytest.raises(BadInput, match=message):
        matching_seqs(described, flt)


def test_facets_count_values_and_explode_lists(described):
    con = lake_connection(described)
    try:
        subjects = facet_counts(con, "subjects")
        assert subjects["values"] == [{"value": "fish", "count": 2}, {"value": "Cod", "count": 1},
                                      {"value": "bird", "count": 1}]
        assert (subjects["images"], subjects["missing"], subjects["distinct"]) == (8, 5, 3)
        top = facet_counts(con, "collection", limit=1, filter={"year": {">=": 1900}})
        assert top["values"] == [{"value": "a", "count": 3}] and top["truncated"] is False
        with pytest.raises(NotFound, match="no column"):
            facet_counts(con, 'year"; DROP TABLE images; --')
    finally:
        con.close()


# -- the API ------------------------------------------------------------------------------------

def test_get_image_shows_its_metadata(described, ids, client):
    body = client.get(f"{API}/images/{ids['a/img_00001.jpg']}").get_json()
    meta = body["image"]["metadata"]
    assert meta["year"] == 1950 and meta["subjects"] == ["bird"] and meta["found"] == "2021-06-01"
    assert meta["run_id"] == "r1" and "image_id" not in meta
    assert client.get(f"{API}/images/{ids['b/img_00100.jpg']}").get_json()["image"]["metadata"] == {}


def test_facets_route(described, client):
    body = client.get(f"{API}/facets?column=subjects&limit=2").get_json()
    assert body["ok"] and body["values"] == [{"value": "fish", "count": 2}, {"value": "Cod", "count": 1}]
    assert body["truncated"] is True and body["type"] == "list<string>"
    where = json.dumps({"title": "x' OR 1=1 --"})
    assert client.get(f"{API}/facets", query_string={"column": "year", "where": where}).get_json()["values"] == [
        {"value": 1950, "count": 1}]
    for query, status in [({"column": "nope"}, 404), ({}, 400), ({"column": "year", "limit": "0"}, 400),
                          ({"column": "year", "limit": "x"}, 400), ({"column": "year", "where": "{bad"}, 400),
                          ({"column": "year", "where": '{"year": "x"}'}, 400)]:
        response = client.get(f"{API}/facets", query_string=query)
        assert response.status_code == status and response.get_json()["ok"] is False


def test_sql_route_sees_metadata_columns(described, client):
    body = client.post(f"{API}/sql", json={"sql": "SELECT m.title, i.width FROM metadata m JOIN images i "
                                                  "USING (image_id) WHERE m.year = 1900"}).get_json()
    assert body["rows"] == [["plain", 64]]


# -- the CLI ------------------------------------------------------------------------------------

def test_cli_import_and_columns(lake, tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("file,year,kw\nimg_00001.jpg,1900,a|b\nmissing.jpg,1,c\n")
    code = main(["--lake", lake.root, "metadata", "import", str(path), "--key", "filename", "--collection", "a",
                 "--list", "kw", "--list-sep", "|", "--type", "year=float"])
    out = capsys.readouterr().out
    assert code == 0 and "2 rows read" in out and "1 imported (1 new, 0 updated), 1 rejected" in out
    assert "no_match 1" in out and "row 2 key 'missing.jpg'" in out and "kw (list<string>)" in out
    assert main(["--lake", lake.root, "metadata", "columns"]) == 0
    out = capsys.readouterr().out
    assert "year" in out and "float" in out and "list<string>" in out
    runs = DeltaTable(lake.table_uri("job_runs")).to_pyarrow_table().to_pylist()
    assert any(r["job"] == "metadata" and r["state"] == "succeeded" and r["rows_out"] == 1 for r in runs)


@pytest.mark.parametrize("args, message", [
    (["/no/such.csv", "--key", "filename"], "no such metadata file"),
    (["{csv}", "--key", "filename", "--type", "year=banana"], "unknown type"),
    (["{csv}", "--key", "filename", "--type", "year"], "COLUMN=TYPE"),
    (["{csv}", "--key", "filename", "--key-column", "nope"], "no column 'nope'"),
    (["{txt}", "--key", "filename"], "cannot tell the format"),
    (["{txt}", "--key", "filename", "--format", "parquet"], "cannot read"),
])
def test_cli_mistakes_exit_2(lake, tmp_path, capsys, args, message):
    (tmp_path / "m.csv").write_text("id,year\nimg_00001,1900\n")
    (tmp_path / "m.txt").write_text("not metadata")
    args = [a.format(csv=tmp_path / "m.csv", txt=tmp_path / "m.txt") for a in args]
    assert main(["--lake", lake.root, "metadata", "import", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imagelake: error:") and message in err[0]
    assert metadata_rows(lake) == {}


def test_cli_unknown_key_kind_exits_2(lake, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--lake", lake.root, "metadata", "import", str(tmp_path / "m.csv"), "--key", "title"])
    assert exc.value.code == 2
