"""Capture metadata (EXIF/IPTC/XMP) read at ingest into the ``capture`` table; see :mod:`jobs.capture.exif`."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter

from jobs.capture.exif import CAPTURE_FIELDS, read_capture
from lake.staging import StagedWriter

__all__ = ["CAPTURE_FIELDS", "CaptureStager", "capture_issue_counts", "read_capture"]


def capture_issue_counts(stats: list[dict]) -> dict[str, int]:
    """Images per capture issue over the ingest tasks' stats rows (their ``capture_issues`` JSON)."""
    total: Counter[str] = Counter()
    for s in stats:
        if s.get("capture_issues"):
            total.update(json.loads(s["capture_issues"]))
    return dict(sorted(total.items()))


class CaptureStager:
    """One ingest task's ``capture`` rows: read from each accepted image's bytes, staged like the
    task's other tables (``_staging/<run>/capture/part-<partition>.parquet``), issues counted."""

    def __init__(self, staging_dir: str, partition: int, *, run_id: str, created_at: dt.datetime,
                 max_block_bytes: int):
        from lake.catalog import TABLES

        spec = TABLES["capture"]
        self._writer = StagedWriter(staging_dir, "capture", partition, spec.schema, sort_by=spec.sort_by)
        self._rows: list[dict] = []
        self.run_id, self.created_at, self.max_block_bytes = run_id, created_at, max_block_bytes
        self.issues: Counter[str] = Counter()

    def add(self, data: bytes, image_id: str) -> None:
        row = read_capture(data, image_id, max_block_bytes=self.max_block_bytes)
        row.update(run_id=self.run_id, created_at=self.created_at)
        self.issues.update(row["issues"])
        self._rows.append(row)

    def flush(self) -> None:
        self._writer.write(self._rows)
        self._rows = []

    def close(self) -> tuple[str | None, str]:
        """(the staged file or None, the issue counts as JSON)."""
        self.flush()
        return self._writer.close(), json.dumps(dict(sorted(self.issues.items())))

    def abort(self) -> None:
        self._writer.abort()
