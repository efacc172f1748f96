"""The ingest partition function: files in, staged rows out. Pure compute; never commits.

For each file of its partition it reads the bytes, hashes them, validates the image and makes
thumbnails, then writes four staged Parquet files (images, sources, thumbnails, rejects) named by
run and partition. It yields one stats row naming those files; the driver commits exactly them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from jobs.capture import CaptureStager
from jobs.ingest.decode import Rejected, inspect_image
from jobs.runner import PartitionContext
from lake.catalog import TABLES
from lake.staging import StagedWriter, filesystem_for

__all__ = ["IngestJob", "ingest_partition", "inspect", "accepted_rows", "STATS_SCHEMA", "STAGED_TABLES"]

STAGED_TABLES = ("images", "sources", "thumbnails", "rejects")

STATS_SCHEMA = pa.schema([
    ("partition", pa.int32()), ("attempt", pa.int32()), ("n_in", pa.int64()), ("n_ok", pa.int64()),
    ("n_rejected", pa.int64()), ("bytes_read", pa.int64()),
    *[(f"{t}_file", pa.string()) for t in STAGED_TABLES],
    ("capture_file", pa.string()), ("capture_issues", pa.string()),  # jobs.capture (job.capture on)
])


@dataclass(frozen=True)
class IngestJob:
    """Everything a task needs, shipped to executors with the function (keep it small)."""

    run_id: str
    staging_dir: str
    collection: str
    max_bytes: int
    max_pixels: int
    thumbnail_sizes: tuple[int, ...]
    thumbnail_quality: int
    ingested_at: dt.datetime
    capture: bool = False              # read EXIF/IPTC/XMP into the capture table
    capture_max_block_bytes: int = 1 << 20

    @classmethod
    def from_settings(cls, settings, *, run_id: str, staging_dir: str, collection: str) -> "IngestJob":
        """The job of an ingest run under ``settings`` (limits, thumbnails, capture), stamped now."""
        return cls(run_id=run_id, staging_dir=staging_dir, collection=collection,
                   max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                   thumbnail_sizes=tuple(settings.thumbnail_sizes), thumbnail_quality=settings.thumbnail_quality,
                   ingested_at=dt.datetime.now(dt.timezone.utc), capture=settings.capture_metadata,
                   capture_max_block_bytes=settings.capture_max_block_bytes)


def inspect(job: IngestJob, data: bytes):
    """One file's bytes checked and thumbnailed under the job's limits (:func:`inspect_image`).

    Raises:
        Rejected: the file cannot be ingested (the ``rejects.reason``).
    """
    return inspect_image(data, max_pixels=job.max_pixels, thumbnail_sizes=job.thumbnail_sizes,
                         quality=job.thumbnail_quality)


def accepted_rows(job: IngestJob, info, uri: str, nbytes: int, mtime) -> dict[str, list[dict]]:
    """The ``images`` (seq 0: the commit numbers it), ``sources`` and ``thumbnails`` rows of one
    accepted file (``info``: :func:`inspect`'s answer)."""
    common = dict(image_id=info.image_id, collection=job.collection, bytes=nbytes, mtime=mtime,
                  run_id=job.run_id, ingested_at=job.ingested_at)
    return {"images": [dict(common, seq=0, uri=uri, format=info.format, width=info.width, height=info.height)],
            "sources": [dict(common, uri=uri)],
            "thumbnails": [dict(image_id=info.image_id, size=t.size, width=t.width, height=t.height, jpeg=t.jpeg)
                           for t in info.thumbnails]}


def _read(uri: str, size: int | None, max_bytes: int) -> bytes:
    if size is not None and size > max_bytes:
        raise Rejected("too_large", f"{size} bytes is more than max_image_bytes={max_bytes}")
    try:
        fs, path = filesystem_for(uri)
        with fs.open_input_stream(path) as f:
            data = f.read(max_bytes + 1)
    except (OSError, ValueError) as e:
        raise Rejected("unreadable", f"{type(e).__name__}: {e}") from None
    if len(data) > max_bytes:
        raise Rejected("too_large", f"more than max_image_bytes={max_bytes} bytes")
    return data


def ingest_partition(batches: Iterator[pa.RecordBatch], ctx: PartitionContext, *,
                     job: IngestJob) -> Iterator[pa.RecordBatch]:
    """Process one partition of the listing (columns uri, bytes, mtime)."""
    writers = {t: StagedWriter(job.staging_dir, t, ctx.partition_id, TABLES[t].schema,
                               sort_by=TABLES[t].sort_by, row_group_rows=TABLES[t].row_group_rows)
               for t in STAGED_TABLES}
    capture = CaptureStager(job.staging_dir, ctx.partition_id, run_id=job.run_id, created_at=job.ingested_at,
                            max_block_bytes=job.capture_max_block_bytes) if job.capture else None
    n_in = n_ok = n_rej = bytes_read = 0
    try:
        for batch in batches:
            rows = {t: [] for t in STAGED_TABLES}
            for rec in batch.to_pylist():
                n_in += 1
                uri, size, mtime = rec["uri"], rec["bytes"], rec["mtime"]
                try:
                    data = _read(uri, size, job.max_bytes)
                    bytes_read += len(data)
                    info = inspect(job, data)
                except Rejected as r:
                    n_rej += 1
                    rows["rejects"].append(dict(uri=uri, collection=job.collection, bytes=size, mtime=mtime,
                                                stage="ingest", reason=r.reason, detail=r.detail[:1000],
                                                run_id=job.run_id, rejected_at=job.ingested_at))
                    continue
                n_ok += 1
                for t, r in accepted_rows(job, info, uri, len(data), mtime).items():
                    rows[t].extend(r)
                if capture is not None:
                    capture.add(data, info.image_id)
            for t, r in rows.items():
                writers[t].write(r)
            if capture is not None:
                capture.flush()
        files = {t: w.close() for t, w in writers.items()}
        capture_file, capture_issues = capture.close() if capture is not None else (None, None)
    except BaseException:
        for w in writers.values():
            w.abort()
        if capture is not None:
            capture.abort()
        raise
    yield pa.RecordBatch.from_pylist([dict(partition=ctx.partition_id, attempt=ctx.attempt, n_in=n_in, n_ok=n_ok,
                                           n_rejected=n_rej, bytes_read=bytes_read,
                                           **{f"{t}_file": f for t, f in files.items()},
                                           capture_file=capture_file, capture_issues=capture_issues)],
                                         schema=STATS_SCHEMA)
