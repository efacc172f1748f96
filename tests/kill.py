"""kill -9 at a chosen point of a running job, and the proof that the kill landed mid-run.

A kill trial that sleeps a fixed time and then kills "if still running" passes on clean runs too (a
fast machine finishes first) and proves nothing. Here the test waits for an observable point inside
the run: a task's file staged under ``<lake>/_staging/<job>-<id>/`` (created when a partition starts
writing, removed by the driver only after its commit and before the run's end row). A trial
fails if the process ended before that point or if its exit status is not SIGKILL; afterwards
:func:`unfinished_runs` shows the run still ``running`` in ``job_runs`` (no end row), which only a
run killed before it finished can leave.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

__all__ = ["staging_folders", "staged_files", "unfinished_runs", "kill_when"]


def staging_folders(lake_dir: Path) -> set[str]:
    """Names of the run folders under ``<lake>/_staging`` now (earlier killed runs leave theirs)."""
    try:
        return {p.name for p in (Path(lake_dir) / "_staging").iterdir()}
    except FileNotFoundError:
        return set()


def staged_files(lake_dir: Path, job: str, ignore: set[str] = frozenset()) -> int:
    """Files (finished or being written) by tasks in the staging folders of runs of ``job``, except
    the folders named in ``ignore`` (the driver's own ``_listing``/``_input-*`` files not counted)."""
    staging = Path(lake_dir) / "_staging"
    n = 0
    try:
        runs = [p for p in staging.iterdir() if p.name.startswith(f"{job}-") and p.name not in ignore]
    except FileNotFoundError:
        return 0
    for run in runs:
        for _, dirs, files in os.walk(run):
            dirs[:] = [d for d in dirs if not d.startswith("_")]  # the driver's staged inputs, not tasks' files
            n += len(files)
    return n


def unfinished_runs(lake_dir: Path) -> set[str]:
    """Run ids with a ``running`` row in ``job_runs`` and no later row (succeeded/failed/...)."""
    from deltalake import DeltaTable

    table = Path(lake_dir) / "tables" / "job_runs"
    if not (table / "_delta_log").exists():
        return set()
    rows = DeltaTable(str(table)).to_pyarrow_table(columns=["run_id", "state"]).to_pylist()
    started = {r["run_id"] for r in rows if r["state"] == "running"}
    ended = {r["run_id"] for r in rows if r["state"] != "running"}
    return started - ended


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 300,
              poll_s: float = 0.01) -> float:
    """Wait until ``ready()``, then SIGKILL ``proc``'s process group (started with
    ``start_new_session=True``) and assert that the kill is what ended it.

    Fails when the process exits before ``ready()`` (the trial would be a clean run) or the wait
    exceeds ``timeout``. Returns the seconds from the call to the kill.
    """
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {(err or '')[-3000:]}")
        if time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(poll_s)
    waited = time.monotonic() - t0
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}, not SIGKILL, after {what}"
    return waited
