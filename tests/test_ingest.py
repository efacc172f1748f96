"""Ingest on real Delta tables, in process and on real Spark local[2]."""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from functools import partial
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from PIL import Image

from conftest import make_jpeg, write_images
from kill import kill_when, staged_files, staging_folders, unfinished_runs
from jobs.ingest.decode import Rejected, inspect_image
from jobs.ingest.driver import run_ingest
from jobs.ingest.partition import ingest_partition
from jobs.runner import LocalRunner, SparkRunner
from lake.errors import LockHeld, NotFound
from lake.janitor import clean
from lake.lock import LakeLock
from lake.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def rows(lake, table, columns=None):
    return DeltaTable(lake.table_uri(table)).to_pyarrow_table(columns=columns).to_pylist()


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG whose header claims width x height: a few KB that decode to gigapixels."""
    raw = zlib.compress(b"\x00" * (1 + (width + 7) // 8) * height, 9)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def bad_files(folder: Path) -> dict[str, str]:
    """One file of each kind of bad input, and the reject reason each must get."""
    folder.mkdir(parents=True, exist_ok=True)
    good = make_jpeg(999, (320, 240))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image at all")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, "PPM")
    (folder / "picture.ppm").write_bytes(buf.getvalue())
    (folder / "bomb.png").write_bytes(png_bomb(30000, 30000))
    (folder / "huge.jpg").write_bytes(good + b"\x00" * 300_000)
    return {"empty.jpg": "empty", "notes.txt": "not_an_image", "truncated.jpg": "truncated",
            "picture.ppm": "unsupported_format", "bomb.png": "too_many_pixels", "huge.jpg": "too_large"}


# ---- decoding, one file at a time ---------------------------------------------------------------

def test_inspect_image_measures_and_makes_thumbnails():
    info = inspect_image(make_jpeg(1, (640, 480)), max_pixels=10**8, thumbnail_sizes=(64, 256))
    assert (info.format, info.width, info.height) == ("JPEG", 640, 480)
    assert len(info.image_id) == 64
    sizes = {t.size: Image.open(io.BytesIO(t.jpeg)).size for t in info.thumbnails}
    assert sizes == {64: (64, 48), 256: (256, 192)}


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    info = inspect_image(make_jpeg(2, (200, 100), exif=exif.tobytes()), max_pixels=10**8, thumbnail_sizes=(64,))
    assert (info.width, info.height) == (100, 200)
    assert Image.open(io.BytesIO(info.thumbnails[0].jpeg)).size == (32, 64)


@pytest.mark.parametrize("name", ["empty.jpg", "notes.txt", "truncated.jpg", "picture.ppm", "bomb.png"])
def test_each_bad_input_is_rejected_with_its_reason(tmp_path, name):
    expected = bad_files(tmp_path)
    with pytest.raises(Rejected) as e:
        inspect_image((tmp_path / name).read_bytes(), max_pixels=50_000_000)
    assert e.value.reason == expected[name]
    assert e.value.detail


# ---- the job, in process ------------------------------------------------------------------------

def test_ingest_is_idempotent_incremental_and_deduplicates(tmp_path, lake, local_settings):
    src = tmp_path / "photos"
    write_images(src / "a", 30)
    (src / "copy_of_3.jpg").write_bytes((src / "a" / "img_00003.jpg").read_bytes())
    expected_rejects = bad_files(src / "bad")
    settings = local_settings.replace(max_image_bytes=200_000)

    first = run_ingest(lake, settings, str(src))
    assert (first.listed, first.ok, first.rejected) == (37, 31, 6)
    images = rows(lake, "images")
    assert len(images) == 30                       # 31 good files, one duplicate content
    assert sorted(r["seq"] for r in images) == list(range(30))
    assert {r["collection"] for r in images} == {"photos"}
    sources = rows(lake, "sources")
    assert len(sources) == 31
    dup_id = next(r["image_id"] for r in sources if r["uri"].endswith("copy_of_3.jpg"))
    assert sorted(r["uri"].rsplit("/", 1)[-1] for r in sources if r["image_id"] == dup_id) == \
        ["copy_of_3.jpg", "img_00003.jpg"]
    rejects = {r["uri"].rsplit("/", 1)[-1]: r["reason"] for r in rows(lake, "rejects")}
    assert rejects == expected_rejects
    thumbs = rows(lake, "thumbnails")
    assert len(thumbs) == 60
    for t in thumbs[:4]:
        im = Image.open(io.BytesIO(t["jpeg"]))
        assert im.format == "JPEG" and max(im.size) == min(t["size"], 64)   # never upscaled

    versions = {t: DeltaTable(lake.table_uri(t)).version() for t in ("images", "sources", "thumbnails", "rejects")}
    again = run_ingest(lake, settings, str(src))
    assert (again.new, again.ok, again.rejected) == (0, 0, 0)
    assert {t: DeltaTable(lake.table_uri(t)).version() for t in versions} == versions

    write_images(src / "b", 10, start=1000)
    more = run_ingest(lake, settings, str(src))
    assert (more.new, more.ok) == (10, 10)
    images = rows(lake, "images")
    assert len(images) == 40
    assert sorted(r["seq"] for r in images) == list(range(40))
    assert len({r["image_id"] for r in images}) == 40


def test_list_file_and_missing_source(tmp_path, lake, local_settings):
    paths = write_images(tmp_path / "x", 5)
    listing = tmp_path / "list.txt"
    listing.write_text("# two of them\n" + "\n".join(str(p) for p in paths[:2]) + "\nx/img_00004.jpg\n")
    summary = run_ingest(lake, local_settings, str(listing), collection="listed")
    assert summary.ok == 3
    assert {r["collection"] for r in rows(lake, "images")} == {"listed"}
    with pytest.raises(NotFound):
        run_ingest(lake, local_settings, str(tmp_path / "nope"))


def test_overlapping_ingest_is_refused(tmp_path, lake, local_settings):
    write_images(tmp_path / "x", 2)
    with LakeLock(lake, "ingest", timeout=0):
        with pytest.raises(LockHeld, match="lock is held"):
            run_ingest(lake, local_settings, str(tmp_path / "x"))


# ---- the job on real Spark ----------------------------------------------------------------------

@pytest.mark.spark
def test_spark_matches_local_runner(tmp_path, spark):
    src = tmp_path / "imgs"
    write_images(src, 40)
    bad_files(src / "bad")
    results = {}
    for name, runner in (("local", LocalRunner()), ("spark", SparkRunner(Settings(), spark=spark))):
        from lake.catalog import Lake
        lake = Lake.at(tmp_path / f"lake-{name}").ensure()
        s = run_ingest(lake, Settings(lake=lake.root, partition_files=7, max_image_bytes=200_000), str(src),
                       runner=runner)
        results[name] = (s.ok, s.rejected,
                         sorted((r["image_id"], r["seq"]) for r in rows(lake, "images", ["image_id", "seq"])),
                         sorted((r["uri"], r["reason"]) for r in rows(lake, "rejects", ["uri", "reason"])))
    assert results["spark"] == results["local"]
    assert results["spark"][:2] == (40, 6)


def _fail_first_attempt(batches, ctx, *, job):
    """Stage the partition's files, then die — only on the first attempt of partition 1."""
    out = list(ingest_partition(batches, ctx, job=job))
    if ctx.partition_id == 1 and ctx.attempt == 0:
        raise RuntimeError("injected failure after staging")
    yield from out


