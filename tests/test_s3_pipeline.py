"""The pipeline on an object-store lake: ``imagelake run`` (the real CLI, Spark runner) into
``s3://<bucket>/lake`` on the loopback S3 server (``tests/s3_server.py``, moto's real HTTP S3), two
runs started at once (one proceeds, the other exits 3), and the same run on a local lake for
comparison: row counts, image ids and near-duplicate groups must be equal.

Every step but ``outliers`` (kept out to keep this test short; it runs on an object-store lake,
on a standalone cluster, in tests/test_s3_cluster.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from photo_lake import write_photos
from s3_server import S3Server

REPO = Path(__file__).resolve().parent.parent
STEPS = "ingest,quality,embed,suggest,index,cluster,tag,grid"
pytestmark = pytest.mark.spark


def _cli(cwd: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imagelake", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _images(folder: Path) -> None:
    """36 photo views of 12 scenes, plus 3 near-duplicates (one pixel changed) and 2 exact copies."""
    write_photos(folder, per_class=3)
    for i, name in enumerate(("astronaut", "coffee", "rocket")):
        src = folder / name / "photo_00000.png"
        im = Image.open(src).convert("RGB")
        im.putpixel((0, 0), tuple(255 - v for v in im.getpixel((0, 0))))
        im.save(folder / name / "near_dup.png")
        if i < 2:
            shutil.copy(src, folder / name / "exact_copy.png")


def _tables(root: str, storage_options: dict | None) -> dict:
    from deltalake import DeltaTable

    def rows(name, cols):
        return DeltaTable(f"{root}/tables/{name}", storage_options=storage_options).to_pyarrow_table(
            columns=cols).to_pylist()

    images = rows("images", ["image_id", "seq"])
    clusters = rows("clusters", ["run_id", "image_id", "kind", "cluster_id"])
    runs = rows("job_runs", ["run_id", "job", "state"])
    cluster_run = max(r["run_id"] for r in runs if r["job"] == "cluster" and r["state"] == "succeeded")
    dup: dict[str, set] = {}
    for r in clusters:
        if r["kind"] == "dup" and r["run_id"] == cluster_run:
            dup.setdefault(r["cluster_id"], set()).add(r["image_id"])
    return {
        "image_ids": sorted(r["image_id"] for r in images),
        "seqs": sorted(r["seq"] for r in images),
        "counts": {t: len(rows(t, None)) for t in ("images", "sources", "thumbnails", "features", "rejects",
                                                   "image_quality", "grid", "grid_layouts")},
        "dup_groups": sorted(sorted(g) for g in dup.values() if len(g) > 1),
        "tags": len(rows("tags", ["image_id"])),
        "failed": [r for r in runs if r["state"] == "failed"],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One S3 server; the images; two runs at once on the s3 lake and one on a local lake."""
    base = tmp_path_factory.mktemp("s3pipe")
    src = base / "images"
    _images(src)
    server = S3Server()
    try:
        opts = server.storage_options()
        root = f"s3://{server.make_bucket()}/lake"
        env = dict(os.environ, PYTHONPATH=str(REPO), IMAGELAKE_MASTER="local[2]",
                   XDG_CACHE_HOME=str(base / "xdg-cache"), **opts)
        cwd = base / "cwd"  # no step may write an "s3:" folder here instead of the bucket
        cwd.mkdir()
        t0 = time.monotonic()
        procs = [_cli(cwd, env, "--lake", root, "run", "--images", str(src), "--steps", STEPS, "--no-progress")
                 for _ in range(2)]
        results = [(p.wait(600), *p.communicate()) for p in procs]
        s3_s = time.monotonic() - t0
        local_root = str(base / "local-lake")
        local_env = dict(os.environ, PYTHONPATH=str(REPO), IMAGELAKE_RUNNER="local",
                         XDG_CACHE_HOME=str(base / "xdg-cache"))
        t0 = time.monotonic()
        p = _cli(cwd, local_env, "--lake", local_root, "run", "--images", str(src), "--steps", STEPS, "--no-progress")
        local = (p.wait(600), *p.communicate())
        local_s = time.monotonic() - t0
        yield dict(server=server, root=root, opts=opts, env=env, cwd=cwd, results=results, local=local,
                   local_root=local_root, s3_s=s3_s, local_s=local_s)
    finally:
        server.stop()


