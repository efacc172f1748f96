"""The ``quality`` step: measures and flags for every image that has a thumbnail and no ``image_quality`` row.

Incremental: only images without a row are measured, so a re-run on an unchanged lake does nothing.
Flags are computed with the thresholds in force when a row is written; after changing a
``quality_*`` setting, filter on the measures in SQL (``WHERE blur < 50``) or rebuild the table.
"""

from __future__ import annotations

import datetime as dt
import math
from functools import partial
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from jobs.quality.partition import QUALITY_STATS_SCHEMA, TODO_SCHEMA, QualityJob, quality_partition
from jobs.runner import Runner, default_parallelism, make_runner
from jobs.runs import job_run
from lake.catalog import Lake
from lake.commit import commit_staged, ensure_tables, open_table
from lake.settings import Settings
from lake.staging import remove_staging

__all__ = ["run_quality", "quality_size"]

_ROWS_PER_PARTITION = 4096


def quality_size(settings: Settings) -> int:
    """The thumbnail size measured: 256 px when made, else the largest below it, else the smallest."""
    sizes = sorted(settings.thumbnail_sizes)
    below = [s for s in sizes if s <= 256]
    return below[-1] if below else sizes[0]


def _todo(lake: Lake, size: int) -> pa.Table:
    """``file, image_id, width, height`` of every image with a ``size`` thumbnail and no quality row."""
    thumbs = open_table(lake, "thumbnails")
    uris = thumbs.file_uris()
    if not uris:
        return TODO_SCHEMA.empty_table()
    by_suffix = {u.split("://", 1)[-1]: u for u in uris}
    parts = []
    for fragment in thumbs.to_pyarrow_dataset().get_fragments():
        path = fragment.path
        uri = by_suffix.get(path) or next((u for s, u in by_suffix.items() if s.endswith(path) or path.endswith(s)), path)
        ids = fragment.to_table(columns=["image_id"], filter=pads.field("size") == size).column("image_id")
        parts.append(pa.table({"file": pa.array([uri] * len(ids), pa.string()), "image_id": ids.cast(pa.string())}))
    located = pa.concat_tables(parts) if parts else pa.table({"file": pa.array([], pa.string()),
                                                             "image_id": pa.array([], pa.string())})
    con = duckdb.connect(config={"threads": 2})
    try:
        con.register("located", located)
        images, done = open_table(lake, "images"), open_table(lake, "image_quality")
        if not images.file_uris():
            return TODO_SCHEMA.empty_table()
        con.register("images", images.to_pyarrow_dataset())
        anti = ""
        if done.file_uris():
            con.register("done", done.to_pyarrow_dataset())
            anti = "ANTI JOIN done d ON d.image_id = l.image_id"
        sql = (f"SELECT DISTINCT ON (l.image_id) l.file, l.image_id, i.width, i.height FROM located l "
               f"JOIN images i ON i.image_id = l.image_id {anti} ORDER BY l.image_id")
        table = con.sql(f"SELECT * FROM ({sql}) ORDER BY file, image_id").to_arrow_table()
    finally:
        con.close()
    return table.cast(TODO_SCHEMA)


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
        todo = _todo(lake, size)
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
                n_parts = max(math.ceil(todo.num_rows / _ROWS_PER_PARTITION),
                              min(default_parallelism(settings) * 2, todo.num_rows))
                stats = runner.map_partitions(partial(quality_partition, job=job), todo, n_parts,
                                              QUALITY_STATS_SCHEMA, desc="quality").to_pylist()
            finally:
                if owned:
                    runner.close()
            files = [s["file"] for s in stats if s["file"]]
            committed = commit_staged(lake, "image_quality", files, run_id=run.run_id, dedupe=True)
            remove_staging(lake.staging_dir(run.run_id))  # local or object store
            result.update(rows_out=committed.rows, unreadable=sum(s["unreadable"] for s in stats))
        run.rows_out = result["rows_out"]
        run.metrics.update(size=size, measured=result["rows_out"], unreadable=result["unreadable"])
    seconds = run.metrics.get("seconds") or 0.0
    result["images_per_s"] = round(result["rows_out"] / seconds, 1) if seconds else None
    return result
