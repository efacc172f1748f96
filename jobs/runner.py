"""Runners: the same partition function, in process (tests, tiny data) or on Spark (production).

A *partition function* is pure compute over one partition of rows::

    def fn(batches: Iterator[pa.RecordBatch], ctx: PartitionContext) -> Iterator[pa.RecordBatch]

It receives the partition's input rows as Arrow batches and yields result rows (usually one small
batch of stats naming the files it staged). It must be picklable (a module-level function, or a
``functools.partial`` of one) because Spark ships it to executors.

Partitions are contiguous slices of the input, computed the same way by both runners, so a
partition id names the same rows in a retry, in a re-run and under either runner.

The input is either an Arrow table held by the driver (small inputs: a list of files to read) or a
:class:`StagedInput`: the rows staged in the lake as one Parquet file per partition
(:func:`stage_input`, which the driver writes from a stream of bounded batches). With a staged input
the driver ships only the files' names; each task opens its own file through the lake's filesystem
(local or object store), so neither the driver nor Spark's serializer ever holds all the rows, and
workers need nothing but the lake.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, Union

import pyarrow as pa

from lake.settings import Settings

__all__ = ["FAIL_ONCE_ENV", "PartitionContext", "collect_arrow", "PartitionFn", "Runner", "LocalRunner", "SparkRunner", "make_runner",
           "partition_bounds", "StagedInput", "stage_input", "read_staged_input", "INPUT_BATCH_ROWS"]

#: Rows per Arrow batch when a task reads its staged input (and when drivers stream query results).
INPUT_BATCH_ROWS = 4096


@dataclass(frozen=True)
class PartitionContext:
    partition_id: int
    attempt: int = 0
    num_partitions: int = 1


PartitionFn = Callable[[Iterator[pa.RecordBatch], PartitionContext], Iterator[pa.RecordBatch]]


def partition_bounds(n_rows: int, n_parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) slices, the way Spark's ``parallelize`` cuts a local collection."""
    return [((i * n_rows) // n_parts, ((i + 1) * n_rows) // n_parts) for i in range(n_parts)]


@dataclass(frozen=True)
class StagedInput:
    """A step's input rows in the lake: ``files[i]`` holds partition ``i``'s rows (``None``: no rows).

    Made by :func:`stage_input`; picklable and small (the file names only), so it is what a driver
    ships to tasks instead of the rows.
    """

    files: tuple[str | None, ...]
    schema: pa.Schema
    num_rows: int

    @property
    def num_partitions(self) -> int:
        return len(self.files)


def stage_input(staging_dir: str, name: str, batches: Iterable[pa.RecordBatch], num_rows: int,
                num_partitions: int, schema: pa.Schema) -> StagedInput:
    """Write the stream ``batches`` (``num_rows`` rows in all, in order) as ``num_partitions``
    contiguous slices, one Parquet file each, under ``<staging_dir>/_input-<name>/``.

    The slices are :func:`partition_bounds`'s, the ones ``parallelize`` made of an in-memory table,
    so a staged run cuts the same partitions as before. Only one batch is in memory at a time.

    Raises:
        RuntimeError: the stream had a different number of rows than ``num_rows``.
    """
    from lake.staging import StagedWriter

    num_partitions = max(1, min(num_partitions, num_rows or 1))
    bounds = partition_bounds(num_rows, num_partitions)
    files: list[str | None] = []
    pid, seen = 0, 0
    writer = StagedWriter(staging_dir, f"_input-{name}", pid, schema)
    try:
        for batch in batches:
            batch = pa.Table.from_batches([batch]).select(schema.names).cast(schema)
            off = 0
            while off < batch.num_rows:
                if pid >= num_partitions:
                    raise RuntimeError(f"staging {name}: the input has more than the {num_rows} rows counted")
                end = bounds[pid][1]
                take = min(batch.num_rows - off, end - seen)
                writer.write(batch.slice(off, take))
                off, seen = off + take, seen + take
                if seen == end:
                    files.append(writer.close())
                    pid += 1
                    if pid < num_partitions:
                        writer = StagedWriter(staging_dir, f"_input-{name}", pid, schema)
        if pid < num_partitions:
            if seen != num_rows:
                raise RuntimeError(f"staging {name}: the input had {seen} rows, {num_rows} were counted")
            files.append(writer.close())
            pid += 1
    except BaseException:
        writer.abort()
        raise
    files += [None] * (num_partitions - len(files))
    return StagedInput(tuple(files), schema, num_rows)


def read_staged_input(path: str | None, schema: pa.Schema,
                      batch_rows: int = INPUT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The rows of one staged partition file as batches of ``schema`` (none for ``None``)."""
    if path is None:
        return
    import pyarrow.parquet as pq

    from lake.staging import filesystem_for

    fs, inner = filesystem_for(path)
    with fs.open_input_file(inner) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
            if batch.num_rows:
                yield pa.Table.from_batches([batch]).select(schema.names).cast(schema).to_batches()[0]


Input = Union[pa.Table, StagedInput]


class Runner(Protocol):
    def map_partitions(self, fn: PartitionFn, rows: Input, num_partitions: int,
                       out_schema: pa.Schema, desc: str = "") -> pa.Table: ...

    def close(self) -> None: ...


class LocalRunner:
    """Runs partitions one after another in this process; the reference semantics for tests."""

    def __init__(self, progress: bool = False):
        self.progress = progress

    def map_partitions(self, fn: PartitionFn, rows: Input, num_partitions: int,
                       out_schema: pa.Schema, desc: str = "") -> pa.Table:
        out: list[pa.RecordBatch] = []
        if isinstance(rows, StagedInput):
            n = rows.num_partitions
            for pid, path in enumerate(_progress(rows.files, self.progress, desc)):
                out.extend(fn(read_staged_input(path, rows.schema), PartitionContext(pid, 0, n)))
            return pa.Table.from_batches(out, schema=out_schema) if out else out_schema.empty_table()
        num_partitions = max(1, min(num_partitions, rows.num_rows or 1))
        bounds = partition_bounds(rows.num_rows, num_partitions)
        for pid, (start, end) in enumerate(_progress(bounds, self.progress, desc)):
            ctx = PartitionContext(pid, 0, num_partitions)
            part = rows.slice(start, end - start)
            out.extend(fn(iter(part.to_batches()), ctx))
        return pa.Table.from_batches(out, schema=out_schema) if out else out_schema.empty_table()

    def close(self) -> None:
        pass


class SparkRunner:
    """Runs partitions as Spark tasks with ``mapInArrow``; one task per partition.

    The session is created on first use (``master`` from settings: ``local[*]`` by default, a
    standalone/Kubernetes/YARN master otherwise) and reused until ``close()``.
    """

    def __init__(self, settings: Settings, spark=None, progress: bool = False):
        self.settings = settings
        self._spark = spark
        self._owns = spark is None
        self.progress = progress

    @property
    def spark(self):
        if self._spark is None:
            from pyspark import SparkContext
            from pyspark.sql import SparkSession

            if SparkContext._active_spark_context is not None:
                # someone else's session (an embedding application, a test run): use it, never stop it
                self._spark, self._owns = SparkSession.builder.getOrCreate(), False
            else:
                from jobs.spark import spark_session
                self._spark = spark_session(self.settings)
        return self._spark

    @property
    def master(self) -> str:
        """The master tasks run on (the running session's, else the one a session would get),
        without starting Spark."""
        from pyspark import SparkContext

        sc = self._spark.sparkContext if self._spark is not None else SparkContext._active_spark_context
        return sc.master if sc is not None else self.settings.master

    def map_partitions(self, fn: PartitionFn, rows: Input, num_partitions: int,
                       out_schema: pa.Schema, desc: str = "") -> pa.Table:
        from pyspark.sql.pandas.types import from_arrow_schema

        spark = self.spark
        if isinstance(rows, StagedInput):
            # one (partition, file) row per task; each task reads its own rows from the lake
            num_partitions = rows.num_partitions
            rdd = spark.sparkContext.parallelize(list(enumerate(rows.files)), num_partitions)
            df = spark.createDataFrame(rdd, "partition INT, path STRING")
            wrapped = _SparkStagedPartition(fn, rows.schema, num_partitions)
        else:
            num_partitions = max(1, min(num_partitions, rows.num_rows or 1))
            # parallelize() slices a local list exactly like partition_bounds, deterministically.
            rdd = spark.sparkContext.parallelize(rows.to_pylist(), num_partitions)
            in_schema = from_arrow_schema(rows.schema)
            df = spark.createDataFrame(rdd.map(lambda d: tuple(d.values())), in_schema)
            wrapped = _SparkPartition(fn, rows.schema, num_partitions)
        result = df.mapInArrow(wrapped, from_arrow_schema(out_schema))
        stop = threading.Event()
        watcher = None
        if self.progress:
            watcher = threading.Thread(target=_watch_stages, args=(spark, num_partitions, desc, stop),
                                       daemon=True)
            watcher.start()
        try:
            table = collect_arrow(result, out_schema)
        finally:
            stop.set()
            if watcher is not None:
                watcher.join(timeout=2)
        return table.select(out_schema.names).cast(out_schema)

    def close(self) -> None:
        if self._spark is not None and self._owns:
            self._spark.stop()
            self._spark = None


def collect_arrow(df, schema: pa.Schema) -> pa.Table:
    """``df``'s rows as one Arrow table on the driver, on every supported pyspark.

    ``DataFrame.toArrow()`` exists from pyspark 4.0; on 3.5 the same Arrow stream is read with
    ``_collect_as_arrow()`` (what ``toPandas`` uses there), which returns no batch for no rows.
    Chosen by feature detection, so a 3.5 cluster runs the same jobs.
    """
    if hasattr(df, "toArrow"):
        return df.toArrow()
    batches = df._collect_as_arrow()
    return pa.Table.from_batches(batches) if batches else schema.empty_table()


class _SparkPartition:
    """The picklable adapter Spark calls: builds the context from ``TaskContext``."""

    def __init__(self, fn: PartitionFn, in_schema: pa.Schema, num_partitions: int):
        self.fn, self.in_schema, self.num_partitions = fn, in_schema, num_partitions

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        tc = TaskContext.get()
        ctx = PartitionContext(tc.partitionId(), tc.attemptNumber(), self.num_partitions)
        typed = (pa.Table.from_batches([b]).cast(self.in_schema).to_batches()[0] for b in batches if b.num_rows)
        if os.environ.get(FAIL_ONCE_ENV):
            out = list(self.fn(typed, ctx))
            _fail_once(self.fn, ctx)
            yield from out
        else:
            yield from self.fn(typed, ctx)


class _SparkStagedPartition:
    """The adapter for a :class:`StagedInput`: each input row names a partition and its file."""

    def __init__(self, fn: PartitionFn, in_schema: pa.Schema, num_partitions: int):
        self.fn, self.in_schema, self.num_partitions = fn, in_schema, num_partitions

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        attempt = TaskContext.get().attemptNumber()
        for b in batches:
            for pid, path in zip(b.column("partition").to_pylist(), b.column("path").to_pylist()):
                ctx = PartitionContext(pid, attempt, self.num_partitions)
                rows = read_staged_input(path, self.in_schema)
                if os.environ.get(FAIL_ONCE_ENV):
                    out = list(self.fn(rows, ctx))
                    _fail_once(self.fn, ctx)
                    yield from out
                else:
                    yield from self.fn(rows, ctx)


#: Test hook (fault injection), off unless set in the executors' environment: a folder. The first
#: attempt of every partition of every job then fails *after* its function finished (files staged,
#: stats made), once per (function, partition) — a marker file in the folder records it — so
#: Spark's retry (``spark.task.maxFailures``, e.g. ``local[2,3]``) must make the run succeed without
#: duplicating a row. Used by tests/test_pipeline.py; never set it in production.
FAIL_ONCE_ENV = "IMAGELAKE_TEST_FAIL_ONCE"


def _fail_once(fn, ctx: PartitionContext) -> None:
    folder = os.environ[FAIL_ONCE_ENV]
    name = getattr(getattr(fn, "func", fn), "__name__", "partition")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, f"{name}.{ctx.partition_id}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    raise RuntimeError(f"injected test fault ({FAIL_ONCE_ENV}): {name} partition {ctx.partition_id} "
                       f"attempt {ctx.attempt}")


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc or "partitions", unit="part", file=sys.stderr)


def _watch_stages(spark, total: int, desc: str, stop: threading.Event) -> None:
    from tqdm import tqdm

    tracker = spark.sparkContext.statusTracker()
    bar = tqdm(total=total, desc=desc or "tasks", unit="task", file=sys.stderr)
    done = 0
    try:
        while not stop.wait(0.5):
            now = 0
            for sid in tracker.getActiveStageIds():
                info = tracker.getStageInfo(sid)
                if info is not None:
                    now = max(now, info.numCompletedTasks)
            if now > done:
                bar.update(now - done)
                done = now
        bar.update(total - done)
    finally:
        bar.close()


def make_runner(settings: Settings, progress: bool = False) -> Runner:
    if settings.runner == "local":
        return LocalRunner(progress=progress)
    return SparkRunner(settings, progress=progress)


def default_parallelism(settings: Settings) -> int:
    """Cores a local master will use; on a cluster Spark decides and this is only a hint."""
    master = settings.master
    if master.startswith("local["):
        inner = master[6:-1].split(",")[0]
        return (os.cpu_count() or 2) if inner == "*" else max(1, int(inner))
    return max(2, os.cpu_count() or 2)