def test_two_runs_at_once_one_proceeds_the_other_exits_3(runs):
    codes = sorted(rc for rc, _, _ in runs["results"])
    errs = "\n".join(err[-2000:] for _, _, err in runs["results"])
    assert codes == [0, 3], errs
    loser = next(err for rc, _, err in runs["results"] if rc == 3)
    assert "'pipeline' lock is held" in loser, loser


def test_s3_run_equals_the_local_run(runs):
    rc, _, err = runs["local"]
    assert rc == 0, err[-3000:]
    s3 = _tables(runs["root"], runs["opts"])
    local = _tables(runs["local_root"], None)
    assert s3["counts"]["images"] == 39 and s3["counts"]["sources"] == 41  # 2 exact copies: paths, not images
    assert s3["counts"]["rejects"] == 0 and not s3["failed"]
    assert s3["image_ids"] == local["image_ids"] and s3["seqs"] == list(range(39))
    assert s3["counts"] == local["counts"]
    assert s3["tags"] == local["tags"] > 0
    assert len(s3["dup_groups"]) >= 3, s3["dup_groups"]  # the one-pixel near-duplicates at least
    assert s3["dup_groups"] == local["dup_groups"]
    print(f"\ns3 run (two at once, Spark local[2]) {runs['s3_s']:.1f} s; local run (in process) {runs['local_s']:.1f} s")


def test_every_byte_went_to_the_bucket_and_staging_is_gone(runs):
    from lake.store import LakeStore

    assert not any(runs["cwd"].iterdir()), sorted(p.name for p in runs["cwd"].iterdir())
    store = LakeStore(runs["root"], runs["opts"])
    keys = [o.key for o in store.list("artifacts")]
    assert any(k.startswith("artifacts/tiles/") and k.endswith("/manifest.json") for k in keys), keys
    assert any(k.startswith("artifacts/tiles/") and k.endswith("/cells.bin") for k in keys)
    assert any(k.startswith("artifacts/models/") and k.endswith("/model.onnx") for k in keys)  # the ONNX export
    assert any(k.startswith("artifacts/clusters/") and k.endswith("/manifest.json") for k in keys)  # topic model
    assert any(k.startswith("artifacts/index/") and k.endswith("/manifest.json") for k in keys), keys  # FAISS build
    assert any(k.startswith("artifacts/suggest/") and k.endswith("/manifest.json") for k in keys)  # suggestion matrix
    assert not store.list("_staging"), [o.key for o in store.list("_staging")]


def test_janitor_sweeps_the_object_store_lake(runs):
    from lake.store import LakeStore

    store = LakeStore(runs["root"], runs["opts"])
    store.write_bytes("_staging/ingest-killed/images/part-00000.parquet", b"partial")  # a killed run's file
    orphan = "tables/images/part-00000-orphan.parquet"
    store.write_bytes(orphan, b"x")
    p = _cli(runs["cwd"], runs["env"], "--lake", runs["root"], "janitor", "--older-than", "0")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "removed 1 staging folders, 1 orphan data files" in out, out
    assert not store.exists(orphan) and not store.list("_staging")
    assert _tables(runs["root"], runs["opts"])["counts"]["images"] == 39


def test_tiles_are_served_from_the_bucket(runs, monkeypatch, tmp_path):
    """The grid's published layout, read back from the s3 lake: metadata, cells and tiles (a
    pre-rendered one and a deep one drawn from the cells' pack, fetched through the artifact cache)."""
    import io

    from PIL import Image

    from jobs.grid.store import LayoutStore
    from lake.catalog import Lake

    for k, v in runs["opts"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the node's artifact cache
    view = LayoutStore(Lake.at(runs["root"])).view("latest")
    assert view.width * view.height >= 39
    tiles = view.tiles
    assert Image.open(io.BytesIO(tiles.tile(0, 0, 0))).size == (1, 1)
    deep = tiles.pyramid.max_level
    assert Image.open(io.BytesIO(tiles.tile(deep, 0, 0))).format == "JPEG"
