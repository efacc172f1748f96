"""``job_runs``: a run killed mid-way is not ``running`` forever; older lakes stay readable."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from jobs.runs import job_run, mark_abandoned
from lake.catalog import TABLES, Lake
from lake.commit import commit_rows, now_utc
from lake.run_liveness import this_process
from lake.settings import Settings
from lake.status import lake_status

REPO = Path(__file__).resolve().parent.parent

_HOLD = """
import sys, time
from jobs.runs import job_run
from lake.catalog import Lake
from lake.settings import Settings
lake = Lake.at(sys.argv[1])
with job_run(lake, "ingest", {"images": "/data"}, settings=Settings(lake=lake.root)) as run:
    print(run.run_id, flush=True)
    time.sleep(600)
"""


def _rows(lake: Lake) -> list[dict]:
    return DeltaTable(lake.table_uri("job_runs")).to_pyarrow_table().to_pylist()


def _status_of(lake: Lake, run_id: str, **kw) -> dict:
    return next(r for r in lake_status(lake, **kw)["runs"] if r["run_id"] == run_id)


def test_a_run_killed_with_sigkill_is_marked_abandoned_by_the_next_run_and_shown_so(lake):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, lake.root], cwd=REPO, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE)
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id.startswith("ingest-"), "the child did not start its run"
        running = [r for r in _rows(lake) if r["run_id"] == run_id]
        assert [r["state"] for r in running] == ["running"]
        assert running[0]["host"] == socket.gethostname() and running[0]["pid"] == proc.pid
        assert running[0]["process"], "Linux records the process identity"
        # alive: status and a new run leave it running
        assert _status_of(lake, run_id)["state"] == "running"
        with job_run(lake, "grid", settings=Settings(lake=lake.root)):
            pass
        assert _status_of(lake, run_id)["state"] == "running"
        assert not [r for r in _rows(lake) if r["state"] == "abandoned"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    shown = _status_of(lake, run_id)  # status only reads, and already tells
    assert shown["state"] == "abandoned" and f"its process {proc.pid} on {socket.gethostname()} is gone" in shown["error"]
    assert not [r for r in _rows(lake) if r["state"] == "abandoned"], "status must not write"
    cli = subprocess.run([sys.executable, "-m", "imagelake", "--lake", lake.root, "status", "--format", "json"],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert next(r for r in json.loads(cli.stdout)["runs"] if r["run_id"] == run_id)["state"] == "abandoned"
    with job_run(lake, "grid", settings=Settings(lake=lake.root)) as later:
        pass
    marked = [r for r in _rows(lake) if r["run_id"] == run_id and r["state"] == "abandoned"]
    assert len(marked) == 1 and marked[0]["ended_at"] is not None and marked[0]["pid"] == proc.pid
    assert marked[0]["job"] == "ingest" and f"noticed by run {later.run_id}" in marked[0]["error"]
    assert _status_of(lake, run_id)["state"] == "abandoned"
    assert _status_of(lake, later.run_id)["state"] == "succeeded"
    assert mark_abandoned(lake, 72, by="again") == [], "a marked run is not marked twice"
    assert len([r for r in _rows(lake) if r["state"] == "abandoned"]) == 1


def _running_row(run_id: str, started_at: dt.datetime, **process) -> dict:
    return dict(run_id=run_id, job="embed", state="running", started_at=started_at, args="{}", **process)


def test_runs_this_host_cannot_see_are_judged_by_age_and_a_reused_pid_does_not_pass(lake):
    now = now_utc()
    me = this_process()
    commit_rows(lake, "job_runs", [
        _running_row("far-old", now - dt.timedelta(hours=100), host="other-node", pid=os.getpid(), process=None),
        _running_row("far-new", now - dt.timedelta(hours=1), host="other-node", pid=1, process=None),
        _running_row("mine", now, **me),
        _running_row("reused-pid", now, host=me["host"], pid=me["pid"],
                     process=me["process"].rsplit("/", 1)[0] + "/1"),  # same pid, another start time
        _running_row("other-namespace", now, host=me["host"], pid=999_999_999,
                     process="another-boot/pid:[1]/5"),
    ], run_id="seed")
    states = {r["run_id"]: (r["state"], r["error"]) for r in lake_status(lake, abandon_after_h=72)["runs"]}
    assert states["far-old"][0] == "abandoned" and "on host other-node, past run_abandon_h = 72" in states["far-old"][1]
    assert states["far-new"] == ("running", None)
    assert states["mine"] == ("running", None)
    assert states["reused-pid"][0] == "abandoned" and "the pid now belongs to another process" in states["reused-pid"][1]
    assert states["other-namespace"] == ("running", None), "a process in another namespace is judged by age"
    assert sorted(mark_abandoned(lake, 72, by="sweep")) == ["far-old", "reused-pid"]
    never = {r["run_id"]: r["state"] for r in lake_status(lake, abandon_after_h=0)["runs"]}
    assert never["far-new"] == "running" and never["far-old"] == "abandoned"  # its row is written now


def test_an_older_lakes_job_runs_table_gains_the_columns_and_its_running_rows_are_judged_by_age(tmp_path):
    lake = Lake.at(tmp_path / "old-lake").ensure()
    old_schema = pa.schema([f for f in TABLES["job_runs"].schema if f.name not in ("host", "pid", "process")])
    started = now_utc() - dt.timedelta(hours=200)
    write_deltalake(lake.table_uri("job_runs"), pa.Table.from_pylist(
        [dict(run_id="old-run", job="ingest", state="running", started_at=started, args="{}")], schema=old_schema))
    assert _status_of(lake, "old-run", abandon_after_h=72)["state"] == "abandoned"  # readable before any upgrade
    with job_run(lake, "tag", settings=Settings(lake=lake.root, run_abandon_h=72)) as run:
        pass
    assert {"host", "pid", "process"} <= set(DeltaTable(lake.table_uri("job_runs")).schema().to_arrow().names)
    by_run = {(r["run_id"], r["state"]): r for r in _rows(lake)}
    assert by_run[("old-run", "running")]["host"] is None
    assert "on an unrecorded host" in by_run[("old-run", "abandoned")]["error"]
    assert by_run[(run.run_id, "succeeded")]["pid"] == os.getpid()


def test_a_run_that_ends_after_being_judged_abandoned_keeps_its_real_end(lake):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        row = _running_row("slow", now_utc(), host=socket.gethostname(), pid=proc.pid, process=None)
        commit_rows(lake, "job_runs", [row], run_id="slow:start")
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.1)
    assert mark_abandoned(lake, 72, by="sweep") == ["slow"]
    commit_rows(lake, "job_runs", [dict(row, state="succeeded", ended_at=now_utc())], run_id="slow:end")
    assert _status_of(lake, "slow")["state"] == "succeeded"