@pytest.mark.spark
def test_task_failing_on_first_attempt_leaves_no_duplicates(tmp_path, lake, spark, monkeypatch):
    import pyspark.cloudpickle as cp

    cp.register_pickle_by_value(sys.modules[__name__])
    import jobs.ingest.driver as driver
    monkeypatch.setattr(driver, "ingest_partition", _fail_first_attempt)
    write_images(tmp_path / "imgs", 24)
    summary = run_ingest(lake, Settings(lake=lake.root, partition_files=6), str(tmp_path / "imgs"),
                         runner=SparkRunner(Settings(), spark=spark))
    assert summary.ok == 24
    images = rows(lake, "images", ["image_id", "seq"])
    assert len(images) == 24 and len({r["image_id"] for r in images}) == 24
    assert len(rows(lake, "thumbnails", ["image_id"])) == 48
    assert sorted(r["seq"] for r in images) == list(range(24))


# ---- crashes ------------------------------------------------------------------------------------

def _cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "imagelake", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_kill_9_during_ingest_then_rerun_loses_and_duplicates_nothing(tmp_path):
    """Three runs killed while their tasks are staging files (after the first staged file, after
    several, after most), each proven mid-run; then a clean run completes the lake exactly."""
    from lake.catalog import Lake

    src = tmp_path / "imgs"
    write_images(src, 160, size=(640, 480))
    lake_dir = tmp_path / "lake"
    env = dict(os.environ, PYTHONPATH=str(REPO), IMAGELAKE_RUNNER="local", IMAGELAKE_PARTITION_FILES="20")
    for at in (1, 8, 20):  # 8 partitions, each staging a file per table: up to 32 files
        before, old = unfinished_runs(lake_dir), staging_folders(lake_dir)
        proc = _cli("--lake", str(lake_dir), "ingest", "--images", str(src), env=env, start_new_session=True)
        kill_when(proc, lambda: staged_files(lake_dir, "ingest", old) >= at, f"{at} staged files")
        new = unfinished_runs(lake_dir) - before
        assert len(new) == 1 and next(iter(new)).startswith("ingest-"), new   # killed before its end row
        # whatever state the kill left, every table is readable and nothing was committed twice
        lake = Lake.at(lake_dir)
        images = rows(lake, "images", ["image_id"])
        assert len(images) == len({r["image_id"] for r in images})
    done = _cli("--lake", str(lake_dir), "ingest", "--images", str(src), env=env)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    from lake.catalog import Lake
    lake = Lake.at(lake_dir)
    images = rows(lake, "images", ["image_id", "seq"])
    assert len(images) == 160 and len({r["image_id"] for r in images}) == 160
    assert sorted(r["seq"] for r in images) == list(range(160))
    sources = rows(lake, "sources", ["uri"])
    assert len(sources) == 160 and len({r["uri"] for r in sources}) == 160
    thumbs = rows(lake, "thumbnails", ["image_id", "size"])
    assert len(thumbs) == 320 and len({(r["image_id"], r["size"]) for r in thumbs}) == 320
    clean(lake, older_than_h=0)
    assert not list((lake_dir / "_staging").iterdir())
    referenced = {a for a in DeltaTable(lake.table_uri("images")).get_add_actions(flatten=True)
                  .column("path").to_pylist()}
    on_disk = {p.name for p in (lake_dir / "tables" / "images").glob("*.parquet")}
    assert on_disk == referenced


