"""Bucket exports at a point of the log (Delta time travel of bucket_events) and diffs between two
points: the HTTP routes through the Flask client and the CLI's ``export --bucket``."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from api import API_PREFIX
from conftest import write_images
from imagelake.cli import main
from jobs.ingest.driver import run_ingest
from jobs.runner import LocalRunner
from lake.catalog import Lake
from lake.commit import ensure_tables, open_table
from lake.settings import Settings

B = f"{API_PREFIX}/buckets"


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """A lake of 12 images and a bucket log with a known story; returns what a person replaying it
    by hand expects at each point (members in joining order)."""
    from api import create_app
    from lake.tokens import create_token

    root = tmp_path_factory.mktemp("export")
    write_images(root / "imgs", 12)
    lake = Lake.at(root / "lake")
    ensure_tables(lake)
    run_ingest(lake, Settings(lake=lake.root, runner="local"), str(root / "imgs"), runner=LocalRunner())
    rows = open_table(lake, "images").to_pyarrow_table(columns=["image_id", "seq", "uri"]).to_pylist()
    rows.sort(key=lambda r: r["seq"])
    ids = [r["image_id"] for r in rows]
    app = create_app(Settings().replace(lake=lake.root, refresh_s=0.0), {"TESTING": True})
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {create_token(lake, 'admin', 'export test')[1]}"

    def post(path, body, status=200):
        r = client.post(path, json=body)
        assert r.status_code == status, r.get_json()
        return r.get_json()

    def version():
        return client.get(B).get_json()["version"]

    a = post(B, {"name": "cats a/b"}, 201)["bucket"]["bucket_id"]
    b = post(B, {"name": "dogs"}, 201)["bucket"]["bucket_id"]
    post(f"{B}/{a}/images", {"image_ids": ids[0:5]})
    v1 = version()
    time.sleep(0.05)
    t1 = dt.datetime.now(dt.timezone.utc)
    time.sleep(0.05)
    post(f"{B}/{b}/images", {"image_ids": [ids[1]], "from": a, "mode": "move"})   # 1 leaves a
    client.delete(f"{B}/{a}/images/{ids[2]}", json={})                             # 2 leaves a
    post(f"{API_PREFIX}/discard", {"image_ids": [ids[3]], "from": a})             # 3 leaves a
    post(f"{B}/{a}/images", {"image_ids": [ids[6], ids[7]]})                       # 6, 7 join
    post(f"{B}/{a}/images", {"image_ids": [ids[8]]})                               # 8 joins ...
    post(f"{API_PREFIX}/undo", {})                                                 # ... and is undone
    post(f"{B}/{a}/feedback", {"accepted": [ids[9]], "rejected": [ids[0]]})        # 9 joins, 0 leaves
    client.patch(f"{B}/{a}", json={"name": "kittens"})
    v2 = version()
    expected = {v1: [ids[0], ids[1], ids[2], ids[3], ids[4]], v2: [ids[4], ids[6], ids[7], ids[9]]}
    yield {"lake": lake, "root": root, "ids": ids, "a": a, "b": b, "v1": v1, "v2": v2, "t1": t1,
           "expected": expected, "client": client, "app": app, "uris": {r["image_id"]: r["uri"] for r in rows}}
    app.extensions["imagelake"].close()


def _ok_export(client, path, **query):
    r = client.get(path, query_string=query)
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    return r


def _err(client, path, status, **query):
    r = client.get(path, query_string=query)
    body = r.get_json()
    assert r.status_code == status, body
    assert body["ok"] is False and body["status"] == status and body["error"], body
    return body["error"]


def test_an_as_of_export_equals_the_state_replayed_by_hand(story):
    client, a = story["client"], story["a"]
    for point, want in ((dict(version=story["v1"]), story["v1"]), (dict(as_of=story["t1"].isoformat()), story["v1"]),
                        (dict(version=story["v2"]), story["v2"]), ({}, story["v2"])):
        r = _ok_export(client, f"{B}/{a}/export", format="csv", **point)
        rows = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
        assert [row["image_id"] for row in rows] == story["expected"][want], point
        assert {row["log_version"] for row in rows} == {str(want)}
        assert {row["bucket_id"] for row in rows} == {a}
        assert {row["label"] for row in rows} == {"cats a/b" if want == story["v1"] else "kittens"}
        assert all(row["path"] == story["uris"][row["image_id"]] for row in rows)
        assert r.headers["X-Bucket-Members"] == str(len(rows))
        assert "attachment" in r.headers["Content-Disposition"]
    # the other bucket: the moved image joined it after v1
    r = _ok_export(client, f"{B}/{story['b']}/export", format="json")
    assert [row["image_id"] for row in r.get_json()["rows"]] == [story["ids"][1]]
    assert _ok_export(client, f"{B}/{story['b']}/export", format="json", version=story["v1"]).get_json()["rows"] == []


def test_json_parquet_and_zip_hold_the_same_members(story):
    client, a, want = story["client"], story["a"], story["expected"][story["v2"]]
    body = _ok_export(client, f"{B}/{a}/export", format="json").get_json()
    assert [r["image_id"] for r in body["rows"]] == want and "joined_seq" in body["columns"]
    table = pq.read_table(io.BytesIO(_ok_export(client, f"{B}/{a}/export", format="parquet").get_data()))
    assert table.column("image_id").to_pylist() == want
    assert table.column("log_version").to_pylist() == [story["v2"]] * len(want)
    r = _ok_export(client, f"{B}/{a}/export", format="zip", version=story["v1"])
    assert r.mimetype == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.get_data())) as zf:
        names = zf.namelist()
        assert names[0] == "manifest.csv" and len(names) == 1 + len(story["expected"][story["v1"]])
        for name, image_id in zip(names[1:], story["expected"][story["v1"]]):
            original = Path(story["uris"][image_id].removeprefix("file://")).read_bytes()
            assert zf.read(name) == original
    story["app"].config["IMAGELAKE_EXPORT_ZIP_MAX_BYTES"] = 100
    try:
        assert "limited to" in _err(client, f"{B}/{a}/export", 413, format="zip")
    finally:
        story["app"].config.pop("IMAGELAKE_EXPORT_ZIP_MAX_BYTES")


def test_diff_lists_what_joined_and_left(story):
    client, a, ids = story["client"], story["a"], story["ids"]
    body = client.get(f"{B}/{a}/diff", query_string={"from": story["v1"], "to": story["v2"]}).get_json()
    assert body["ok"] is True
    assert body["joined"] == [ids[6], ids[7], ids[9]] and body["left"] == [ids[0], ids[1], ids[2], ids[3]]
    assert (body["from_version"], body["to_version"], body["from_count"], body["to_count"]) == (story["v1"], story["v2"], 5, 4)
    by_time = client.get(f"{B}/{a}/diff", query_string={"from": story["t1"].isoformat()}).get_json()
    assert (by_time["joined"], by_time["left"]) == (body["joined"], body["left"])
    # before the bucket existed: everything joined
    first = client.get(f"{B}/{a}/diff", query_string={"from": 0, "to": story["v1"]}).get_json()
    assert first["joined"] == story["expected"][story["v1"]] and first["left"] == []


def test_bad_parameters_are_400_or_404_with_the_error_shape(story):
    client, a = story["client"], story["a"]
    assert "format must be" in _err(client, f"{B}/{a}/export", 400, format="xls")
    assert "version must be" in _err(client, f"{B}/{a}/export", 400, version="two")
    assert "not both" in _err(client, f"{B}/{a}/export", 400, version=1, as_of="2026-01-01T00:00:00")
    assert "as_of must be" in _err(client, f"{B}/{a}/export", 400, as_of="last tuesday")
    assert "versions are 0 to" in _err(client, f"{B}/{a}/export", 404, version=10_000)
    assert "malformed bucket id" in _err(client, f"{B}/NOPE/export", 400)
    assert "did not exist" in _err(client, f"{B}/{'0' * 16}/export", 404)
    assert "from is required" in _err(client, f"{B}/{a}/diff", 400)
    assert "from as_of must be" in _err(client, f"{B}/{a}/diff", 400, **{"from": "soon"})
    assert "versions are 0 to" in _err(client, f"{B}/{a}/diff", 404, **{"from": 0, "to": 10_000})
    paths = client.get(f"{API_PREFIX}/openapi.json").get_json()["paths"]
    assert "/buckets/{bucket_id}/export" in paths and "/buckets/{bucket_id}/diff" in paths
    assert {p["name"] for p in paths["/buckets/{bucket_id}/export"]["get"]["parameters"]} >= {"format", "version", "as_of"}


def test_cli_exports_a_bucket_as_of_a_version_in_each_format(story, tmp_path, capsys):
    lake, a, v1 = story["lake"], story["a"], story["v1"]
    want = story["expected"][v1]
    base = ["--lake", str(lake.root), "export", "--bucket", a]
    assert main([*base, "--version", str(v1), "--format", "csv", "--to", str(tmp_path / "m.csv")]) == 0
    assert f"bucket_events version {v1}" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert [r["image_id"] for r in rows] == want
    assert main([*base, "--as-of", story["t1"].isoformat(), "--format", "parquet", "--to", str(tmp_path / "m.parquet")]) == 0
    assert pq.read_table(tmp_path / "m.parquet").column("image_id").to_pylist() == want
    assert main([*base, "--version", str(v1), "--to", str(tmp_path / "links")]) == 0
    links = sorted(p for p in (tmp_path / "links").iterdir() if p.is_symlink())
    assert [p.resolve().read_bytes() for p in links] == \
        [Path(story["uris"][i].removeprefix("file://")).read_bytes() for i in want]
    assert (tmp_path / "links" / "manifest.csv").exists()
    assert main([*base, "--format", "imagefolder", "--to", str(tmp_path / "hf")]) == 0
    meta = list(csv.DictReader((tmp_path / "hf" / "metadata.csv").open()))
    assert [m["image_id"] for m in meta] == story["expected"][story["v2"]]
    assert {m["label"] for m in meta} == {"kittens"} and all((tmp_path / "hf" / m["file_name"]).is_file() for m in meta)
    capsys.readouterr()
    assert main([*base, "--as-of", "tuesday", "--format", "csv", "--to", str(tmp_path / "x.csv")]) == 2
    assert "as_of must be" in capsys.readouterr().err
    assert main([*base, "--version", "999999", "--format", "csv", "--to", str(tmp_path / "y.csv")]) == 2
    assert main([*base, "--format", "csv", "--to", str(tmp_path / "m.csv")]) == 2  # exists: nothing overwritten
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "y.csv").exists()
