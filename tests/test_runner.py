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
