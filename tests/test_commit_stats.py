"""Staged files committed as they are (``lake.commit._adopt``) carry statistics for every flat column,
so filters on any column find their rows (they once had stats for the key columns only, and a
filter on ``rejects.reason`` silently matched nothing)."""

from __future__ import annotations

import datetime as dt

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from lake.catalog import TABLES
from lake.commit import commit_staged, open_table
from lake.staging import StagedWriter

UTC = dt.timezone.utc


def _stage(lake, run_id, table, rows, partition=0):
    w = StagedWriter(lake.staging_dir(run_id), table, partition, TABLES[table].schema)
    w.write(rows)
    return w.close()


def _reject(i, when, detail):
    return dict(uri=f"/data/f{i}.jpg", collection="c" if i % 3 else None, bytes=i, mtime=when, stage="ingest",
                reason="empty" if i % 2 else "truncated", detail=detail, run_id="r", rejected_at=when)


def test_filters_on_every_column_of_adopted_files_find_their_rows(lake):
    t0 = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    long = "x" * 200 + "tail"
    f1 = _stage(lake, "run-a", "rejects", [_reject(i, t0 + dt.timedelta(microseconds=i), long if i == 4 else "d")
                                            for i in range(10)])
    f2 = _stage(lake, "run-a", "rejects", [_reject(i, t0, None) for i in range(10, 14)], partition=1)
    assert commit_staged(lake, "rejects", [f1, f2], run_id="run-a").rows == 14
    table = open_table(lake, "rejects")
    adds = pa.table(table.get_add_actions(flatten=True)).to_pylist()
    assert len(adds) == 2 and all(a["path"].startswith("part-run-a-") for a in adds)  # adopted, not rewritten
    dset = table.to_pyarrow_dataset()
    assert dset.to_table(filter=ds.field("reason") == "empty").num_rows == 7
    assert dset.to_table(filter=ds.field("collection") == "c").num_rows == 9
    assert dset.to_table(filter=ds.field("detail") == long).num_rows == 1
    assert dset.to_table(filter=ds.field("detail").is_null()).num_rows == 4
    # the largest microsecond timestamp is inside the (millisecond) bounds
    last = pa.scalar(t0 + dt.timedelta(microseconds=9), TABLES["rejects"].schema.field("mtime").type)
    assert dset.to_table(filter=ds.field("mtime") >= last).num_rows == 1
    con = duckdb.connect()
    con.register("rejects", dset)
    assert con.execute("SELECT count(*) FROM rejects WHERE reason = 'truncated' AND stage = 'ingest'").fetchall()[0][0] == 7
    assert con.execute("SELECT count(*) FROM rejects WHERE run_id = 'r' AND bytes >= 12").fetchall()[0][0] == 2


def test_a_file_whose_bounds_cannot_be_stated_is_rewritten_and_still_found(lake):
    f = _stage(lake, "run-b", "clusters", [dict(run_id="run-b", image_id=f"{i:064x}", kind="dup", cluster_id="c1",
                                                level=0, score=float("nan"), created_at=None, model_run="m")
                                           for i in range(3)])
    assert commit_staged(lake, "clusters", [f], run_id="run-b").rows == 3
    dset = open_table(lake, "clusters").to_pyarrow_dataset()
    assert dset.to_table(filter=ds.field("cluster_id") == "c1").num_rows == 3
    assert dset.to_table(filter=ds.field("kind") == "dup").num_rows == 3
