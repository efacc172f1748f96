"""Runners: the Spark runner gives the local runner's rows on every supported pyspark (3.5 lacks
``DataFrame.toArrow``, which 4.0 added)."""

from __future__ import annotations

import datetime as dt
import sys
from typing import Iterator

import pyarrow as pa
import pytest

from jobs.runner import LocalRunner, PartitionContext, SparkRunner
from lake.settings import Settings

OUT = pa.schema([pa.field("partition", pa.int32()), pa.field("ids", pa.list_(pa.string())),
                 pa.field("total", pa.int64()), pa.field("at", pa.timestamp("us", tz="UTC"))])
AT = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


def _summarise(batches: Iterator[pa.RecordBatch], ctx: PartitionContext, keep: bool = True):
    rows = [r for b in batches for r in b.to_pylist()]
    if keep:
        yield pa.RecordBatch.from_pylist([dict(partition=ctx.partition_id, ids=[r["id"] for r in rows],
                                               total=sum(r["n"] for r in rows), at=AT)], schema=OUT)


def _drop(batches, ctx):
    return _summarise(batches, ctx, keep=False)


@pytest.fixture(autouse=True)
def _ship_this_module():
    """Spark's Python workers cannot import test modules: send this one's functions by value."""
    import pyspark.cloudpickle as cp

    cp.register_pickle_by_value(sys.modules[__name__])
    yield
    cp.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def pyspark_35_surface(monkeypatch):
    """The DataFrame classes as pyspark 3.5 has them: no ``toArrow`` anywhere in the hierarchy."""
    from pyspark.sql import DataFrame

    classes = {DataFrame}
    try:
        from pyspark.sql.classic.dataframe import DataFrame as Classic
        classes.add(Classic)
    except ImportError:
        pass
    removed = 0
    for cls in list(classes):
        for base in cls.__mro__:
            if "toArrow" in vars(base):
                monkeypatch.delattr(base, "toArrow")
                removed += 1
    return removed


@pytest.mark.spark
def test_spark_runner_collects_without_toArrow_like_pyspark_35(spark, pyspark_35_surface):
    rows = pa.table({"id": [f"i{k}" for k in range(10)], "n": list(range(10))})
    assert not hasattr(spark.range(1), "toArrow")
    runner = SparkRunner(Settings(), spark=spark)
    got = runner.map_partitions(_summarise, rows, 3, OUT)
    assert got.schema == OUT
    assert got.sort_by("partition").to_pylist() == LocalRunner().map_partitions(_summarise, rows, 3, OUT).to_pylist()
    assert got.column("total").to_pylist() == [0 + 1 + 2, 3 + 4 + 5, 6 + 7 + 8 + 9]
    empty = runner.map_partitions(_drop, rows, 2, OUT)  # no rows at all: still the schema
    assert empty.num_rows == 0 and empty.schema == OUT


@pytest.mark.spark
def test_spark_runner_uses_toArrow_where_pyspark_has_it(spark):
    rows = pa.table({"id": ["a", "b", "c"], "n": [1, 2, 3]})
    got = SparkRunner(Settings(), spark=spark).map_partitions(_summarise, rows, 2, OUT)
    assert sorted(got.column("total").to_pylist()) == [1, 5]


from s3_server import lake_root, s3_lake, s3_server  # noqa: E402,F401


def _batches(rows: pa.Table, size: int):
    return iter(rows.to_batches(max_chunksize=size))


def test_staged_input_cuts_the_same_partitions_and_tasks_read_their_own_file(lake_root):
    """Rows streamed in odd-sized batches into the lake (local, then the S3 server) give the same
    partitions as the in-memory table; a wrong row count is refused."""
    from jobs.runner import stage_input

    rows = pa.table({"id": [f"i{k}" for k in range(23)], "n": list(range(23))})
    staged = stage_input(f"{lake_root}/_staging/r1", "t", _batches(rows, 5), rows.num_rows, 4, rows.schema)
    assert staged.num_partitions == 4 and staged.num_rows == 23 and all(staged.files)
    want = LocalRunner().map_partitions(_summarise, rows, 4, OUT).to_pylist()
    assert LocalRunner().map_partitions(_summarise, staged, 4, OUT).to_pylist() == want
    with pytest.raises(RuntimeError, match="counted"):
        stage_input(f"{lake_root}/_staging/r2", "t", _batches(rows, 5), 30, 4, rows.schema)
    empty = stage_input(f"{lake_root}/_staging/r3", "t", iter(()), 0, 3, rows.schema)
    assert empty.files == (None,) and LocalRunner().map_partitions(_drop, empty, 1, OUT).num_rows == 0


@pytest.mark.spark
def test_spark_tasks_read_staged_input_from_the_lake(spark, tmp_path):
    from jobs.runner import stage_input

    rows = pa.table({"id": [f"i{k}" for k in range(10)], "n": list(range(10))})
    staged = stage_input(str(tmp_path / "_staging" / "r"), "t", _batches(rows, 3), 10, 3, rows.schema)
    got = SparkRunner(Settings(), spark=spark).map_partitions(_summarise, staged, 3, OUT)
    assert got.sort_by("partition").to_pylist() == LocalRunner().map_partitions(_summarise, rows, 3, OUT).to_pylist()
