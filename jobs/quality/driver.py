"""The ``quality`` step: measures and flags for every image that has a thumbnail and no ``image_quality`` row.

Distributed like ``embed``: the driver streams the anti-join (thumbnails without a quality row) in
bounded batches into the run's staging folder, one Parquet file per partition, and each task reads
its own file and the thumbnail files it names from the lake (local or object store).

Incremental: only images without a row are measured, so a re-run on an unchanged lake does nothing.
Flags are computed with the thresholds in force when a row is written; after changing a
``quality_*`` setting, filter on the measures in SQL (``WHERE blur < 50``) or rebuild the table.
"""

from __future__ import annotations

import datetime as dt
import math
import tempfile
from functools import partial
from typing import Any, Callable, Iterator

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from jobs.quality.partition import QUALITY_STATS_SCHEMA, TODO_SCHEMA, QualityJob, quality_partition
from jobs.runner import INPUT_BATCH_ROWS, Runner, StagedInput, default_parallelism, make_runner, stage_input
from jobs.runs import job_run
from lake.catalog import Lake
from lake.commit import commit_staged, ensure_tables, open_table
from lake.settings import Settings
from lake.staging import remove_staging

__all__ = ["run_quality", "quality_size", "stage_todo"]

_ROWS_PER_PARTITION = 4096
_LOCATED = pa.schema([("file", pa.string()), ("image_id", pa.string())])


def quality_size(settings: Settings) -> int:
    """The thumbnail size measured: 256 px when made, else the largest below it, else the smallest."""
    sizes = sorted(settings.thumbnail_sizes)
    below = [s for s in sizes if s <= 256]
    return below[-1] if below else sizes[0]


def _located(thumbs, size: int) -> Iterator[pa.RecordBatch]:
    """``file, image_id`` of every ``size`` thumbnail, one thumbnail file at a time (only its
    ``image_id`` and ``size`` columns are read)."""
    uris = thumbs.file_uris()
    by_suffix = {u.split("://", 1)[-1]: u for u in uris}
    for fragment in thumbs.to_pyarrow_dataset().get_fragments():
        path = fragment.path
        uri = by_suffix.get(path) or next((u for s, u in by_suffix.items() if s.endswith(path) or path.endswith(s)), path)
        for batch in fragment.to_batches(columns=["image_id"], filter=pads.field("size") == size):
            if batch.num_rows:
                yield pa.record_batch([pa.array([uri] * batch.num_rows, pa.string()), batch.column(0).cast(pa.string())],
                                      schema=_LOCATED)


def stage_todo(lake: Lake, size: int, staging_dir: str, min_partitions: int | Callable[[], int] = 1) -> StagedInput:
    """``file, image_id, width, height`` of every image with a ``size`` thumbnail and no quality row,
    sorted by file (a task reads few thumbnail files), staged in the run's folder as the quality
    tasks' input: ``ceil(n / 4096)`` partitions (at least ``min_partitions``), one Parquet file
    each. The driver streams the thumbnails' ids through DuckDB (which spills to disk when large)
    and never holds the rows; each task reads its own file from the lake."""
    empty = StagedInput((None,), TODO_SCHEMA, 0)
    thumbs = open_table(lake, "thumbnails")
    images, done = open_table(lake, "images"), open_table(lake, "image_quality")
    if not thumbs.file_uris() or not images.file_uris():
        return empty
    spill = tempfile.TemporaryDirectory(prefix="imagelake-quality-")  # not DuckDB's ./.tmp
    con = duckdb.connect(config={"threads": 2, "temp_directory": spill.name})
    try:
        con.register("located", pa.RecordBatchReader.from_batches(_LOCATED, _located(thumbs, size)))
        con.register("images", images.to_pyarrow_dataset())
        anti = ""
        if done.file_uris():
            con.register("done", done.to_pyarrow_dataset())
            anti = "ANTI JOIN done d ON d.image_id = l.image_id"
        con.execute("CREATE TEMP TABLE todo AS SELECT DISTINCT ON (l.image_id) l.file, l.image_id, i.width, i.height "
                    f"FROM located l JOIN images i ON i.image_id = l.image_id {anti} ORDER BY l.image_id")
        con.unregister("located")
        n = con.sql("SELECT count(*) FROM todo").fetchall()[0][0]
        if not n:
            return empty
        least = min_partitions() if callable(min_partitions) else min_partitions
        parts = max(math.ceil(n / _ROWS_PER_PARTITION), min(least, n))
        reader = con.sql("SELECT file, image_id, width, height FROM todo ORDER BY file, image_id").to_arrow_reader(
            INPUT_BATCH_ROWS)
        return stage_input(staging_dir, "quality", reader, n, parts, TODO_SCHEMA)
    finally:
        con.close()
        spill.cleanup()


def run_quality(lake: Lake, settings: Settings, *, runner: Runner | None = None,
                progress: bool = False) -> dict[str, Any]:
    """Measure the images that have no ``image_quality`` row yet; one commit.

    Returns:
        ``run_id``, ``rows_in`` (images measured), ``rows_out`` (rows committed), ``unreadable``,
        ``images_per_s``.
    """
    ensure_tables(lake, ["images", "thumbnails", "image_quality", "job_runs"])
    size = quality_size(settings)
    owned = runner is None
    with job_run(lake, "quality", {"size": size}, settings=settings) as run:
        todo = stage_todo(lake, size, lake.staging_dir(run.run_id), lambda: default_parallelism(settings) * 2)
        run.rows_in = todo.num_rows
        result = {"run_id": run.run_id, "rows_in": todo.num_rows, "rows_out": 0, "unreadable": 0}
        if todo.num_rows:
            runner = runner or make_runner(settings, progress=progress)
            try:
                job = QualityJob(run_id=run.run_id, staging_dir=lake.staging_dir(run.run_id), size=size,
                                 created_at=dt.datetime.now(dt.timezone.utc), blur=settings.quality_blur,
                                 dark=settings.quality_dark, bright=settings.quality_bright,
                                 low_contrast=settings.quality_low_contrast,
                                 low_information=settings.quality_low_information,
                                 grayscale=settings.quality_grayscale, odd_aspect=settings.quality_odd_aspect,
                                 tiny=settings.quality_tiny)
                stats = runner.map_partitions(partial(quality_partition, job=job), todo, todo.num_partitions,
                                              QUALITY_STATS_SCHEMA, desc="quality").to_pylist()
            finally:
                if owned:
                    runner.close()
            files = [s["file"] for s in stats if s["file"]]
            committed = commit_staged(lake, "image_quality", files, run_id=run.run_id, dedupe=True)
            result.update(rows_out=committed.rows, unreadable=sum(s["unreadable"] for s in stats))
        remove_staging(lake.staging_dir(run.run_id))  # the staged input too; local or object store
        run.rows_out = result["rows_out"]
        run.metrics.update(size=size, measured=result["rows_out"], unreadable=result["unreadable"])
    seconds = run.metrics.get("seconds") or 0.0
    result["images_per_s"] = round(result["rows_out"] / seconds, 1) if seconds else None
    return result
