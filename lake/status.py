"""What is in a lake: each table's Delta version, rows, files and bytes, and the latest job runs.

Row counts come from the Delta log's per-file statistics, so this never scans data.
"""

from __future__ import annotations

from typing import Any

from lake.catalog import TABLES, Lake
from lake.commit import open_table

__all__ = ["lake_status"]


def lake_status(lake: Lake, last_runs: int = 10) -> dict[str, Any]:
    tables: dict[str, Any] = {}
    for name in TABLES:
        dt_ = open_table(lake, name)
        adds = dt_.get_add_actions(flatten=True)
        rows = adds.column("num_records").to_pylist() if adds.num_rows else []
        sizes = adds.column("size_bytes").to_pylist() if adds.num_rows else []
        tables[name] = {"version": dt_.version(), "rows": int(sum(r or 0 for r in rows)),
                        "files": adds.num_rows, "bytes": int(sum(sizes))}
    runs = open_table(lake, "job_runs").to_pyarrow_table().to_pylist()
    latest: dict[str, dict] = {}
    for r in sorted(runs, key=lambda r: (r["started_at"], r["state"] != "running")):
        latest[r["run_id"]] = r
    recent = sorted(latest.values(), key=lambda r: r["started_at"], reverse=True)[:last_runs]
    return {"lake": lake.root, "tables": tables, "runs": [
        {k: r[k] for k in ("run_id", "job", "state", "started_at", "ended_at", "rows_in", "rows_out", "error")}
        for r in recent]}
