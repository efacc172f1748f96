"""Ingest one file whose bytes are in hand (an upload), in this process: no listing, staging, runner or job.

The ingest job's own per-file steps (:func:`jobs.ingest.partition.inspect` and
:func:`~jobs.ingest.partition.accepted_rows`, :func:`jobs.capture.read_capture` when
``capture_metadata`` is on) make the same rows the job would, and they are committed to the same
tables in the job's order (thumbnails, images, capture, sources: :data:`jobs.ingest.driver.COMMIT_ORDER`)
by :func:`lake.commit.commit_rows`, one deltalake append each that drops keys already present.
A process killed between two commits leaves rows a retry keeps and completes (an image without
its ``sources`` row is found by the next listing too); ``images.seq`` is numbered under the commit
lock as the job numbers it.

The caller holds the lake's ``ingest`` lock (so no ingest job runs beside it) and records the run
(:func:`jobs.runs.record_finished_runs`).
"""

from __future__ import annotations

import datetime as dt
import os

from jobs.ingest.partition import IngestJob, accepted_rows, inspect
from jobs.runs import JobRun, new_run_id
from lake.catalog import Lake
from lake.commit import commit_rows
from lake.settings import Settings

__all__ = ["ingest_file"]


def ingest_file(lake: Lake, settings: Settings, uri: str, data: bytes, collection: str) -> JobRun:
    """Ingest the file at ``uri`` (already stored, holding ``data``); the run, to record.

    Raises:
        Rejected: the bytes cannot be ingested (nothing is committed).
    """
    from jobs.ingest.driver import COMMIT_ORDER

    run = JobRun(new_run_id("ingest"), "ingest", rows_in=1)
    job = IngestJob.from_settings(settings, run_id=run.run_id, staging_dir="", collection=collection)
    info = inspect(job, data)
    rows = accepted_rows(job, info, uri, len(data), _mtime(uri, job.ingested_at))
    if job.capture:
        from jobs.capture import read_capture

        row = read_capture(data, info.image_id, max_block_bytes=job.capture_max_block_bytes)
        rows["capture"] = [dict(row, run_id=run.run_id, created_at=job.ingested_at)]
        run.metrics["capture_issues"] = {i: 1 for i in row["issues"]}
    committed = {}
    for table, assign_seq in COMMIT_ORDER:
        if rows.get(table):
            committed[table] = commit_rows(lake, table, rows[table], run_id=run.run_id, dedupe=True,
                                           assign_seq=assign_seq).rows
    run.rows_out = committed.get("images", 0)
    run.metrics.update(listed=1, new=1, ok=1, rejected=0, committed=committed, path="in-process")
    return run


def _mtime(uri: str, default: dt.datetime) -> dt.datetime:
    """The stored file's mtime as a listing states it (UTC, microseconds); ``default`` off a local disk."""
    if "://" in uri:
        return default
    return dt.datetime.fromtimestamp(os.stat(uri).st_mtime_ns // 1000 / 1e6, dt.timezone.utc)
