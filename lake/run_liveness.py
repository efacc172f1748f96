"""Is a ``running`` job run still alive? Its process, on this host; its age, anywhere else.

A run writes ``host``, ``pid`` and ``process`` into its ``running`` row (``jobs.runs.job_run``).
``process`` pins the process exactly on Linux, ``<boot id>/<pid namespace>/<start ticks>``, so a
pid reused after the run died, or after a reboot, never passes for the run. A run killed with
``kill -9`` (or by the OOM killer, or a lost node) writes no end row; this module is how later runs
and ``imagelake status`` tell it from a live one:

* **Same host and pid namespace, same boot** (the usual case: cron, one machine): the run is
  ``abandoned`` as soon as its process is gone (no such pid, a zombie, or another process that
  reuses the pid).
* **Another host**, a container with its own pid namespace, a host that has rebooted since, or a
  row written before rows named their process: nothing here can see that process, so the run is
  judged by age only: ``abandoned`` once its ``running`` row is older than ``run_abandon_h``
  (0 turns that off and such runs stay ``running``). Pick a value longer than your longest run.

The latest row of a run decides its state: ``succeeded``/``failed`` beat ``abandoned``, which beats
``running`` (a run judged abandoned that still ends keeps its real end).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from functools import lru_cache
from typing import Any, Iterable

__all__ = ["STATE_RANK", "this_process", "latest_runs", "abandon_reason"]

#: Which row of a run wins when it has several (higher wins).
STATE_RANK = {"running": 0, "abandoned": 1, "succeeded": 2, "failed": 2}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@lru_cache(maxsize=1)
def _namespace() -> str | None:
    """``<boot id>/<pid namespace inode>`` of this process (Linux), else None."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{ns}" if boot else None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks since boot) of ``pid`` from ``/proc``, or None."""
    text = _read(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, starttime 22
    return (fields[0], fields[19]) if len(fields) > 19 else None


def this_process() -> dict[str, Any]:
    """``host``, ``pid`` and ``process`` (None off Linux) for a ``running`` row."""
    pid = os.getpid()
    ns, stat = _namespace(), _proc_stat(pid)
    return {"host": socket.gethostname(), "pid": pid,
            "process": f"{ns}/{stat[1]}" if ns and stat else None}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _local_verdict(row: dict[str, Any]) -> str | None:
    """Why the run's process on this host is gone; None if it lives. Raises LookupError when this
    process cannot see it (another pid namespace or boot)."""
    pid, process = row.get("pid"), row.get("process")
    if pid is None:
        raise LookupError
    if process:
        ns, _, start = process.rpartition("/")
        if ns != _namespace():
            raise LookupError
        stat = _proc_stat(int(pid))
        if stat is None:
            return f"its process {pid} on {row['host']} is gone"
        if stat[0] in ("Z", "X"):
            return f"its process {pid} on {row['host']} has exited"
        if stat[1] != start:
            return f"its process {pid} on {row['host']} is gone (the pid now belongs to another process)"
        return None
    return None if _pid_alive(int(pid)) else f"its process {pid} on {row['host']} is gone"


def abandon_reason(row: dict[str, Any], abandon_after_h: float, now: dt.datetime | None = None) -> str | None:
    """Why the ``running`` row's run is abandoned, or None while it may still be running."""
    if row.get("host") == socket.gethostname():
        try:
            return _local_verdict(row)
        except LookupError:
            pass  # same name, but not a process this one can see: judge by age
    started = row.get("started_at")
    if abandon_after_h <= 0 or started is None:
        return None
    age_h = ((now or dt.datetime.now(dt.timezone.utc)) - started).total_seconds() / 3600
    if age_h <= abandon_after_h:
        return None
    where = f"on host {row['host']}" if row.get("host") else "on an unrecorded host"
    return (f"running {age_h:.0f} h {where}, past run_abandon_h = {abandon_after_h:g} "
            "(its process cannot be checked from here)")


def latest_runs(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """run id -> the row that decides the run's state (see :data:`STATE_RANK`)."""
    latest: dict[str, dict[str, Any]] = {}
    for r in rows:
        have = latest.get(r["run_id"])
        if have is None or STATE_RANK.get(r["state"], 2) >= STATE_RANK.get(have["state"], 2):
            latest[r["run_id"]] = r
    return latest