def test_a_kill_trial_whose_run_ends_first_fails():
    """The kill helper refuses a clean run as a kill trial (what the old fixed-delay trials allowed)."""
    quick = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    with pytest.raises(pytest.fail.Exception, match=r"the run ended \(exit 0\) before the kill point"):
        kill_when(quick, lambda: False, "the kill point")
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_when(slow, lambda: True, "the start")
    assert slow.returncode == -signal.SIGKILL


def test_janitor_removes_orphans_but_keeps_committed_data(tmp_path, lake, local_settings):
    write_images(tmp_path / "x", 3)
    run_ingest(lake, local_settings, str(tmp_path / "x"))
    orphan = Path(lake.table_uri("images")) / "part-00000-orphan.parquet"
    pa.parquet.write_table(pa.table({"a": [1]}), orphan) if hasattr(pa, "parquet") else orphan.write_bytes(b"x")
    killed = Path(lake.staging_dir("ingest-killed")) / "images"
    killed.mkdir(parents=True)
    (killed / "part-00000.parquet").write_bytes(b"partial")
    assert clean(lake, older_than_h=24).orphan_files == 0          # too young to be sure
    report = clean(lake, older_than_h=0)
    assert (report.staging_dirs, report.orphan_files) == (1, 1)
    assert not orphan.exists()
    assert len(rows(lake, "images")) == 3
