"""The janitor: removes what killed or retried work left behind, never anything a reader needs.

* Staging folders of runs that ended (``job_runs`` says succeeded, failed or abandoned) go at once; those of
  runs that never ended (killed) go once older than ``older_than_h``.
* Data files inside a Delta table folder that no version of the table references (a writer killed
  between writing Parquet and committing) go once older than ``older_than_h``. Referenced = the
  current version's files plus every file a commit still in ``_delta_log`` added or removed (so
  time travel keeps working until the log itself is cleaned). A file a live writer has written but
  not committed yet looks the same, so each table is swept holding every lock its writers hold
  while they write and commit: ``commit`` for all tables, and ``bucket_events`` too for the bucket
  log (its writer takes only that one, so curation never waits on a batch job's commit).
* VACUUM: files that a commit removed (a metadata re-import rewrites the table, a bucket-log
  compaction rewrites the log, every such rewrite leaves the old copy) go once removed longer than
  ``vacuum_retention_h`` ago. A reader of any version committed within the retention still finds
  every file it needs; older versions may not be readable (time travel ends at the retention).
  Only tombstoned files (deltalake's "lite" vacuum): never a file the log does not know, which may be
  a writer's uncommitted one.
* Object-store lakes (``s3://``, ...) get the same sweep through :class:`lake.store.LakeStore`:
  a "folder" there is a key prefix, its age the newest object under it; the locks are the lake's
  leases (:mod:`lake.lock`), so a janitor on one machine and a writer on another exclude each other.
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
from contextlib import ExitStack
from dataclasses import dataclass

from lake.catalog import TABLES, Lake
from lake.commit import open_table
from lake.lock import LakeLock

__all__ = ["JanitorReport", "Vacuumed", "clean", "vacuum_table"]

# Locks a table's writers hold from writing a data file until its commit lands, besides ``commit``.
_WRITER_LOCKS = {"bucket_events": "bucket_events"}


@dataclass(frozen=True)
class Vacuumed:
    """What VACUUM reclaimed from one table."""

    table: str
    files: int
    bytes: int


@dataclass(frozen=True)
class JanitorReport:
    staging_dirs: int
    orphan_files: int
    bytes_freed: int  # everything, vacuum included
    old_artifacts: int = 0
    vacuumed: tuple[Vacuumed, ...] = ()  # the tables VACUUM reclaimed files from
    vacuum_retention_h: int | None = None  # None: no vacuum ran

    @property
    def vacuum_bytes(self) -> int:
        return sum(v.bytes for v in self.vacuumed)

    def line(self) -> str:
        """The report for people: a summary line, then one line per vacuumed table."""
        out = (f"janitor: removed {self.staging_dirs} staging folders, {self.orphan_files} orphan data "
               f"files and {self.old_artifacts} superseded artifacts "
               f"({(self.bytes_freed - self.vacuum_bytes) / 1e6:.1f} MB)")
        if self.vacuum_retention_h is None:
            return out
        out += (f"\nvacuum (files removed from tables over {self.vacuum_retention_h} h ago): "
                f"{sum(v.files for v in self.vacuumed)} files, {self.vacuum_bytes} bytes")
        for v in self.vacuumed:
            out += f"\n  {v.table}: {v.files} files, {v.bytes} bytes ({v.bytes / 1e6:.1f} MB)"
        return out


def _ended_runs(lake: Lake) -> set[str]:
    t = open_table(lake, "job_runs").to_pyarrow_table(columns=["run_id", "state"])
    return {r["run_id"] for r in t.to_pylist() if r["state"] in ("succeeded", "failed", "abandoned")}


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


def _tombstone_sizes(table_dir: str) -> dict[str, int]:
    """Size of each file a commit in ``_delta_log`` removed, as that commit recorded it."""
    sizes: dict[str, int] = {}
    log_dir = os.path.join(table_dir, "_delta_log")
    for name in os.listdir(log_dir):
        if name.endswith(".json"):
            with open(os.path.join(log_dir, name)) as f:
                for line in f:
                    remove = json.loads(line).get("remove")
                    if remove and remove.get("size") is not None:
                        sizes[remove["path"]] = int(remove["size"])
    return sizes


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


def _sweep_orphans(lake: Lake, name: str, table_dir: str, cutoff: float) -> tuple[int, int]:
    """Remove ``name``'s unreferenced data files older than ``cutoff``; (files, bytes). Call with
    the table's writer locks held: a file written but not yet committed is unreferenced too."""
    files = freed = 0
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
    return files, freed


