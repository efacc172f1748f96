"""Job-run bookkeeping: a ``job_runs`` row when a run starts and one when it ends."""

from __future__ import annotations

import json
import logging
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from lake.catalog import Lake
from lake.commit import commit_rows, now_utc

__all__ = ["JobRun", "job_run", "new_run_id"]

log = logging.getLogger("imagelake.jobs")


def new_run_id(job: str) -> str:
    """Sortable and unique: ``<job>-<UTC time>-<random>``."""
    return f"{job}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


@dataclass
class JobRun:
    run_id: str
    job: str
    rows_in: int = 0
    rows_out: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)


@contextmanager
def job_run(lake: Lake, job: str, args: dict[str, Any] | None = None,
            run_id: str | None = None) -> Iterator[JobRun]:
    """Records the run in ``job_runs`` (state running, then succeeded or failed with the error).

    The body fills ``rows_in``, ``rows_out`` and ``metrics``; an exception is recorded and re-raised.
    """
    run = JobRun(run_id or new_run_id(job), job)
    started = now_utc()
    base = dict(run_id=run.run_id, job=job, started_at=started, args=json.dumps(args or {}, default=str))
    commit_rows(lake, "job_runs", [dict(base, state="running")], run_id=f"{run.run_id}:start")
    t0 = time.perf_counter()
    try:
        yield run
    except BaseException as e:
        run.metrics["seconds"] = round(time.perf_counter() - t0, 3)
        commit_rows(lake, "job_runs", [dict(base, state="failed", ended_at=now_utc(), rows_in=run.rows_in,
                                            rows_out=run.rows_out, metrics=json.dumps(run.metrics),
                                            error=f"{type(e).__name__}: {e}"[:2000])],
                    run_id=f"{run.run_id}:end")
        raise
    run.metrics["seconds"] = round(time.perf_counter() - t0, 3)
    commit_rows(lake, "job_runs", [dict(base, state="succeeded", ended_at=now_utc(), rows_in=run.rows_in,
                                        rows_out=run.rows_out, metrics=json.dumps(run.metrics, default=str))],
                run_id=f"{run.run_id}:end")
    log.info("%s %s: %d in, %d out, %s", job, run.run_id, run.rows_in, run.rows_out, run.metrics)
