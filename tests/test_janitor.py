"""The janitor against live writers, and VACUUM: what it reclaims and what it must keep.

Real components only: a real bucket log written by a real ``BucketStore`` (group commit, Delta
appends, compaction) while a janitor in another process sweeps with ``--older-than 0``; real
metadata re-imports (full overwrites) and bucket-log compactions whose old copies VACUUM reclaims.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from deltalake import DeltaTable

from lake.bucket_store import Action, BucketStore
from lake.catalog import Lake
from lake.janitor import clean
from lake.metadata import import_metadata
from lake.settings import Settings

REPO = Path(__file__).resolve().parents[1]

# A janitor process that sweeps the lake with older-than 0 (and the default or the given vacuum
# retention) back to back until the stop file appears; it prints its sweeps and orphans removed.
_JANITOR_LOOP = """
import os, sys
from lake.catalog import Lake
from lake.janitor import clean
lake, stop = Lake.at(sys.argv[1]), sys.argv[2]
sweeps = files = 0
while not os.path.exists(stop):
    vacuum = {} if sys.argv[3] == "default" else {"vacuum_retention_h": int(sys.argv[3])}
    report = clean(lake, older_than_h=0, **vacuum)
    sweeps, files = sweeps + 1, files + report.orphan_files
print(sweeps, files, flush=True)
"""


def _disk_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*.parquet"))


# A curation server's writer: four threads submit renames of one bucket through one BucketStore
# (group commit; it also compacts the log every 15 files) until the stop file appears, printing
# each acknowledged event id.
_WRITER_LOOP = """
import os, sys, threading
from lake.bucket_store import Action, BucketStore
from lake.catalog import Lake
lake, stop = Lake.at(sys.argv[1]), sys.argv[2]
store = BucketStore(lake, compact_files=15)
bucket = store.submit(Action("create", bucket_id="0123456789abcdef", payload={"name": "race"}, actor="setup"))
print(bucket["event_id"], flush=True)
out = threading.Lock()
def curator(k):
    j = 0
    while not os.path.exists(stop):
        try:
            event = store.submit(Action("update", "0123456789abcdef", payload={"name": f"n {k}-{j}"}, actor=f"c{k}"))
        except Exception as e:  # nothing acknowledged; say why and stop
            print(f"write failed: {e!r}", file=sys.stderr, flush=True)
            os._exit(1)
        with out:
            print(event["event_id"], flush=True)
        j += 1