def vacuum_table(lake: Lake, name: str, retention_h: int) -> Vacuumed:
    """VACUUM one table: delete the files its commits removed over ``retention_h`` hours ago.

    A dry run lists them first (and sizes them: deltalake reports names only); the real vacuum runs
    only when there is something to delete, because each one adds two commits to the log. Call with
    the table's writer locks held, so that no commit lands between the two. Local lakes.
    """
    table = open_table(lake, name)
    table_dir = lake.table_uri(name)
    sizes = {}
    for rel in table.vacuum(retention_hours=retention_h, dry_run=True, enforce_retention_duration=False):
        try:
            sizes[rel] = os.path.getsize(os.path.join(table_dir, rel))
        except FileNotFoundError:  # a tombstone stays in the log after its file went: listed every time
            pass
    if not sizes:
        return Vacuumed(name, 0, 0)
    removed = table.vacuum(retention_hours=retention_h, dry_run=False, enforce_retention_duration=False)
    late = [rel for rel in removed if rel not in sizes]  # crossed the retention since the dry run
    if late:
        logged = _tombstone_sizes(table_dir)
        sizes.update({rel: logged[rel] for rel in late if rel in logged})
    gone = [rel for rel in removed if rel in sizes and not os.path.exists(os.path.join(table_dir, rel))]
    return Vacuumed(name, len(gone), sum(sizes[rel] for rel in gone))


def clean(lake: Lake, older_than_h: float = 24.0, keep_artifacts: int = 2,
          vacuum_retention_h: int | None = 168) -> JanitorReport:
    """Remove staging leftovers, orphaned data files and superseded artifacts, and VACUUM every
    table past ``vacuum_retention_h`` hours (``None``: no vacuum); returns what was removed. Local
    lakes and object stores (see :func:`_clean_remote`)."""
    if keep_artifacts < 1:
        raise ValueError("keep_artifacts must be at least 1 (the artifact in use)")
    if vacuum_retention_h is not None and vacuum_retention_h < 0:
        raise ValueError("vacuum_retention_h must be 0 or more hours")
    if not lake.is_local:
        return _clean_remote(lake, older_than_h, keep_artifacts, vacuum_retention_h)
    vacuumed: list[Vacuumed] = []
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
            with ExitStack() as held:
                if name in _WRITER_LOCKS:  # held briefly: curators wait on it (poll as they do)
                    held.enter_context(LakeLock(lake, _WRITER_LOCKS[name], timeout=600, holder="janitor",
                                                poll=(0.0005, 0.004)))
                n, b = _sweep_orphans(lake, name, table_dir, cutoff)
                files, freed = files + n, freed + b
                if vacuum_retention_h is not None:
                    v = vacuum_table(lake, name, int(vacuum_retention_h))
                    if v.files:
                        vacuumed.append(v)
                        freed += v.bytes
    artifacts = 0
    for path in _superseded(lake, keep_artifacts):
        if os.path.getmtime(path) < cutoff:
            freed += _size(path)
            shutil.rmtree(path, ignore_errors=True)
            artifacts += 1
    return JanitorReport(dirs, files, freed, artifacts, tuple(vacuumed), vacuum_retention_h)


# -- object-store lakes ------------------------------------------------------------------------


def _groups(objects, depth: int) -> dict[str, list]:
    """Objects by the key prefix of their first ``depth`` parts (a "folder" on an object store)."""
    out: dict[str, list] = {}
    for o in objects:
        parts = o.key.split("/")
        if len(parts) > depth:
            out.setdefault("/".join(parts[:depth]), []).append(o)
    return out


def _delete_all(store, objects) -> int:
    freed = 0
    for o in objects:
        if store.delete(o.key):
            freed += o.size
    return freed


def _referenced_remote(store, table_key: str) -> set[str]:
    refs: set[str] = set()
    for o in store.list(f"{table_key}/_delta_log"):
        if o.key.endswith(".json"):
            for line in store.read_bytes(o.key).decode().splitlines():
                if line.strip():
                    action = json.loads(line)
                    for kind in ("add", "remove"):
                        if kind in action:
                            refs.add(action[kind]["path"])
    return refs


