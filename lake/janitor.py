"""The janitor: removes what killed or retried work left behind, never anything a reader needs.

* Staging folders of runs that ended (``job_runs`` says succeeded or failed) go at once; those of
  runs that never ended (killed) go once older than ``older_than_h``.
* Data files inside a Delta table folder that no version of the table references (a writer killed
  between writing Parquet and committing) go once older than ``older_than_h``. Referenced = the
  current version's files plus every file a commit still in ``_delta_log`` added or removed (so
  time travel keeps working until the log itself is cleaned).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass

from lake.catalog import TABLES, Lake
from lake.commit import open_table
from lake.lock import LakeLock

__all__ = ["JanitorReport", "clean"]


@dataclass(frozen=True)
class JanitorReport:
    staging_dirs: int
    orphan_files: int
    bytes_freed: int

    def line(self) -> str:
        return (f"janitor: removed {self.staging_dirs} staging folders and {self.orphan_files} orphan data "
                f"files ({self.bytes_freed / 1e6:.1f} MB)")


def _ended_runs(lake: Lake) -> set[str]:
    t = open_table(lake, "job_runs").to_pyarrow_table(columns=["run_id", "state"])
    return {r["run_id"] for r in t.to_pylist() if r["state"] in ("succeeded", "failed")}


def _size(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def _referenced(table_dir: str) -> set[str]:
    refs: set[str] = set()
    log_dir = os.path.join(table_dir, "_delta_log")
    for name in os.listdir(log_dir):
        if name.endswith(".json"):
            with open(os.path.join(log_dir, name)) as f:
                for line in f:
                    action = json.loads(line)
                    for kind in ("add", "remove"):
                        if kind in action:
                            refs.add(action[kind]["path"])
    return refs


def clean(lake: Lake, older_than_h: float = 24.0) -> JanitorReport:
    """Remove staging leftovers and orphaned data files; returns what was removed. Local lakes only."""
    if not lake.is_local:
        return JanitorReport(0, 0, 0)
    cutoff = time.time() - older_than_h * 3600
    dirs = files = freed = 0
    with LakeLock(lake, "commit", timeout=600, holder="janitor"):
        ended = _ended_runs(lake)
        staging = lake.path("_staging")
        for run_id in sorted(os.listdir(staging)) if os.path.isdir(staging) else []:
            path = os.path.join(staging, run_id)
            if run_id in ended or os.path.getmtime(path) < cutoff:
                freed += _size(path)
                shutil.rmtree(path, ignore_errors=True)
                dirs += 1
        for name in TABLES:
            table_dir = lake.table_uri(name)
            if not os.path.isdir(os.path.join(table_dir, "_delta_log")):
                continue
            refs = _referenced(table_dir) | {a for a in open_table(lake, name).get_add_actions(flatten=True)
                                              .column("path").to_pylist()}
            for dirpath, dirnames, filenames in os.walk(table_dir):
                dirnames[:] = [d for d in dirnames if d != "_delta_log"]
                for f in filenames:
                    full = os.path.join(dirpath, f)
                    rel = os.path.relpath(full, table_dir)
                    if rel in refs or not f.endswith(".parquet"):
                        continue
                    if os.path.getmtime(full) < cutoff:
                        freed += os.path.getsize(full)
                        os.remove(full)
                        files += 1
    return JanitorReport(dirs, files, freed)
