"""The per-process similarity search service: the published index build, memory-mapped and verified.

Reuse it from any API area (suggestions, tags, duplicates)::

    from api.index_service import search_service

    service = search_service()                     # this app's service (lazy, per process)
    hits = service.similar_to_vector(vec, k=20, exclude_seqs=[seq])   # vec: raw or unit, (d,)
    batch = service.similar_to_vectors(matrix, k=10)                  # one list of hits per row
    hits = service.similar_to_image(image_id, k=20)                   # the query image excluded
    for hit in hits: hit.seq, hit.image_id, hit.score                  # score = cosine similarity
    service.seq_of(image_id) -> int | None;  service.image_id_of(seq) -> str | None
    service.vectors(seqs) -> float32 (len(seqs), d), unit length (NaN rows for unknown seqs)
    service.build() -> LoadedBuild | None          # build_id, model, d, ntotal, factory
    service.require_build() -> LoadedBuild         # the same, or Unavailable (503)
    service.status() -> dict                       # what GET /health shows under builds.index

Every call raises :class:`lake.errors.Unavailable` (503) while no build is published.

How it serves: the newest published ``index_builds`` row is loaded with FAISS's memory-mapped I/O
(``IO_FLAG_MMAP_IFC``: codes and coarse centroids stay in the page cache, shared by every worker
process) after :func:`jobs.index.build.verify_build` checked every file's size and sha256, the
manifest's own sha256 and the FAISS version. If that fails, the previous build keeps serving and
``status()`` names the refused build and why (a process that has no build yet falls back to the
newest published build that passes). The table version is re-checked at most every
``settings.refresh_s``; a new build is loaded by the one request that notices it while the others
keep using the current one, so a new build is picked up without a restart.

A query: normalise, find the nearest ``nprobe`` IVF lists once, scan every shard's lists for
``c = max(search_candidates, 10 k)`` candidates in parallel (a thread pool; FAISS releases the
GIL), merge by PQ score into the global best ``c``, then re-rank those exactly against the build's
float16 vectors and keep the best ``k``. Nothing is opened before the first call in the worker process (no deltalake before a fork).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from flask import Flask, current_app

from api.per_process import ProcessOwner
from jobs.index.build import Manifest, verify_build
from lake.catalog import Lake
from lake.errors import BadInput, CorruptArtifact, NotFound, Unavailable
from lake.settings import Settings

__all__ = ["Hit", "LoadedBuild", "SearchService", "init_app", "search_service"]

log = logging.getLogger("imagelake.api.search")


@dataclass(frozen=True)
class Hit:
    seq: int
    image_id: str
    score: float


@dataclass
class _Segment:
    """One build folder's rows: seqs (ascending), raw image ids, unit float16 vectors (all mmapped)."""

    seqs: np.ndarray
    ids: np.ndarray
    vectors: np.ndarray
    id_prefix: np.ndarray = field(init=False)
    id_order: np.ndarray = field(init=False)

    def __post_init__(self):
        prefix = np.ascontiguousarray(self.ids[:, :8]).view(">u8").ravel().astype(np.uint64)
        self.id_order = np.argsort(prefix, kind="stable")
        self.id_prefix = prefix[self.id_order]

    def rows_of(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.searchsorted(self.seqs, seqs)
        pos = np.minimum(pos, max(0, len(self.seqs) - 1))
        found = (self.seqs[pos] == seqs) if len(self.seqs) else np.zeros(len(seqs), bool)
        return pos, found

    def row_of_id(self, digest: bytes) -> int | None:
        key = np.uint64(int.from_bytes(digest[:8], "big"))
        lo, hi = np.searchsorted(self.id_prefix, key, "left"), np.searchsorted(self.id_prefix, key, "right")
        for row in self.id_order[lo:hi]:
            if self.ids[row].tobytes() == digest:
                return int(row)
        return None


@dataclass
class LoadedBuild:
    """A verified, loaded build: the published row, its manifests, segments and shard indexes."""

    build_id: str
    row: dict[str, Any]
    manifests: list[Manifest]
    segments: list[_Segment]
    shards: list[Any]          # FAISS indexes, kept alive here (the IVF views below borrow them)
    ivfs: list[Any]            # the IVF part of each shard, or None for Flat shards
    coarse: Any                # the base build's trained index (quantizer + transform), or None
    nprobe: int
    loaded_at: float

    @property
    def model(self) -> str:
        return self.row["model"]

    @property
    def d(self) -> int:
        return int(self.row["d"])

    @property
    def ntotal(self) -> int:
        return int(self.row["ntotal"])

    @property
    def factory(self) -> str:
        return self.row["factory"]


def _read_index(path: str):
    import faiss

    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", None)
    try:
        return faiss.read_index(path, flag if flag is not None else faiss.IO_FLAG_MMAP)
    except RuntimeError:
        try:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP)
        except RuntimeError:
            return faiss.read_index(path)


