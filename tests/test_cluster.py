"""The cluster job on real embeddings: planted near-duplicates among distinct photo-like scenes,
ingested and embedded once (LocalRunner), then clustered in a copy of that lake per test; one run
through real Spark; the API routes and `imagelake export`."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import duckdb
import pytest
from PIL import Image

from imagelake.cli import main
from jobs.cluster import check_sim, current_state, run_cluster
from jobs.embed import run_embed
from jobs.ingest.driver import run_ingest
from jobs.runner import LocalRunner, SparkRunner
from lake.catalog import Lake
from lake.commit import open_table
from lake.errors import BadInput
from lake.settings import Settings
from planted_images import write_planted


@pytest.fixture
def lake(planted_copy) -> Lake:
    return planted_copy


def _names(lake: Lake) -> dict[str, str]:
    con = duckdb.connect()
    con.register("images", open_table(lake, "images").to_pyarrow_dataset())
    return {i: os.path.basename(u) for i, u in con.sql("SELECT image_id, uri FROM images").fetchall()}


def _groups(lake: Lake, run_id: str) -> list[set[str]]:
    names = _names(lake)
    con = duckdb.connect()
    con.register("clusters", open_table(lake, "clusters").to_pyarrow_dataset())
    rows = con.sql(f"SELECT cluster_id, list(image_id) FROM clusters WHERE kind = 'dup' AND run_id = '{run_id}' "
                   "GROUP BY 1").fetchall()
    return [{names[i] for i in ids} for _, ids in rows]


def _id_groups(lake: Lake, run_id: str) -> set[frozenset[str]]:
    con = duckdb.connect()
    con.register("clusters", open_table(lake, "clusters").to_pyarrow_dataset())
    rows = con.sql(f"SELECT list(image_id) FROM clusters WHERE kind = 'dup' AND run_id = '{run_id}' GROUP BY cluster_id")
    return {frozenset(ids) for (ids,) in rows.fetchall()}


def _scene(name: str) -> str:
    return name.split(".")[0].rsplit("_", 1)[0] if name.count("_") > 1 else name.split(".")[0]


def test_planted_duplicates_are_grouped_and_distinct_images_are_not(lake, planted, local_settings):
    # 180 images are too few for the PCA (< 4 x 128), so the full embedding is used; at sim 0.8 it
    # groups every planted pair (the default 0.85 was chosen on 2,200 images with PCA; the benchmark)
    summary = run_cluster(lake, local_settings, sim=0.8, runner=LocalRunner())
    groups = _groups(lake, summary["run_id"])
    pairs = planted[2]
    together = [any({a, b} <= g for g in groups) for a, b, _ in pairs]
    assert all(together), [p for p, ok in zip(pairs, together) if not ok]
    # every group is one scene and its variant: no distinct scenes joined
    mixed = [g for g in groups if len({_scene(n) for n in g}) > 1]
    assert len(mixed) == 0, mixed
    assert summary["dup_groups"] == len(pairs) == len(groups)
    assert summary["dup_index"] == "flat" and summary["thumbnails_missing"] == 0


def test_sim_one_means_identical_only(lake, local_settings):
    summary = run_cluster(lake, local_settings, sim=1.0, runner=LocalRunner())
    assert summary["dup_groups"] == 0  # identical bytes are one image already; no variant is identical
    low = run_cluster(lake, local_settings, sim=0.0, runner=LocalRunner())
    assert low["dup_groups"] == 1 and low["dup_images"] == low["images"]


def test_topics_levels_and_incremental_assignment(lake, tmp_path, local_settings, planted):
    first = run_cluster(lake, local_settings, sim=0.8, levels=[4], runner=LocalRunner())
    assert first["topic_fitted"] and first["k"] == 9 and first["levels"] == [9, 4]  # round(sqrt(180/2)) = 9
    assert current_state(lake).topic_model == first["run_id"] and first["dup_mode"] == "full"
    # new images arrive: 6 scenes, 2 variants of them, and a recompressed copy of an old image
    write_planted(tmp_path / "more", 6, 2, seed=99)
    old = sorted(Path(planted[1]).rglob("scene_*.jpg"))[0]
    Image.open(old).save(tmp_path / "more" / "old_copy.jpg", "JPEG", quality=60)
    run_ingest(lake, local_settings, str(tmp_path / "more"), runner=LocalRunner())
    run_embed(lake, local_settings, runner=LocalRunner())
    shutil.copytree(lake.root, tmp_path / "full")       # the same lake for a full run beside it
    second = run_cluster(lake, local_settings, sim=0.8, runner=LocalRunner())
    assert not second["topic_fitted"] and second["topic_assigned"] == 9
    assert second["topic_model"] == first["run_id"]
    # incremental: descriptors and pairs of the 9 new images only, the same groups as a full run
    assert second["dup_mode"] == "incremental" and second["dup_new"] == 9 and second["images"] == 189
    full_lake = Lake.at(tmp_path / "full")
    full = run_cluster(full_lake, local_settings, sim=0.8, full=True, runner=LocalRunner())
    assert full["dup_mode"] == "full" and full["images"] == 189
    groups = _id_groups(lake, second["run_id"])
    assert groups == _id_groups(full_lake, full["run_id"]) and second["dup_groups"] > first["dup_groups"]
    copy_id = hashlib.sha256((tmp_path / "more" / "old_copy.jpg").read_bytes()).hexdigest()
    old_id = hashlib.sha256(old.read_bytes()).hexdigest()
    assert any({copy_id, old_id} <= g for g in groups)           # the copy joined its old original's group
    assert not os.path.exists(lake.artifacts_dir("clusters", f"dups-{first['run_id']}"))  # the old state went
    con = duckdb.connect()
    con.register("clusters", open_table(lake, "clusters").to_pyarrow_dataset())
    per_image = con.sql(f"SELECT count(DISTINCT image_id), count(*) FROM clusters WHERE kind = 'topic' "
                        f"AND model_run = '{first['run_id']}'").fetchall()[0]
    assert per_image == (189, 189 * 2)  # every image once per level, none moved
    third = run_cluster(lake, local_settings, sim=0.8, runner=LocalRunner())
    assert third["topic_assigned"] == 0 and not third["topic_fitted"]
    assert third["dup_mode"] == "incremental" and third["dup_new"] == 0 and third["dup_groups"] == second["dup_groups"]
    again = run_cluster(lake, local_settings, recluster=True, k=5, runner=LocalRunner())
    assert again["topic_fitted"] and again["topic_assigned"] == 189 and again["k"] == 5
    assert again["dup_mode"] == "full"


def test_corrupt_topic_model_is_refitted(lake, local_settings):
    first = run_cluster(lake, local_settings, runner=LocalRunner())
    centroids = Path(lake.artifacts_dir("clusters", first["run_id"], "centroids.npy"))
    centroids.write_bytes(centroids.read_bytes()[:-8] + b"\0" * 8)
    second = run_cluster(lake, local_settings, runner=LocalRunner())
    assert second["topic_fitted"] and second["topic_model"] == second["run_id"]


def test_bad_sim_is_refused(lake, local_settings, capsys):
    for bad in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(BadInput):
            check_sim(bad)
    assert main(["--lake", lake.root, "--runner", "local", "cluster", "--sim", "2"]) == 2
    assert "sim must be a number from 0 to 1" in capsys.readouterr().err
    assert main(["--lake", lake.root, "--runner", "local", "cluster", "--levels", "a,b"]) == 2


def test_cli_cluster_and_export(lake, tmp_path, capsys):
    assert main(["--lake", lake.root, "--runner", "local", "cluster", "--no-progress"]) == 0
    assert "near-duplicate groups" in capsys.readouterr().out
    state = current_state(lake)
    con = duckdb.connect()
    con.register("clusters", open_table(lake, "clusters").to_pyarrow_dataset())
    cid = con.sql(f"SELECT cluster_id FROM clusters WHERE run_id = '{state.run_id}' AND kind = 'dup' LIMIT 1").fetchall()[0][0]
    out = tmp_path / "export"
    assert main(["--lake", lake.root, "export", "--cluster", cid, "--to", str(out)]) == 0
    links = sorted(out.iterdir())
    assert len(links) == 2 and all(p.is_symlink() and p.resolve().is_file() for p in links)
    assert main(["--lake", lake.root, "export", "--cluster", cid, "--to", str(out)]) == 2  # not empty
    assert main(["--lake", lake.root, "export", "--cluster", "nope", "--to", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    assert main(["--lake", lake.root, "export", "--bucket", "b1", "--to", str(tmp_path / "y")]) == 2
    assert "malformed bucket id" in capsys.readouterr().err
    assert main(["--lake", lake.root, "export", "--bucket", "0" * 16, "--to", str(tmp_path / "y")]) == 2
    assert "no bucket" in capsys.readouterr().err


def test_api_clusters(lake, client, local_settings):
    empty = client.get("/api/v1/clusters").get_json()
    assert empty["ok"] and empty["clusters"] == [] and empty["run_id"] is None
    summary = run_cluster(lake, local_settings, levels=[3], runner=LocalRunner())
    body = client.get("/api/v1/clusters?kind=dup&limit=5").get_json()
    assert body["total"] == summary["dup_groups"] and len(body["clusters"]) == 5
    assert all(c["size"] == 2 for c in body["clusters"])
    one = client.get(f"/api/v1/clusters/{body['clusters'][0]['cluster_id']}").get_json()
    assert one["kind"] == "dup" and len(one["members"]) == 2 and one["members"][0]["score"] >= local_settings.dup_sim - 1e-5
    topics = client.get("/api/v1/clusters?kind=topic").get_json()
    assert topics["levels"] == [3, 9] and topics["level"] == 3
    assert sum(c["size"] for c in topics["clusters"]) == summary["images"]
    fine = client.get("/api/v1/clusters?kind=topic&level=9&limit=2&offset=1").get_json()
    assert fine["total"] == 9 and len(fine["clusters"]) == 2
    members = client.get(f"/api/v1/clusters/{fine['clusters'][0]['cluster_id']}?limit=1").get_json()
    assert members["size"] == fine["clusters"][0]["size"] and len(members["members"]) == 1
    member = one["members"][0]["image_id"]
    mine = client.get(f"/api/v1/images/{member}/clusters").get_json()["clusters"]
    assert {"kind": "dup", "cluster_id": one["cluster_id"]} in [{k: c[k] for k in ("kind", "cluster_id")} for c in mine]
    assert sorted(c["level"] for c in mine if c["kind"] == "topic") == [3, 9]
    assert client.get(f"/api/v1/images/{'0' * 64}/clusters").status_code == 404
    for url, status in [("/api/v1/clusters?kind=bad", 400), ("/api/v1/clusters?kind=topic&level=7", 400),
                        ("/api/v1/clusters?kind=topic&level=x", 400), ("/api/v1/clusters/bad%20id!", 400),
                        ("/api/v1/clusters/no-such-cluster", 404), ("/api/v1/clusters?limit=0", 400)]:
        r = client.get(url)
        assert r.status_code == status and r.get_json()["ok"] is False, url


@pytest.mark.spark
def test_cluster_on_spark_matches_local(lake, spark, local_settings):
    local = run_cluster(lake, local_settings, runner=LocalRunner())
    on_spark = run_cluster(lake, Settings(lake=lake.root), runner=SparkRunner(Settings(lake=lake.root), spark=spark))
    assert on_spark["thumbnails_missing"] == 0
    assert sorted(map(sorted, _groups(lake, on_spark["run_id"]))) == sorted(map(sorted, _groups(lake, local["run_id"])))
