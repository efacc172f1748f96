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

On an object-store lake (``s3://`` ...) the build's files are fetched into this node's artifact
cache (:mod:`lake.artifact_cache`: checked against the manifest's sizes and sha256 while
streaming, shared by the workers of the node, size-bounded) and memory-mapped from there; the
``index_builds`` table is opened with bounded timeouts, and an unreachable store is a 503.

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
from typing import Any, Iterable

import numpy as np
from flask import Flask, current_app

from api.loaded_build import Hit, LoadedBuild, load_build  # noqa: F401  (Hit, LoadedBuild re-exported)
from api.per_process import ProcessOwner
from api.upload_overlay import UploadOverlay
from lake.catalog import Lake
from lake.errors import BadInput, CorruptArtifact, NotFound, Unavailable
from lake.settings import Settings
from lake.store import StoreUnavailable

__all__ = ["Hit", "LoadedBuild", "SearchService", "init_app", "search_service", "EXACT_FILTERED"]

log = logging.getLogger("imagelake.api.search")

EXACT_FILTERED = 50_000   # a filter allowing at most this many images is searched exactly


class SearchService:
    """Similarity search over the published build (see the module docstring). Thread-safe."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.lake = Lake.at(settings.lake)
        self._owner = ProcessOwner("the search service")
        self._lock = threading.Lock()          # one loader at a time
        self._builds: dict[str, LoadedBuild] = {}   # model key -> the build served for it
        self._table = None
        self._table_version: int | None = None
        self._published: list[dict[str, Any]] = []
        self._failed: dict[str, str] = {}
        self._checked_at = float("-inf")
        self._pool: ThreadPoolExecutor | None = None
        self.overlay = UploadOverlay(self.lake, settings.refresh_s)

    # -- loading ---------------------------------------------------------------------------------

    def _ensure_process(self) -> None:
        if self._owner.owns():
            return
        with self._lock:
            if not self._owner.owns():
                self._pool = ThreadPoolExecutor(max_workers=self.settings.search_threads,
                                                thread_name_prefix="shard-search")
                self._owner.claim()

    def refresh(self, force: bool = False, model: str | None = None) -> LoadedBuild | None:
        """The build served for ``model`` (default :meth:`default_model`), picking up newly published
        builds at most every ``refresh_s`` unless ``force``.

        The first load of a model waits; later reloads are done by one caller while the others keep
        serving the current build.
        """
        self._ensure_process()
        try:
            if force or self._due():
                first = self._checked_at == float("-inf")
                if self._lock.acquire(blocking=force or first or self._needs_load(model)):
                    try:
                        if force or self._due():  # another thread may have just checked
                            self._check()
                        self._load_if_needed(model)
                    finally:
                        self._lock.release()
            elif self._needs_load(model):
                with self._lock:
                    self._load_if_needed(model)
        except StoreUnavailable as e:
            # the lake's object store is gone: a build this process has loaded lives in its verified
            # local cache and keeps serving; without one the request is a 503
            key = self._key(model)
            if key is None or key not in self._builds:
                raise
            log.warning("serving index build %s while the lake's store is unavailable: %s",
                        self._builds[key].build_id, e)
        key = self._key(model)
        build = self._builds.get(key) if key else None
        return self.overlay.attach(build)   # + recent uploads not in the build yet (api.upload_overlay)

    def _due(self) -> bool:
        return time.monotonic() - self._checked_at >= self.settings.refresh_s

    def _published_rows(self) -> list[dict[str, Any]]:
        """Published ``index_builds`` rows, newest first (re-read only when the table's version moved)."""
        from deltalake.exceptions import TableNotFoundError

        from lake.store import open_delta, store_errors

        if self._table is None:
            try:
                self._table = open_delta(self.lake, "index_builds")
            except TableNotFoundError:
                return []
        else:
            with store_errors(self.lake):
                self._table.update_incremental()
        version = self._table.version()
        if version != self._table_version:
            with store_errors(self.lake):
                rows = [r for r in self._table.to_pyarrow_table().to_pylist() if r.get("state") == "published"]
            self._table_version = version
            self._published = sorted(rows, key=lambda r: (r["created_at"], r["build_id"]), reverse=True)
        return self._published

    def models(self) -> list[str]:
        """Model keys with a published build, the default first (from the last table check)."""
        newest: dict[str, dict] = {}
        for row in self._published:
            newest.setdefault(row["model"], row)
        return sorted(newest, key=lambda m: (-int(newest[m]["ntotal"] or 0), m))

    def default_model(self) -> str | None:
        """The model searched when none is named: the one whose newest published build holds the
        most images (the index of the model with most features, as ``imagelake index`` defaults)."""
        models = self.models()
        return models[0] if models else None

    def _key(self, model: str | None) -> str | None:
        """The published model key ``model`` names (a key, or a registry name: its newest version)."""
        if not model:
            return self.default_model()
        for row in self._published:
            if row["model"] == model or ("@" not in model and row["model"].split("@", 1)[0] == model):
                return row["model"]
        return None

    def _needs_load(self, model: str | None) -> bool:
        key = self._key(model)
        return key is not None and key not in self._builds and any(
            r["model"] == key and r["build_id"] not in self._failed for r in self._published)

    def _check(self) -> None:
        # _checked_at moves only once the published rows are read: a request arriving during the
        # first check must wait for it (refresh blocks while it is "first"), not find no build yet
        started = time.monotonic()
        try:
            self._published_rows()
            for key in list(self._builds):
                self._load(key)
        finally:  # a failed check (the store unavailable) is not retried before refresh_s either
            self._checked_at = started
        for build in self._builds.values():  # in use: keep the cached copies at the head of the LRU
            for m in build.manifests:
                for path in (m.files_at or {}).values():
                    try:
                        os.utime(path)
                    except OSError:
                        pass

    def _load_if_needed(self, model: str | None) -> None:
        if self._needs_load(model):
            self._load(self._key(model))

    def _load(self, key: str) -> None:
        """Serve the newest published build of ``key`` that passes verification; never replace a good
        build with a refused one (a model with no build loaded yet falls back to older published builds)."""
        current = self._builds.get(key)
        for row in self._published:
            if row["model"] != key:
                continue
            if current is not None and row["build_id"] == current.build_id:
                return
            if row["build_id"] in self._failed:
                continue
            try:
                build = load_build(self.lake, row, self.settings)
            except CorruptArtifact as e:
                self._failed[row["build_id"]] = str(e)
                log.error("index build %s refused, %s: %s", row["build_id"],
                          f"still serving {current.build_id}" if current else "trying older builds", e)
                continue
            self._builds[key] = build
            log.info("serving index build %s of %s (%d vectors, %s)", build.build_id, key, build.ntotal,
                     build.factory)
            return

    def build(self, model: str | None = None) -> LoadedBuild | None:
        """The build served for ``model`` (refreshed first), or ``None`` when none is published or loadable."""
        return self.refresh(model=model)

    def require_build(self, model: str | None = None) -> LoadedBuild:
        """The build served for ``model`` (a ``name@version`` key or a registry name; default
        :meth:`default_model`).

        Raises:
            NotFound: builds are published, but none of ``model``. Unavailable: none is published
                (or none of the model passed verification).
        """
        build = self.refresh(model=model)
        if build is not None:
            return build
        if model and self._published and self._key(model) is None:
            raise NotFound(f"no index build of model {model!r} is published; indexed models: "
                           f"{', '.join(self.models())}; run `imagelake index --model {model}` first")
        if self._failed:
            raise Unavailable("the published index build failed verification and no earlier build is "
                              "loaded; run `imagelake index --rebuild` (see GET /api/v1/health)")
        raise Unavailable("no index build is published yet; run `imagelake index`")

    def status(self) -> dict[str, Any]:
        """For ``GET /health``: the default model's served build, the newest published one, refused
        builds, and ``models``: each indexed model's served build id."""
        build = self.refresh()
        key = self.default_model()
        published = next((r for r in self._published if r["model"] == key), None)
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
        out["models"] = {m: (self._builds[m].build_id if m in self._builds else None) for m in self.models()}
        out["refused"] = [{"build_id": b, "error": e} for b, e in self._failed.items()]
        return out

    # -- lookups ---------------------------------------------------------------------------------

    def seq_of(self, image_id: str, model: str | None = None) -> int | None:
        """The FAISS id of ``image_id`` if it is in the build served for ``model``."""
        return self._seq_of(self.require_build(model), image_id)

    def _seq_of(self, build: LoadedBuild, image_id: str) -> int | None:
        try:
            digest = bytes.fromhex(image_id)
        except ValueError:
            return None
        for seg in build.segments:
            row = seg.row_of_id(digest)
            if row is not None:
                return int(seg.seqs[row])
        return None

    def image_id_of(self, seq: int, model: str | None = None) -> str | None:
        ids = self._image_ids(self.require_build(model), np.array([seq], np.int64))
        return ids[0]

    def _image_ids(self, build: LoadedBuild, seqs: np.ndarray) -> list[str | None]:
        out: list[str | None] = [None] * len(seqs)
        for seg in build.segments:
            pos, found = seg.rows_of(seqs)
            for i in np.flatnonzero(found):
                out[i] = seg.ids[pos[i]].tobytes().hex()
        return out

    def vectors(self, seqs: Iterable[int], model: str | None = None) -> np.ndarray:
        """Unit-length float32 embeddings of ``seqs`` from the build's compact copy (NaN if unknown)."""
        build = self.require_build(model)
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

    def similar_to_image(self, image_id: str, k: int, model: str | None = None,
                         allowed: np.ndarray | None = None) -> list[Hit]:
        """The ``k`` images most similar to ``image_id`` (itself excluded), by ``model``'s build.

        ``allowed``: only these seqs may be hits (sorted int64, e.g. ``matching_seqs(filter)``); up to
        ``k`` of them are returned whenever that many are indexed (see :meth:`_search_allowed`).

        Raises:
            NotFound: the image is not in the served build, or no build of ``model``. Unavailable: no build.
        """
        build = self.require_build(model)
        seq = self._seq_of(build, image_id)
        if seq is None:
            raise NotFound(f"image {image_id} is not in the index (build {build.build_id}); it may be unknown, "
                           "or not embedded and indexed yet (`imagelake embed`, then `imagelake index`)")
        vec = self._vectors(build, np.array([seq], np.int64))[0]
        return self._search(build, vec, k, {seq}, allowed)

    def similar_to_vector(self, vector: np.ndarray, k: int, exclude_seqs: Iterable[int] = (),
                          model: str | None = None, allowed: np.ndarray | None = None) -> list[Hit]:
        """The ``k`` nearest images by cosine similarity to ``vector`` (any scale), minus ``exclude_seqs``,
        by ``model``'s build, only among ``allowed`` seqs when given (as :meth:`similar_to_image`).

        Raises:
            BadInput: wrong dimension or a zero/non-finite vector. NotFound: no build of ``model``.
            Unavailable: no build.
        """
        build = self.require_build(model)
        vec = np.asarray(vector, np.float32).reshape(-1)
        if vec.shape[0] != build.d:
            raise BadInput(f"the query vector has {vec.shape[0]} dimensions, the index {build.d} ({build.model})")
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(norm) or norm == 0:
            raise BadInput("the query vector is zero or not finite")
        return self._search(build, vec / norm, k, set(int(s) for s in exclude_seqs), allowed)

    def similar_to_vectors(self, vectors: np.ndarray, k: int, model: str | None = None) -> list[list[Hit]]:
        """Batched :meth:`similar_to_vector`: one list of hits per row of ``vectors`` (n, d).

        Faster per query than one call each (the coarse search and the list scans are batched).
        """
        build = self.require_build(model)
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

    def _search(self, build: LoadedBuild, unit: np.ndarray, k: int, exclude: set[int],
                allowed: np.ndarray | None = None) -> list[Hit]:
        if k <= 0:
            return []
        q = np.ascontiguousarray(unit.reshape(1, -1), dtype=np.float32)
        if allowed is not None:
            return self._search_allowed(build, q, k, exclude, np.asarray(allowed, np.int64))
        ncand = self._ncand(k)
        scores, labels = self._candidates(build, q, ncand + len(exclude))
        return self._rerank(build, q[0], scores[0], labels[0], k, ncand, exclude)

    def _search_allowed(self, build: LoadedBuild, q: np.ndarray, k: int, exclude: set[int],
                        allowed: np.ndarray) -> list[Hit]:
        """Filtered search that still finds ``k`` hits when ``allowed`` holds that many indexed images.

        Up to ``EXACT_FILTERED`` allowed seqs are scored exactly against the float16 copy (exact and
        cheap). Larger sets pre-filter the shard scans with a FAISS ``IDSelectorBatch``, widening
        ``nprobe`` (x4 each round) while fewer than ``k`` hits come back; at ``nprobe = nlist`` every
        allowed vector is scanned, so the loop ends with all the hits there are.
        """
        if exclude:
            allowed = allowed[~np.isin(allowed, np.fromiter(exclude, np.int64))]
        if len(allowed) == 0:
            return []
        if len(allowed) <= EXACT_FILTERED:
            labels = np.unique(allowed)
            return self._rerank(build, q[0], np.zeros(len(labels), np.float32), labels, k, len(labels), set())
        import faiss

        selector = faiss.IDSelectorBatch(allowed)
        ncand, nprobe = self._ncand(k), build.nprobe
        nlist = max([ivf.nlist for ivf in build.ivfs if ivf is not None] or [1])
        while True:
            scores, labels = self._candidates(build, q, ncand, nprobe=nprobe, selector=selector)
            hits = self._rerank(build, q[0], scores[0], labels[0], k, ncand, set())
            if len(hits) >= k or nprobe >= nlist:
                return hits
            nprobe = min(nlist, nprobe * 4)

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

    def _candidates(self, build: LoadedBuild, q: np.ndarray, ncand: int, nprobe: int | None = None,
                    selector=None) -> tuple[np.ndarray, np.ndarray]:
        """(approximate scores, FAISS ids), each (nq, shards x ncand), -1 padded, from every shard
        searched in parallel (only ids the FAISS ``selector`` accepts, when given)."""
        import faiss

        if build.coarse is not None:
            nprobe = nprobe or build.nprobe
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe) if selector is not None else None
            qt = q
            if isinstance(build.coarse, faiss.IndexPreTransform):
                for i in range(build.coarse.chain.size()):
                    qt = build.coarse.chain.at(i).apply(qt)
            coarse_d, coarse_i = faiss.extract_index_ivf(build.coarse).quantizer.search(qt, nprobe)

            def one(ivf):
                return ivf.search_preassigned(qt, min(ncand, max(1, ivf.ntotal)), coarse_i, coarse_d, params=params)
            parts = build.ivfs
        else:
            params = faiss.SearchParameters(sel=selector) if selector is not None else None

            def one(shard):
                return shard.search(q, min(ncand, max(1, shard.ntotal)), params=params)
            parts = build.shards
        if len(parts) == 1 or self._pool is None:
            results = [one(p) for p in parts]
        else:
            results = list(self._pool.map(one, parts))
        return (np.hstack([r[0] for r in results]), np.hstack([r[1] for r in results]).astype(np.int64))

    def close(self) -> None:
        if self._owner.release() and self._pool is not None:
            self._pool.shutdown(wait=False)
        self._pool, self._table = None, None
        self._builds = {}
        self._failed, self._published, self._table_version = {}, [], None
        self._checked_at = float("-inf")


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions["imagelake.search"] = SearchService(settings)


def search_service() -> SearchService:
    """The current app's search service."""
    return current_app.extensions["imagelake.search"]