def load_build(lake: Lake, row: dict[str, Any], settings: Settings) -> LoadedBuild:
    """Verify then load the build of ``row`` (an ``index_builds`` row).

    Raises:
        CorruptArtifact: a file is missing, truncated, altered, or written by a newer FAISS.
    """
    import faiss

    root = lake.artifacts_dir()
    top = verify_build(os.path.join(root, row["path"]), expected_manifest_sha256=row.get("manifest_sha256"))
    manifests = [top]
    if top["kind"] == "incremental":
        base_folder = os.path.join(os.path.dirname(top.folder), top["base_build_id"])
        manifests.insert(0, verify_build(base_folder, expected_manifest_sha256=top["base_manifest_sha256"]))
    try:
        segments, shards, ivfs = [], [], []
        for m in manifests:
            # plain ndarray views of the maps: np.memmap's Python-level __getitem__ costs ~20 us a call
            segments.append(_Segment(*(np.asarray(np.load(m.path(name), mmap_mode="r"))
                                       for name in ("seqs.npy", "ids.npy", "vectors.npy"))))
            for s in m["shards"]:
                shard = _read_index(m.path(s["file"]))
                shards.append(shard)
                ivfs.append(faiss.try_extract_index_ivf(shard))
        coarse = _read_index(manifests[0].path("trained.faiss")) if ivfs and ivfs[0] is not None else None
    except (RuntimeError, ValueError, OSError) as e:
        raise CorruptArtifact(f"index build {row['build_id']} could not be loaded: {e}") from None
    plan_nprobe = int((top.get("plan") or {}).get("nprobe") or 16)
    nprobe = settings.search_nprobe or plan_nprobe
    for ivf in ivfs:
        if ivf is not None:
            nprobe = min(nprobe, ivf.nlist)
            ivf.nprobe = nprobe
    if coarse is not None:
        faiss.extract_index_ivf(coarse).nprobe = nprobe
    return LoadedBuild(row["build_id"], row, manifests, segments, shards, ivfs, coarse, nprobe, time.time())