def _sweep_orphans_remote(lake: Lake, store, name: str, cutoff: float) -> tuple[int, int]:
    """:func:`_sweep_orphans` on an object store; call with the table's writer locks held."""
    from urllib.parse import unquote

    table_key = f"tables/{name}"
    refs = {unquote(r) for r in _referenced_remote(store, table_key)}
    refs |= {unquote(a) for a in open_table(lake, name).get_add_actions(flatten=True).column("path").to_pylist()}
    files = freed = 0
    for o in store.list(table_key):
        rel = o.key[len(table_key) + 1:]
        if rel.startswith("_delta_log/") or not rel.endswith(".parquet") or rel in refs:
            continue
        if o.mtime.timestamp() < cutoff and store.delete(o.key):
            files, freed = files + 1, freed + o.size
    return files, freed


def _vacuum_remote(lake: Lake, store, name: str, retention_h: int) -> Vacuumed:
    """:func:`vacuum_table` on an object store (sizes from the store's listing)."""
    table = open_table(lake, name)
    sizes = {o.key[len(f"tables/{name}/"):]: o.size for o in store.list(f"tables/{name}")}
    candidates = [rel for rel in table.vacuum(retention_hours=retention_h, dry_run=True,
                                              enforce_retention_duration=False) if rel in sizes]
    if not candidates:
        return Vacuumed(name, 0, 0)
    removed = table.vacuum(retention_hours=retention_h, dry_run=False, enforce_retention_duration=False)
    gone = [rel for rel in removed if rel in sizes and not store.exists(f"tables/{name}/{rel}")]
    return Vacuumed(name, len(gone), sum(sizes[rel] for rel in gone))


def _superseded_remote(store, keep: int) -> list[list]:
    """:func:`_superseded` on an object store: the objects of each superseded artifact folder."""
    out: list[list] = []
    builds: dict[tuple[str, str], list[tuple[int, str]]] = {}
    suggest = _groups(store.list("artifacts/suggest"), 4)
    for folder in suggest:
        _, _, model, name = folder.split("/")
        m = re.fullmatch(r"v(\d+)-pca(\d+)", name)
        if m:
            builds.setdefault((model, m.group(2)), []).append((int(m.group(1)), folder))
    for versions in builds.values():
        out += [suggest[folder] for _, folder in sorted(versions)[:-keep]]
    try:
        current = int(store.read_bytes("artifacts/tags/gnb/CURRENT").decode().strip())
    except Exception:  # no model yet (NotFound), or an unreadable CURRENT: keep every version
        current = None
    if current is not None:
        tags = _groups(store.list("artifacts/tags/gnb"), 4)
        out += [objs for folder, objs in sorted(tags.items())
                if re.fullmatch(r"v\d{6}", folder.rsplit("/", 1)[1]) and int(folder.rsplit("/", 1)[1][1:]) <= current - keep]
    return out


def _clean_remote(lake: Lake, older_than_h: float, keep_artifacts: int,
                  vacuum_retention_h: int | None) -> JanitorReport:
    """:func:`clean` for an object-store lake, every byte through :class:`lake.store.LakeStore`."""
    from lake.store import LakeStore

    store = LakeStore.for_lake(lake)
    vacuumed: list[Vacuumed] = []
    cutoff = time.time() - older_than_h * 3600
    dirs = files = freed = 0
    with LakeLock(lake, "commit", timeout=600, holder="janitor"):
        ended = _ended_runs(lake)
        for folder, objs in sorted(_groups(store.list("_staging"), 2).items()):
            run_id = folder.split("/", 1)[1]
            if run_id in ended or max(o.mtime.timestamp() for o in objs) < cutoff:
                freed += _delete_all(store, objs)
                dirs += 1
        for name in TABLES:
            if not store.list(f"tables/{name}/_delta_log"):
                continue
            with ExitStack() as held:
                if name in _WRITER_LOCKS:
                    held.enter_context(LakeLock(lake, _WRITER_LOCKS[name], timeout=600, holder="janitor",
                                                poll=(0.0005, 0.004)))
                n, b = _sweep_orphans_remote(lake, store, name, cutoff)
                files, freed = files + n, freed + b
                if vacuum_retention_h is not None:
                    v = _vacuum_remote(lake, store, name, int(vacuum_retention_h))
                    if v.files:
                        vacuumed.append(v)
                        freed += v.bytes
    artifacts = 0
    for objs in _superseded_remote(store, keep_artifacts):
        if max(o.mtime.timestamp() for o in objs) < cutoff:
            freed += _delete_all(store, objs)
            artifacts += 1
    return JanitorReport(dirs, files, freed, artifacts, tuple(vacuumed), vacuum_retention_h)