threads = [threading.Thread(target=curator, args=(k,)) for k in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
"""


def _python(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("vacuum_h", [0])  # retention 0 sweeps orphans and vacuums: a superset of the default
def test_janitor_racing_bucket_writers_loses_no_acknowledged_event(lake, tmp_path, vacuum_h):
    """Item 13: the janitor must never delete a bucket-log file written but not yet committed.

    A writer process commits to the bucket log from four threads while a janitor process sweeps
    with older-than 0 back to back. The writer is stalled (SIGSTOP, 0.5 s, then SIGCONT) at
    random moments, as a loaded machine or a long GC pause would: a stall that lands between
    writing a Parquet file and committing it is the janitor's chance to delete the file. Afterwards
    every acknowledged event is in the log, the whole table reads (no file it names is missing), and
    the janitor counted no orphan (the log never had one).
    """
    stop_writer, stop_janitor = tmp_path / "stop-writer", tmp_path / "stop-janitor"
    writer = _python(_WRITER_LOOP, lake.root, str(stop_writer))
    janitor = _python(_JANITOR_LOOP, lake.root, str(stop_janitor), "default" if vacuum_h is None else str(vacuum_h))
    rng = random.Random(13)
    acked: list[str] = []
    reader = threading.Thread(target=lambda: acked.extend(line.strip() for line in writer.stdout), daemon=True)
    reader.start()
    stalls = 0
    try:
        deadline = time.monotonic() + 60
        while not acked and time.monotonic() < deadline and writer.poll() is None:
            time.sleep(0.05)  # the writer is up
        # stall until enough stalls and writes happened (a loaded machine writes slower)
        while (stalls < 30 or len(acked) < 150) and time.monotonic() < deadline and writer.poll() is None:
            time.sleep(rng.uniform(0.02, 0.1))
            writer.send_signal(signal.SIGSTOP)
            time.sleep(0.5)  # long enough for a whole janitor sweep on a loaded machine
            writer.send_signal(signal.SIGCONT)
            stalls += 1
    finally:
        writer.send_signal(signal.SIGCONT)
        stop_writer.touch()
        stop_janitor.touch()
        writer.wait(timeout=120)
        reader.join(timeout=60)
        err = writer.stderr.read()
        j_out, j_err = janitor.communicate(timeout=120)
    table = DeltaTable(lake.table_uri("bucket_events"))
    rows = table.to_pyarrow_table(columns=["event_id"]).column("event_id").to_pylist()  # every file is there
    assert set(acked) <= set(rows), f"{len(set(acked) - set(rows))} acknowledged events lost"
    assert writer.returncode == 0, err[-3000:]
    assert janitor.returncode == 0, j_err
    sweeps, orphans = map(int, j_out.split())
    assert stalls >= 30 and sweeps >= 10, f"{stalls} stalls, {sweeps} sweeps: not a race"
    assert len(acked) >= 150, f"only {len(acked)} writes acknowledged"
    assert len(rows) == len(set(rows)) == len(acked)
    assert orphans == 0, f"the janitor deleted {orphans} files of a log that never had an orphan"
    fresh = BucketStore(lake)  # a process starting now folds the whole log
    with fresh.reading() as state:
        assert len(state.events) == len(acked)
    assert fresh.submit(Action("update", "0123456789abcdef", payload={"name": "after"}, actor="c0"))["seq"] == len(acked)


# -- VACUUM --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_lake(tmp_path_factory) -> Lake:
    """A lake with 20 real images, ingested in process."""
    from conftest import write_images
    from jobs.ingest.driver import run_ingest
    from jobs.runner import LocalRunner
    from lake.commit import ensure_tables

    root = tmp_path_factory.mktemp("janitor")
    write_images(root / "imgs", 20)
    lake = Lake.at(root / "template")
    ensure_tables(lake)
    run_ingest(lake, Settings(lake=lake.root, runner="local"), str(root / "imgs"), runner=LocalRunner())
    return lake


@pytest.fixture
def rewritten_lake(image_lake, tmp_path) -> Lake:
    """A copy of the image lake whose metadata was re-imported four times (each a full rewrite) and
    whose bucket log was compacted a few times: old copies that only VACUUM reclaims."""
    import shutil

    shutil.copytree(image_lake.root, tmp_path / "lake")
    lake = Lake.at(tmp_path / "lake")
    ids = sorted(DeltaTable(lake.table_uri("images")).to_pyarrow_table(columns=["image_id"])
                 .column("image_id").to_pylist())
    for k in range(4):
        path = tmp_path / f"meta{k}.csv"
        pacsv.write_csv(pa.table({"image_id": ids, "score": [k * 100 + i for i in range(len(ids))],
                                  "note": [f"import {k} of image {i} " * 20 for i in range(len(ids))]}), path)
        import_metadata(lake, path, key="image_id", run_id=f"meta-{k}")
    store = BucketStore(lake, compact_files=8)
    bucket = store.submit(Action("create", payload={"name": "b"}, actor="t"))["bucket_id"]
    for j in range(30):
        store.submit(Action("update", bucket, payload={"name": f"name {j}"}, actor="t"))
    return lake


def _rows(lake: Lake, name: str) -> list[dict]:
    table = DeltaTable(lake.table_uri(name)).to_pyarrow_table()
    return sorted(table.to_pylist(), key=lambda r: json.dumps(r, sort_keys=True, default=str))


def _live_files(lake: Lake, name: str) -> set[str]:
    return set(DeltaTable(lake.table_uri(name)).get_add_actions(flatten=True).column("path").to_pylist())


def _parquet_on_disk(lake: Lake, name: str) -> set[str]:
    return {p.name for p in Path(lake.table_uri(name)).glob("*.parquet")}


def _imagelake(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "imagelake", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_janitor_vacuum_retention_0_reclaims_old_copies_and_keeps_every_row(rewritten_lake):
    """Item 14: re-imports and compactions leave full old copies; VACUUM past retention 0 removes
    exactly those, reports the bytes per table, and every table still reads with the same rows."""
    lake = rewritten_lake
    tables = ("metadata", "bucket_events")
    before = {t: _rows(lake, t) for t in tables}
    disk = {t: _disk_bytes(lake.table_uri(t)) for t in tables}
    for t in tables:
        assert len(_parquet_on_disk(lake, t)) > len(_live_files(lake, t)), f"{t} has no old copy to reclaim"
    done = _imagelake("--lake", lake.root, "janitor", "--vacuum-retention", "0")
    assert done.returncode == 0, done.stderr
    lines = {line.split(":")[0].strip(): line for line in done.stdout.splitlines()}
    for t in tables:
        after = _disk_bytes(lake.table_uri(t))
        assert after < disk[t], f"{t}: disk usage did not drop ({disk[t]} -> {after})"
        assert f"{disk[t] - after} bytes" in lines[t], done.stdout  # the report names what went
        assert _parquet_on_disk(lake, t) == _live_files(lake, t)     # only the current files remain
        assert _rows(lake, t) == before[t]                           # the table reads fully, same rows
    assert len(before["metadata"]) == 20 and {r["score"] for r in before["metadata"]} == set(range(300, 320))
    assert len(before["bucket_events"]) == 31
    # again: nothing left to reclaim, and no empty VACUUM commits pile up in the logs
    versions = {t: DeltaTable(lake.table_uri(t)).version() for t in tables}
    again = clean(lake, older_than_h=0, vacuum_retention_h=0)
    assert again.vacuumed == () and all(DeltaTable(lake.table_uri(t)).version() == versions[t] for t in tables)
    # a vacuumed version's history answers 404, not a 500 about a missing file
    from lake.buckets import bucket_history
    from lake.errors import NotFound
    bucket = before["bucket_events"][0]["bucket_id"]
    with pytest.raises(NotFound, match="vacuum"):
        bucket_history(lake, bucket, version=3)
    assert bucket_history(lake, bucket)["bucket"]["name"] == "name 29"


def test_janitor_default_retention_removes_nothing_fresh(rewritten_lake):
    """The default retention (168 h) keeps every file a commit removed this week: every version of
    every table still reads (time travel works), and the report says nothing was vacuumed."""
    lake = rewritten_lake
    versions = {t: DeltaTable(lake.table_uri(t)).version() for t in ("metadata", "bucket_events")}
    disk = {t: _disk_bytes(lake.table_uri(t)) for t in versions}
    report = clean(lake, older_than_h=0)
    assert report.vacuum_retention_h == 168 and report.vacuumed == () and report.vacuum_bytes == 0
    assert "vacuum (files removed from tables over 168 h ago): 0 files, 0 bytes" in report.line()
    for t, latest in versions.items():
        assert _disk_bytes(lake.table_uri(t)) == disk[t]
        for v in range(latest + 1):
            table = DeltaTable(lake.table_uri(t))
            table.load_as_version(v)
            table.to_pyarrow_table()  # every file of every version is still there
    done = _imagelake("--lake", lake.root, "janitor")
    assert done.returncode == 0 and "0 files, 0 bytes" in done.stdout, done.stderr
    assert all(_disk_bytes(lake.table_uri(t)) == disk[t] for t in versions)


def test_vacuum_retention_setting_and_flag(tmp_path):
    assert Settings().vacuum_retention_h == 168
    from lake.errors import BadInput
    from lake.settings import load_settings
    assert load_settings(env={"IMAGELAKE_VACUUM_RETENTION_H": "12"}).vacuum_retention_h == 12
    with pytest.raises(BadInput, match="vacuum_retention_h"):
        load_settings(env={"IMAGELAKE_VACUUM_RETENTION_H": "-1"})
    done = _imagelake("--lake", str(tmp_path / "lake"), "janitor", "--vacuum-retention", "-2")
    assert done.returncode == 2 and "--vacuum-retention" in done.stderr
