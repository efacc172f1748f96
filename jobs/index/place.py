"""Where an index build is written, and how it gets into the lake.

* **Local lake**: the build folder *is* ``<lake>/artifacts/index/<build_id>/``; tasks read and
  write it directly (today's behaviour and speed).
* **Object-store lake**: the driver works in a private local temporary folder (segment files,
  training), then *places* each finished file into the store under
  ``artifacts/index/<build_id>/`` (streamed, multipart when large). Encode tasks read their rows of
  the placed ``vectors.npy``/``seqs.npy`` from the store with ranged reads and upload their shards
  there (:mod:`jobs.index.partition`). The manifest is written **last**, after every file it names
  is in the store, so a reader never sees a half-built build: a folder without a manifest is an
  unfinished build, which nothing loads and the next build's prune removes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from jobs.index.build import MANIFEST, Manifest, build_dir, build_key, file_sha256, write_manifest
from jobs.index.partition import EncodeJob
from lake.catalog import Lake
from lake.store import LakeStore

__all__ = ["BuildPlace", "npy_data_offset", "prune_store"]

log = logging.getLogger("imagelake.jobs.index")


def npy_data_offset(path: str) -> int:
    """Bytes before the array data of the ``.npy`` file ``path`` (its header)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        return f.tell()


class BuildPlace:
    """A build's working folder (``folder``, always local) and its home in the lake."""

    def __init__(self, lake: Lake, build_id: str):
        self.lake, self.build_id = lake, build_id
        self.remote = not lake.is_local
        self.prefix = build_key(build_id)
        self.store = LakeStore.for_lake(lake) if self.remote else None
        if self.remote:
            self._clear_store()  # a crashed attempt of this very run id
            self.folder = tempfile.mkdtemp(prefix=f"imagelake-index-{build_id}-")
        else:
            self.folder = build_dir(lake, build_id)
            shutil.rmtree(self.folder, ignore_errors=True)
            os.makedirs(self.folder)
        self._placed: set[str] = set()

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def place(self, *names: str) -> None:
        """Upload the named local files into the build folder in the store (no-op on a local lake)."""
        if not self.remote:
            return
        for name in names:
            self.store.upload(f"{self.prefix}/{name}", self.path(name))
            self._placed.add(name)

    def encode_job(self, trained_path: str, trained_sha256: str, threads: int, *, d: int,
                   trained_key: str | None = None) -> EncodeJob:
        """What encode tasks need. On an object store ``trained_key`` is the trained index's key
        (default: this build's own ``trained.faiss``, placed first)."""
        if not self.remote:
            return EncodeJob(folder=self.folder, trained_path=trained_path, trained_sha256=trained_sha256,
                             threads=threads)
        return EncodeJob(folder="", trained_path="", trained_sha256=trained_sha256, threads=threads,
                         lake_root=self.lake.root, prefix=self.prefix,
                         trained_key=trained_key or f"{self.prefix}/trained.faiss", d=d,
                         vectors_offset=npy_data_offset(self.path("vectors.npy")),
                         seqs_offset=npy_data_offset(self.path("seqs.npy")))

    def write_manifest(self, data: dict[str, Any], shard_stats: list[dict]) -> Manifest:
        """The manifest, written last. Local: :func:`jobs.index.build.write_manifest`. Object store:
        files the driver made are hashed here, shards by the tasks that uploaded them (their sha256
        and size come back in the stats); the store is checked to hold every file at that size
        before the manifest goes in."""
        if not self.remote:
            return write_manifest(self.folder, data)
        data = dict(data)
        by_file = {s["file"]: s for s in shard_stats}
        files = {}
        for name, meta in sorted(data["files"].items()):
            if name in by_file:
                files[name] = {**meta, "sha256": by_file[name]["sha256"], "bytes": int(by_file[name]["bytes"])}
            else:
                files[name] = {**meta, "sha256": file_sha256(self.path(name)), "bytes": os.path.getsize(self.path(name))}
        listed = {o.key.rsplit("/", 1)[-1]: o.size for o in self.store.list(self.prefix)}
        for name, meta in files.items():
            if listed.get(name) != meta["bytes"]:
                raise RuntimeError(f"index build {self.build_id}: {name} is not in the store as built "
                                   f"({listed.get(name)} bytes, expected {meta['bytes']})")
        data["files"] = files
        for shard in data.get("shards", []):
            shard["sha256"] = files[shard["file"]]["sha256"]
        blob = json.dumps(data, indent=1, sort_keys=True).encode()
        self.store.write_bytes(f"{self.prefix}/{MANIFEST}", blob)
        return Manifest(self.store.uri(self.prefix), data, hashlib.sha256(blob).hexdigest())

    def discard(self) -> None:
        """Remove the build (a rebuild-rule fallback, or a failure): its folder and placed objects."""
        if self.remote:
            self._clear_store()
        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self) -> None:
        """Drop the local working folder (object-store lakes; the build lives on in the store)."""
        if self.remote:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _clear_store(self) -> None:
        for obj in self.store.list(self.prefix):
            self.store.delete(obj.key)


def prune_store(store: LakeStore, kept: set[str]) -> list[str]:
    """Remove every build folder in the store's ``artifacts/index/`` not in ``kept`` (a build's
    manifest first, so a half-removed build reads as unfinished). Returns the removed build ids."""
    folders: dict[str, list[str]] = {}
    for obj in store.list("artifacts/index"):
        parts = obj.key.split("/")
        if len(parts) >= 4:
            folders.setdefault(parts[2], []).append(obj.key)
    removed = []
    for build_id, keys in sorted(folders.items()):
        if build_id in kept:
            continue
        for key in sorted(keys, key=lambda k: not k.endswith(f"/{MANIFEST}")):
            store.delete(key)
        removed.append(build_id)
    return removed
