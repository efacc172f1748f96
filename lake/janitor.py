"""The janitor: removes what killed or retried work left behind, never anything a reader needs.

* Staging folders of runs that ended (``job_runs`` says succeeded or failed) go at once; those of
  runs that never ended (killed) go once older than ``older_than_h``.
* Data files inside a Delta table folder that no version of the table references (a writer killed
  between writing Parquet and committing) go once older than ``older_than_h``. Referenced = the
  current version's files plus every file a commit still in ``_delta_log`` added or removed (so
  time travel keeps working until the log itself is cleaned).
* Superseded artifacts: suggestion matrices of older ``features`` versions and tag-model versions
  older than the current one, keeping the newest ``keep_artifacts`` of each (the one in use and
  the one before it, by default) and anything younger than ``older_than_h`` (a server process may
  still map it; Linux keeps a mapped file readable after it is unlinked anyway).
"""

from __future__ import annotations

import json
import os
import re
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
    old_artifacts: int = 0

    def line(self) -> str:
        return (f"janitor: removed {self.staging_dirs} staging folders, {self.orphan_files} orphan data "
                f"files and {self.old_artifacts} superseded artifacts ({self.bytes_freed / 1e6:.1f} MB)")


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


def _superseded(lake: Lake, keep: int) -> list[str]:
    """Artifact folders that are neither among the newest ``keep`` of their kind nor current."""
    out: list[str] = []
    suggest = lake.artifacts_dir("suggest")
    for model in sorted(os.listdir(suggest)) if os.path.isdir(suggest) else []:
        builds: dict[str, list[tuple[int, str]]] = {}
        for name in os.listdir(os.path.join(suggest, model)):
            m = re.fullmatch(r"v(\d+)-pca(\d+)", name)
            if m:
                builds.setdefault(m.group(2), []).append((int(m.group(1)), name))
        for versions in builds.values():  # per PCA width: readers map the newest features version
            out += [os.path.join(suggest, model, name) for _, name in sorted(versions)[:-keep]]
    tags = lake.artifacts_dir("tags", "gnb")
    if os.path.isdir(tags):
        try:
            with open(os.path.join(tags, "CURRENT")) as f:
                current = int(f.read().strip())
        except (OSError, ValueError):
            current = None
        if current is not None:  # every correction writes a version; CURRENT names the one in use
            out += [os.path.join(tags, name) for name in sorted(os.listdir(tags))
                    if re.fullmatch(r"v\d{6}", name) and int(name[1:]) <= current - keep]
    return out


def clean(lake: Lake, older_than_h: float = 24.0, keep_artifacts: int = 2) -> JanitorReport:
    """Remove staging leftovers, orphaned data files and superseded artifacts; returns what was
    removed. Local lakes only."""
    if not lake.is_local:
        return JanitorReport(0, 0, 0)
    if keep_artifacts < 1:
        raise ValueError("keep_artifacts must be at least 1 (the artifact in use)")
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
    artifacts = 0
    for path in _superseded(lake, keep_artifacts):
        if os.path.getmtime(path) < cutoff:
            freed += _size(path)
            shutil.rmtree(path, ignore_errors=True)
            artifacts += 1
    return JanitorReport(dirs, files, freed, artifacts)
