"""The ingest driver: list, keep only new files, run partitions, commit once per table.

Commit order is part of the crash story: thumbnails and images first, then rejects, and
``sources`` last. ``sources`` (with ``rejects``) is what the next run's listing is compared with,
so a run killed before its last commit re-reads those files next time; every commit drops keys
already present, so nothing is duplicated either way.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import partial

import duckdb
import pyarrow as pa

from jobs.capture import capture_issue_counts
from jobs.ingest.listing import LISTING_SCHEMA, default_collection, iter_source
from jobs.ingest.partition import STATS_SCHEMA, IngestJob, ingest_partition
from jobs.runner import INPUT_BATCH_ROWS, Runner, StagedInput, default_parallelism, make_runner, stage_input
from jobs.runs import job_run
from lake.catalog import Lake
from lake.commit import commit_staged, ensure_tables, open_table
from lake.lock import LakeLock
from lake.settings import Settings
from lake.staging import StagedWriter, remove_staging, staged_dataset

__all__ = ["IngestSummary", "run_ingest", "new_files", "stage_new_files"]

log = logging.getLogger("imagelake.ingest")

COMMIT_ORDER = (("thumbnails", False), ("images", True), ("capture", False), ("rejects", False), ("sources", False))


@dataclass
class IngestSummary:
    run_id: str
    listed: int = 0
    new: int = 0
    ok: int = 0
    rejected: int = 0
    committed: dict[str, int] = field(default_factory=dict)
    capture_issues: dict[str, int] = field(default_factory=dict)  # "<field>:<reason>" -> images
    seconds: float = 0.0

    def line(self) -> str:
        c = self.committed
        return (f"ingest {self.run_id}: {self.listed} files listed, {self.new} new, {self.ok} read, "
                f"{self.rejected} rejected; committed {c.get('images', 0)} images, "
                f"{c.get('sources', 0)} paths, {c.get('thumbnails', 0)} thumbnails, "
                f"{c.get('rejects', 0)} rejects in {self.seconds:.1f} s")


def _new_files_sql(con: duckdb.DuckDBPyConnection, lake: Lake) -> str:
    """The query of the rows of the registered relation ``listing`` that are new, by uri."""
    parts = []
    for i, name in enumerate(("sources", "rejects")):
        t = open_table(lake, name)
        if t.file_uris():
            con.register(f"known{i}", t.to_pyarrow_dataset())
            parts.append(f"SELECT uri, bytes, mtime FROM known{i}")
    if not parts:
        return "SELECT l.* FROM listing l ORDER BY l.uri"
    return (f"SELECT l.* FROM listing l ANTI JOIN ({' UNION ALL '.join(parts)}) k "
            "ON l.uri = k.uri AND l.bytes IS NOT DISTINCT FROM k.bytes "
            "AND l.mtime IS NOT DISTINCT FROM k.mtime ORDER BY l.uri")


def new_files(lake: Lake, listing: pa.Table) -> pa.Table:
    """The rows of ``listing`` not yet recorded in ``sources`` or ``rejects`` with the same size and mtime."""
    con = duckdb.connect()
    try:
        con.register("listing", listing)
        return con.sql(_new_files_sql(con, lake)).to_arrow_table().cast(listing.schema)
    finally:
        con.close()


def _stage_listing(staging_dir: str, chunks) -> tuple[list[str], int]:
    """Write the listing's chunks to ``<staging>/_listing/``; (files, rows). One chunk in memory."""
    files, rows = [], 0
    for i, chunk in enumerate(chunks):
        w = StagedWriter(staging_dir, "_listing", i, LISTING_SCHEMA)
        try:
            w.write(chunk)
            path = w.close()
        except BaseException:
            w.abort()
            raise
        if path:
            files.append(path)
            rows += chunk.num_rows
    return files, rows


def stage_new_files(lake: Lake, settings: Settings, staging_dir: str, listing_files: list[str]) -> StagedInput:
    """The new files of a staged listing, staged as the ingest tasks' input (one file per partition).

    The anti-join against ``sources``/``rejects`` runs in DuckDB over the staged files and the
    tables' Parquet files, and its sorted result is streamed into the partition files in bounded
    batches: the driver never holds the new rows.
    """
    con = duckdb.connect()
    try:
        con.execute("SET threads=2")
        con.register("listing", staged_dataset(listing_files, LISTING_SCHEMA))
        sql = _new_files_sql(con, lake)
        n = con.sql(f"SELECT count(*) FROM ({sql})").fetchall()[0][0]
        cores = default_parallelism(settings)
        n_parts = max(math.ceil(n / settings.partition_files), min(cores * 2, n)) if n else 1
        reader = con.sql(sql).to_arrow_reader(INPUT_BATCH_ROWS)
        return stage_input(staging_dir, "ingest", reader, n, n_parts, LISTING_SCHEMA)
    finally:
        con.close()


def run_ingest(lake: Lake, settings: Settings, images: str, collection: str | None = None,
               runner: Runner | None = None, progress: bool = False, run_id: str | None = None) -> IngestSummary:
    """Ingest the files under ``images`` that the lake has not seen yet.

    Args:
        images: a folder, a list file (one path/URI per line) or a URI prefix.
        collection: the ``collection`` column; defaults to the folder's name.
        runner: where partitions run; by default ``settings.runner`` (Spark unless set to local).
    Raises:
        LockHeld: another ingest of this lake is running.
        NotFound / BadInput: ``images`` does not exist or cannot be listed.
    """
    collection = collection or default_collection(images)
    ensure_tables(lake)
    with LakeLock(lake, "ingest", timeout=0, holder="ingest"):
        chunks = iter_source(images)  # checks images now; lists while staging
        owned = runner is None
        runner = runner or make_runner(settings, progress=progress)
        try:
            with job_run(lake, "ingest", {"images": images, "collection": collection}, run_id=run_id,
                         settings=settings) as run:
                staging = lake.staging_dir(run.run_id)
                listing_files, listed = _stage_listing(staging, chunks)
                summary = IngestSummary(run.run_id, listed=listed)
                todo = stage_new_files(lake, settings, staging, listing_files)
                summary.new = run.rows_in = todo.num_rows
                if todo.num_rows:
                    _process(lake, settings, runner, todo, collection, run.run_id, summary)
                remove_staging(staging)
                run.rows_out = summary.committed.get("images", 0)
                run.metrics.update(listed=summary.listed, new=summary.new, ok=summary.ok,
                                   rejected=summary.rejected, committed=summary.committed,
                                   capture_issues=summary.capture_issues)
            summary.seconds = run.metrics.get("seconds", 0.0)
        finally:
            if owned:
                runner.close()
    return summary


def _process(lake: Lake, settings: Settings, runner: Runner, todo: StagedInput, collection: str,
             run_id: str, summary: IngestSummary) -> None:
    job = IngestJob.from_settings(settings, run_id=run_id, staging_dir=lake.staging_dir(run_id), collection=collection)
    stats = runner.map_partitions(partial(ingest_partition, job=job), todo, todo.num_partitions, STATS_SCHEMA,
                                  desc="ingest").to_pylist()
    summary.ok = sum(s["n_ok"] for s in stats)
    summary.rejected = sum(s["n_rejected"] for s in stats)
    summary.capture_issues = capture_issue_counts(stats)
    for table, assign_seq in COMMIT_ORDER:
        files = [s[f"{table}_file"] for s in stats if s.get(f"{table}_file")]
        result = commit_staged(lake, table, files, run_id=run_id, dedupe=True, assign_seq=assign_seq)
        summary.committed[table] = result.rows