class SearchService:
    """Similarity search over the published build (see the module docstring). Thread-safe."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.lake = Lake.at(settings.lake)
        self._owner = ProcessOwner("the search service")
        self._lock = threading.Lock()          # one loader at a time
        self._build: LoadedBuild | None = None
        self._table = None
        self._table_version: int | None = None
        self._published: list[dict[str, Any]] = []
        self._failed: dict[str, str] = {}
        self._checked_at = float("-inf")
        self._pool: ThreadPoolExecutor | None = None

    # -- loading ---------------------------------------------------------------------------------

    def _ensure_process(self) -> None:
        if self._owner.owns():
            return
        with self._lock:
            if not self._owner.owns():
                self._pool = ThreadPoolExecutor(max_workers=self.settings.search_threads,
                                                thread_name_prefix="shard-search")
                self._owner.claim()

    def refresh(self, force: bool = False) -> LoadedBuild | None:
        """Pick up a newly published build (at most every ``refresh_s`` unless ``force``).

        The first load waits; later ones are done by one caller while the others keep serving the
        current build.
        """
        self._ensure_process()
        if not force and not self._due():
            if self._build is None and self._lock.locked():
                with self._lock:     # the first load is under way in another thread: wait for it
                    pass
            return self._build
        if self._lock.acquire(blocking=self._build is None or force):
            try:
                if force or self._due():  # another thread may have just checked
                    self._check()
            finally:
                self._lock.release()
        return self._build

    def _due(self) -> bool:
        return time.monotonic() - self._checked_at >= self.settings.refresh_s

    def _published_rows(self) -> list[dict[str, Any]]:
        """Published ``index_builds`` rows, newest first (re-read only when the table's version moved)."""
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        if self._table is None:
            try:
                self._table = DeltaTable(self.lake.table_uri("index_builds"))
            except TableNotFoundError:
                return []
        else:
            self._table.update_incremental()
        version = self._table.version()
        if version != self._table_version:
            self._table_version = version
            rows = [r for r in self._table.to_pyarrow_table().to_pylist() if r.get("state") == "published"]
            self._published = sorted(rows, key=lambda r: (r["created_at"], r["build_id"]), reverse=True)
        return self._published

    def _check(self) -> None:
        """Serve the newest published build that passes verification; never replace a good build
        with a refused one (a process with no build yet falls back to older published builds)."""
        self._checked_at = time.monotonic()
        for row in self._published_rows():
            if self._build is not None and row["build_id"] == self._build.build_id:
                return
            if row["build_id"] in self._failed:
                continue
            try:
                build = load_build(self.lake, row, self.settings)
            except CorruptArtifact as e:
                self._failed[row["build_id"]] = str(e)
                log.error("index build %s refused, %s: %s", row["build_id"],
                          f"still serving {self._build.build_id}" if self._build else "trying older builds", e)
                continue
            self._build = build
            log.info("serving index build %s (%d vectors, %s)", build.build_id, build.ntotal, build.factory)
            return

    def build(self) -> LoadedBuild | None:
        """The build being served (refreshed first), or ``None`` when none is published or loadable."""
        return self.refresh()

    def require_build(self) -> LoadedBuild:
        """The served build.

        Raises:
            Unavailable: none is published (or none passed verification).
        """
        build = self.refresh()
        if build is None:
            if self._failed:
                raise Unavailable("the published index build failed verification and no earlier build is "
                                  "loaded; run `imagelake index --rebuild` (see GET /api/v1/health)")
            raise Unavailable("no index build is published yet; run `imagelake index`")
        return build

    def status(self) -> dict[str, Any]:
        """For ``GET /health``: the served build, the newest published one, and refused builds."""
        build = self.refresh()
        published = self._published[0] if self._published else None
        if build is None and published is None:
            return {}
        out: dict[str, Any] = {"state": "serving" if build else "unavailable",
                               "published_build_id": published["build_id"] if published else None}
        if build is not None:
            out.update(build_id=build.build_id, kind=build.row["kind"], base_build_id=build.row["base_build_id"],
                       model=build.model, factory=build.factory, d=build.d, ntotal=build.ntotal,
                       shards=len(build.shards), nprobe=build.nprobe,
                       loaded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(build.loaded_at)))
            if published and published["build_id"] != build.build_id:
                out["state"] = "serving_previous"
        out["refused"] = [{"build_id": b, "error": e} for b, e in self._failed.items()]
        return out

    # -- lookups ---------------------------------------------------------------------------------

    def seq_of(self, image_id: str) -> int | None:
        """The FAISS id of ``image_id`` if it is in the served build."""
        build = self.require_build()
        try:
            digest = bytes.fromhex(image_id)
        except ValueError:
            return None
        for seg in build.segments:
            row = seg.row_of_id(digest)
            if row is not None:
                return int(seg.seqs[row])
        return None

    def image_id_of(self, seq: int) -> str | None:
        ids = self._image_ids(self.require_build(), np.array([seq], np.int64))
        return ids[0]

    def _image_ids(self, build: LoadedBuild, seqs: np.ndarray) -> list[str | None]:
        out: list[str | None] = [None] * len(seqs)
        for seg in build.segments:
            pos, found = seg.rows_of(seqs)
            for i in np.flatnonzero(found):
                out[i] = seg.ids[pos[i]].tobytes().hex()
        return out

    def vectors(self, seqs: Iterable[int]) -> np.ndarray:
        """Unit-length float32 embeddings of ``seqs`` from the build's compact copy (NaN if unknown)."""
        build = self.require_build()
        return self._vectors(build, np.asarray(list(seqs) if not isinstance(seqs, np.ndarray) else seqs, np.int64))

    def _vectors(self, build: LoadedBuild, seqs: np.ndarray) -> np.ndarray:
        out = np.full((len(seqs), build.d), np.nan, np.float32)
        for seg in build.segments:
            pos, found = seg.rows_of(seqs)
            idx = np.flatnonzero(found)
            if len(idx):
                order = np.argsort(pos[idx])  # ascending rows read the memory map in order
                out[idx[order]] = seg.vectors[pos[idx[order]]]
        return out

    # -- search ----------------------------------------------------------------------------------

    def similar_to_image(self, image_id: str, k: int) -> list[Hit]:
        """The ``k`` images most similar to ``image_id`` (itself excluded).

        Raises:
            NotFound: the image is not in the served build. Unavailable: no build.
        """
        build = self.require_build()
        seq = self.seq_of(image_id)
        if seq is None:
            raise NotFound(f"image {image_id} is not in the index (build {build.build_id}); it may be unknown, "
                           "or not embedded and indexed yet (`imagelake embed`, then `imagelake index`)")
        vec = self._vectors(build, np.array([seq], np.int64))[0]
        return self._search(build, vec, k, {seq})

    def similar_to_vector(self, vector: np.ndarray, k: int, exclude_seqs: Iterable[int] = ()) -> list[Hit]:
        """The ``k`` nearest images by cosine similarity to ``vector`` (any scale), minus ``exclude_seqs``.

        Raises:
            BadInput: wrong dimension or a zero/non-finite vector. Unavailable: no build.
        """
        build = self.require_build()
        vec = np.asarray(vector, np.float32).reshape(-1)
        if vec.shape[0] != build.d:
            raise BadInput(f"the query vector has {vec.shape[0]} dimensions, the index {build.d} ({build.model})")
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(norm) or norm == 0:
            raise BadInput("the query vector is zero or not finite")
        return self._search(build, vec / norm, k, set(int(s) for s in exclude_seqs))

    def similar_to_vectors(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Batched :meth:`similar_to_vector`: one list of hits per row of ``vectors`` (n, d).

        Faster per query than one call each (the coarse search and the list scans are batched).
        """
        build = self.require_build()
        q = np.asarray(vectors, np.float32)
        if q.ndim != 2 or q.shape[1] != build.d:
            raise BadInput(f"the query vectors must be (n, {build.d}), got {q.shape}")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise BadInput("a query vector is zero or not finite")
        q = np.ascontiguousarray(q / norms)
        ncand = self._ncand(k)
        scores, labels = self._candidates(build, q, ncand)
        return [self._rerank(build, q[i], scores[i], labels[i], k, ncand, set()) for i in range(len(q))]

    def _ncand(self, k: int) -> int:
        return max(self.settings.search_candidates, 10 * k)

    def _search(self, build: LoadedBuild, unit: np.ndarray, k: int, exclude: set[int]) -> list[Hit]:
        if k <= 0:
            return []
        q = np.ascontiguousarray(unit.reshape(1, -1), dtype=np.float32)
        ncand = self._ncand(k)
        scores, labels = self._candidates(build, q, ncand + len(exclude))
        return self._rerank(build, q[0], scores[0], labels[0], k, ncand, exclude)

    def _rerank(self, build: LoadedBuild, q: np.ndarray, approx: np.ndarray, labels: np.ndarray, k: int,
                ncand: int, exclude: set[int]) -> list[Hit]:
        """The ``ncand`` best candidates by PQ score over all shards, re-scored exactly (cosine)
        against the float16 copy; the best ``k``."""
        keep = labels >= 0
        if exclude:
            keep &= ~np.isin(labels, np.fromiter(exclude, np.int64))
        labels, approx = labels[keep], approx[keep]
        if len(labels) > ncand:
            best = np.argpartition(-approx, ncand - 1)[:ncand]
            labels = labels[best]
        labels = np.unique(labels)
        if len(labels) == 0 or k <= 0:
            return []
        # einsum, not BLAS: a small product that BLAS threads only slow down on a busy server
        scores = np.einsum("ij,j->i", self._vectors(build, labels), q)
        keep = np.isfinite(scores)
        labels, scores = labels[keep], scores[keep]
        top = np.lexsort((labels, -scores))[:k]
        ids = self._image_ids(build, labels[top])
        return [Hit(int(labels[i]), image_id, float(scores[i])) for i, image_id in zip(top, ids) if image_id]

    def _candidates(self, build: LoadedBuild, q: np.ndarray, ncand: int) -> tuple[np.ndarray, np.ndarray]:
        """(approximate scores, FAISS ids), each (nq, shards x ncand), -1 padded, from every shard
        searched in parallel."""
        if build.coarse is not None:
            import faiss

            qt = q
            if isinstance(build.coarse, faiss.IndexPreTransform):
                for i in range(build.coarse.chain.size()):
                    qt = build.coarse.chain.at(i).apply(qt)
            coarse_d, coarse_i = faiss.extract_index_ivf(build.coarse).quantizer.search(qt, build.nprobe)

            def one(ivf):
                return ivf.search_preassigned(qt, min(ncand, max(1, ivf.ntotal)), coarse_i, coarse_d)
            parts = build.ivfs
        else:
            def one(shard):
                return shard.search(q, min(ncand, max(1, shard.ntotal)))
            parts = build.shards
        if len(parts) == 1 or self._pool is None:
            results = [one(p) for p in parts]
        else:
            results = list(self._pool.map(one, parts))
        return (np.hstack([r[0] for r in results]), np.hstack([r[1] for r in results]).astype(np.int64))

    def close(self) -> None:
        if self._owner.release() and self._pool is not None:
            self._pool.shutdown(wait=False)
        self._pool, self._build, self._table = None, None, None
        self._failed, self._published, self._table_version = {}, [], None
        self._checked_at = float("-inf")


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions["imagelake.search"] = SearchService(settings)


def search_service() -> SearchService:
    """The current app's search service."""
    return current_app.extensions["imagelake.search"]
