"""Job-run bookkeeping: a ``job_runs`` row when a run starts and one when it ends.

A process killed mid-run (``kill -9``, the OOM killer, a lost node) writes no end row, so its run
would read ``running`` forever. The running row names the process (host, pid, process identity),
and every run started with settings first marks earlier runs whose process is gone as
``abandoned`` (:func:`mark_abandoned`; how "gone" is judged: :mod:`lake.run_liveness`).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from lake.catalog import Lake
from lake.commit import commit_rows, now_utc, open_table
from lake.migrate import upgrade_table
from lake.run_liveness import abandon_reason, latest_runs, this_process
from lake.settings import Settings

__all__ = ["JobRun", "job_run", "record_finished_runs", "new_run_id", "abandoned_runs", "mark_abandoned"]

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


def abandoned_runs(lake: Lake, abandon_after_h: float) -> list[tuple[dict[str, Any], str]]:
    """(running row, reason) of every run whose latest row is ``running`` and that is abandoned."""
    rows = open_table(lake, "job_runs").to_pyarrow_table().to_pylist()
    out = []
    for row in latest_runs(rows).values():
        if row["state"] == "running":
            reason = abandon_reason(row, abandon_after_h)
            if reason:
                out.append((row, reason))
    return out


def mark_abandoned(lake: Lake, abandon_after_h: float, by: str) -> list[str]:
    """Write an ``abandoned`` row (ended_at = now, error = why) for each abandoned run; returns
    their run ids. Idempotent: a run already marked (by anyone) is not marked again."""
    found = abandoned_runs(lake, abandon_after_h)
    if not found:
        return []
    now = now_utc()
    rows = [{k: row.get(k) for k in ("run_id", "job", "started_at", "args", "host", "pid", "process")}
            | dict(state="abandoned", ended_at=now, error=f"abandoned: {reason} (noticed by run {by})")
            for row, reason in found]
    commit_rows(lake, "job_runs", rows, run_id=f"{by}:abandoned", dedupe=True)
    ids = [r["run_id"] for r in rows]
    log.warning("marked %d run(s) abandoned: %s", len(ids), ", ".join(ids))
    return ids


@contextmanager
def job_run(lake: Lake, job: str, args: dict[str, Any] | None = None,
            run_id: str | None = None, settings: Settings | None = None) -> Iterator[JobRun]:
    """Records the run in ``job_runs`` (state running, then succeeded or failed with the error).

    The body fills ``rows_in``, ``rows_out`` and ``metrics``; an exception is recorded and re-raised.
    With ``settings`` (every CLI job passes them), runs abandoned by dead processes are marked
    first (``settings.run_abandon_h`` for the ones judged by age); the per-upload runs of the API
    leave that to the jobs.
    """
    run = JobRun(run_id or new_run_id(job), job)
    upgrade_table(lake, "job_runs")  # lakes made before host/pid/process existed
    if settings is not None:
        mark_abandoned(lake, settings.run_abandon_h, by=run.run_id)
    started = now_utc()
    base = dict(run_id=run.run_id, job=job, started_at=started, args=json.dumps(args or {}, default=str),
                **this_process())
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


def record_finished_runs(lake: Lake, runs: list[tuple[JobRun, Any, dict[str, Any]]], commit_id: str) -> None:
    """Record runs that ran in-process in a fraction of a second (an upload's ingest and embed
    steps) with one ``succeeded`` row each, all in one commit, and no ``running`` row before them:
    four commits of :func:`job_run` would be most of an upload's time. ``runs``: (run, started_at,
    args). A process killed before this commit leaves rows whose ``run_id`` has no ``job_runs``
    row; nothing reads them as a running run.
    """
    if not runs:
        return
    upgrade_table(lake, "job_runs")
    ended = now_utc()
    rows = [dict(run_id=run.run_id, job=run.job, started_at=started, args=json.dumps(args, default=str),
                 **this_process(), state="succeeded", ended_at=ended, rows_in=run.rows_in, rows_out=run.rows_out,
                 metrics=json.dumps(run.metrics, default=str)) for run, started, args in runs]
    commit_rows(lake, "job_runs", rows, run_id=commit_id)
