"""What is in a lake: each table's Delta version, rows, files and bytes, and the latest job runs.

Row counts come from the Delta log's per-file statistics, so this never scans data. A run whose
latest row says ``running`` but whose process is gone (:mod:`lake.run_liveness`) is shown as
``abandoned`` with the reason; status only reads, so the ``abandoned`` row itself is written by the
next job run.
"""

from __future__ import annotations

from typing import Any

from lake.catalog import TABLES, Lake
from lake.commit import open_table
from lake.run_liveness import abandon_reason, latest_runs
from lake.settings import Settings

__all__ = ["lake_status"]

_RUN_FIELDS = ("run_id", "job", "state", "started_at", "ended_at", "rows_in", "rows_out", "error", "host", "pid")


def lake_status(lake: Lake, last_runs: int = 10, abandon_after_h: float | None = None) -> dict[str, Any]:
    """Tables and the ``last_runs`` newest runs; ``abandon_after_h`` defaults to the
    ``run_abandon_h`` setting's default."""
    if abandon_after_h is None:
        abandon_after_h = Settings().run_abandon_h
    tables: dict[str, Any] = {}
    for name in TABLES:
        dt_ = open_table(lake, name)
        adds = dt_.get_add_actions(flatten=True)
        rows = adds.column("num_records").to_pylist() if adds.num_rows else []
        sizes = adds.column("size_bytes").to_pylist() if adds.num_rows else []
        tables[name] = {"version": dt_.version(), "rows": int(sum(r or 0 for r in rows)),
                        "files": adds.num_rows, "bytes": int(sum(sizes))}
    runs = open_table(lake, "job_runs").to_pyarrow_table().to_pylist()
    recent = sorted(latest_runs(runs).values(), key=lambda r: r["started_at"], reverse=True)[:last_runs]
    out = []
    for r in recent:
        run = {k: r.get(k) for k in _RUN_FIELDS}
        if r["state"] == "running":
            reason = abandon_reason(r, abandon_after_h)
            if reason:
                run.update(state="abandoned", error=f"abandoned: {reason}")
        out.append(run)
    return {"lake": lake.root, "tables": tables, "runs": out}
