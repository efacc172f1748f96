"""Recent uploads, searchable at once beside the published index build, without building one.

``POST /images`` stores, ingests and embeds the image, then :meth:`UploadOverlay.add` writes its
unit vector to ``<lake>/artifacts/upload-overlay/<model key>/<seq>-<image_id>.npy`` (a few KB,
written to a temporary name and renamed). Every API worker's search service
(:class:`api.index_service.SearchService`) serves ``attach(build)``: the published build plus one
small in-memory shard of the overlay's vectors that the build does not hold yet — encoded with the
build's own trained index (IVF builds: a copy of ``trained.faiss``'s empty index, so the overlay
is scanned with the same coarse lists and PQ codes as a delta shard) or exact (Flat builds) — and
one more segment of seqs, ids and float16 vectors for the exact re-rank and the lookups. So an
upload is searchable in the worker that answered it at once, and in the other workers at their
next check (at most ``refresh_s`` later: the folder is listed at most that often).

Object-store lakes work the same through :class:`lake.store.LakeStore`: the file is one PUT of the
key ``artifacts/upload-overlay/<model key>/<seq>-<image_id>.npy``, a check is one LIST of that
prefix, and each vector is read once per process (an object's name fixes its content, so it never
changes). When the store cannot be reached, a worker keeps serving the overlay it last listed.

Nothing is trained, rebuilt or hashed here: the next ``imagelake index`` folds the uploads into a
build (they are ordinary ``features`` rows), after which their overlay files are no longer served
(the build holds those seqs) and are deleted by the next upload of that model. At most
:data:`MAX_OVERLAY` vectors are served per model; beyond that an upload is stored and embedded
but answers ``indexed: false`` until ``imagelake index`` runs.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid

import io
import logging

import numpy as np

from lake.catalog import Lake
from lake.errors import NotFound
from lake.store import LakeStore, StoreUnavailable

__all__ = ["UploadOverlay", "MAX_OVERLAY", "overlay_dir", "overlay_key"]

MAX_OVERLAY = 20_000
_READERS = 8    # parallel GETs of overlay vectors a worker has not read yet (object stores)

log = logging.getLogger("imagelake.api.upload_overlay")


def overlay_dir(lake: Lake, model_key: str) -> str:
    return lake.artifacts_dir("upload-overlay", model_key.replace("/", "_"))


def overlay_key(model_key: str) -> str:
    """The overlay's key prefix in the lake's store (:func:`overlay_dir` below the lake root)."""
    return "artifacts/upload-overlay/" + model_key.replace("/", "_")


class UploadOverlay:
    """Per process; thread-safe. See the module docstring."""

    def __init__(self, lake: Lake, refresh_s: float = 5.0):
        self.lake, self.refresh_s = lake, refresh_s
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, tuple[int, str]]] = {}   # model -> file name -> (seq, image id)
        self._listed_at: dict[str, float] = {}
        self._attached: dict[str, tuple[tuple, object]] = {}        # model -> (state, augmented build)
        self._trained: dict[str, object] = {}                       # build id -> its trained index, read once
        self._read: dict[str, np.ndarray] = {}                      # object key -> vector (object stores)

    @property
    def _store(self):
        """The lake's store on an object-store lake (made in the process that uses it: a client
        does not survive a fork), ``None`` on a local one."""
        return None if self.lake.is_local else LakeStore.for_lake(self.lake)

    # -- writing (the upload request) --------------------------------------------------------------

    def pending(self, model_key: str) -> int:
        """How many overlay files ``model_key`` has (served or not yet pruned)."""
        return len(self._list(model_key, force=True))

    def add(self, model_key: str, seq: int, image_id: str, vector: np.ndarray, build=None) -> None:
        """Write the overlay file of one upload; drop the files ``build`` already holds."""
        unit = np.asarray(vector, np.float32).reshape(-1)
        unit = unit / max(float(np.linalg.norm(unit)), 1e-12)
        name = f"{int(seq):012d}-{image_id}.npy"
        if self._store is None:
            folder = overlay_dir(self.lake, model_key)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, unit)
            os.replace(tmp, os.path.join(folder, name))
        else:   # one PUT; the name fixes the content, so this worker keeps what it wrote
            buf = io.BytesIO()
            np.save(buf, unit)
            key = f"{overlay_key(model_key)}/{name}"
            self._store.write_bytes(key, buf.getvalue())
            with self._lock:
                self._read[key] = unit
        if build is not None:
            for stale, (s, _) in list(self._list(model_key, force=True).items()):
                if stale != name and self._in_build(build, s):
                    self._remove(model_key, stale)
        with self._lock:
            self._listed_at.pop(model_key, None)   # this worker re-lists at its next search

    def _remove(self, model_key: str, name: str) -> None:
        if self._store is not None:
            self._store.delete(f"{overlay_key(model_key)}/{name}")
            return
        try:
            os.remove(os.path.join(overlay_dir(self.lake, model_key), name))
        except FileNotFoundError:
            pass

    # -- reading (every search) --------------------------------------------------------------------

    def _names(self, model_key: str) -> list[str]:
        if self._store is not None:
            prefix = overlay_key(model_key)
            return [o.key[len(prefix) + 1:] for o in self._store.list(prefix)]
        try:
            return os.listdir(overlay_dir(self.lake, model_key))
        except FileNotFoundError:
            return []

    def _list(self, model_key: str, force: bool = False) -> dict[str, tuple[int, str]]:
        now = time.monotonic()
        if force or now - self._listed_at.get(model_key, float("-inf")) >= self.refresh_s:
            try:
                names = self._names(model_key)
            except StoreUnavailable as e:
                if force or model_key not in self._entries:
                    raise
                log.warning("serving the upload overlay of %s as last listed: %s", model_key, e)
                self._listed_at[model_key] = now
                return self._entries[model_key]
            entries = {}
            for n in sorted(names):
                seq, dash, rest = n.partition("-")
                if dash and n.endswith(".npy") and seq.isdigit():
                    entries[n] = (int(seq), rest[:-4])
            self._entries[model_key] = entries
            self._listed_at[model_key] = now
        return self._entries.get(model_key, {})

    @staticmethod
    def _in_build(build, seq: int) -> bool:
        return any(bool(seg.rows_of(np.array([seq], np.int64))[1][0]) for seg in build.segments
                   if len(seg.seqs) and not getattr(seg, "overlay", False))

    def _outside(self, build, entries: dict) -> list[tuple[str, int, str]]:
        return [(n, s, i) for n, (s, i) in entries.items() if not self._in_build(build, s)]

    def attach(self, build):
        """``build`` with the overlay's vectors it lacks as one more shard and segment (``build``
        itself when there are none). Cached per (build, overlay files)."""
        if build is None:
            return build
        with self._lock:
            try:
                entries = self._list(build.model)
            except StoreUnavailable:       # never listed, and the store is gone: the build alone
                return build
            if not entries:
                return build
            state = (build.build_id, tuple(entries))
            cached = self._attached.get(build.model)
            if cached is not None and cached[0] == state:
                return cached[1]
            try:
                augmented = self._augment(build, self._outside(build, entries)[:MAX_OVERLAY])
            except StoreUnavailable as e:   # not cached: the next check reads the vectors again
                log.warning("upload overlay of %s not refreshed: %s", build.model, e)
                return cached[1] if cached is not None and cached[0][0] == build.build_id else build
            self._attached[build.model] = (state, augmented)
            return augmented

    def _augment(self, build, todo: list[tuple[str, int, str]]):
        import faiss

        from api.loaded_build import _Segment

        todo = sorted(todo, key=lambda t: t[1])
        read = self._vectors(build.model, [name for name, _, _ in todo])
        seqs, ids, vecs = [], [], []
        for name, seq, image_id in todo:
            v = read.get(name)
            try:
                digest = bytes.fromhex(image_id)
            except ValueError:
                continue   # not ours
            if v is None:
                continue   # deleted meanwhile (folded into a build), or not an array
            if v.shape != (build.d,) or len(digest) != 32:
                continue
            seqs.append(seq), ids.append(np.frombuffer(digest, np.uint8)), vecs.append(v)
        if not seqs:
            return build
        seq_arr, x = np.asarray(seqs, np.int64), np.ascontiguousarray(np.stack(vecs), np.float32)
        segment = _Segment(seq_arr, np.stack(ids), x.astype(np.float16))
        segment.overlay = True   # not the build's: _in_build skips it
        if build.coarse is not None:
            trained = self._trained.get(build.build_id)
            if trained is None:   # read in full (the served copy is memory-mapped, which FAISS cannot clone)
                self._trained.clear()
                trained = self._trained[build.build_id] = faiss.read_index(build.manifests[0].path("trained.faiss"))
            shard = faiss.clone_index(trained)          # trained, empty: the build's own lists and codes
            _add_one_thread(shard, x, seq_arr)
            ivf = faiss.extract_index_ivf(shard)
            ivf.nprobe = build.nprobe
        else:
            shard, ivf = faiss.IndexIDMap2(faiss.IndexFlatIP(build.d)), None
            _add_one_thread(shard, x, seq_arr)
        return dataclasses.replace(build, segments=[*build.segments, segment], shards=[*build.shards, shard],
                                   ivfs=[*build.ivfs, ivf])

    def _vectors(self, model_key: str, names: list[str]) -> dict[str, np.ndarray]:
        """The overlay vectors ``names`` that can be read, by name: local files, or objects read once
        per process (in parallel; the ones no longer listed are forgotten)."""
        out: dict[str, np.ndarray] = {}
        if self._store is None:
            folder = overlay_dir(self.lake, model_key)
            for name in names:
                try:
                    out[name] = np.load(os.path.join(folder, name))
                except (OSError, ValueError):
                    pass
            return out
        prefix = overlay_key(model_key)
        keys = {name: f"{prefix}/{name}" for name in names}
        missing = [k for k in keys.values() if k not in self._read]

        def read(key: str):
            try:
                return key, np.load(io.BytesIO(self._store.read_bytes(key)))
            except (NotFound, OSError, ValueError):
                return key, None
        if missing:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(_READERS, len(missing))) as pool:
                for key, v in pool.map(read, missing):
                    if v is not None:
                        self._read[key] = v
        wanted = set(keys.values())
        for key in [k for k in self._read if k.startswith(prefix + "/") and k not in wanted]:
            del self._read[key]
        return {name: self._read[key] for name, key in keys.items() if key in self._read}


def _add_one_thread(index, x: np.ndarray, ids: np.ndarray) -> None:
    """``index.add_with_ids`` on one OpenMP thread: the overlay is at most 20,000 vectors (17 ms for
    1,000 into an IVF-PQ shard on one thread), and FAISS's two threads waiting on each other on a
    loaded 2-core machine took 1-3 s for the same add (measured), inside the upload request."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.add_with_ids(x, ids)
    finally:
        faiss.omp_set_num_threads(threads)
