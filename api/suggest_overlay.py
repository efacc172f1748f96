"""The suggestion matrix a server maps, without rebuilding it in a request.

Every upload adds a ``features`` row, so the features table gets a new version, and the matrix of
:mod:`lake.compact` is per version: before, the first suggestion request after an upload (in every
worker) rebuilt the whole matrix (PCA fit, projection and SQ8 encoding of every image) under the
``suggest-build`` lock. Now a server process maps (:func:`served_matrix`):

1. the build for the current features version, when it exists (``imagelake run --steps suggest``,
   the pipeline's step, made it); else
2. the newest existing build of the model and ``k`` **plus** the upload overlay's vectors it does
   not hold (``artifacts/upload-overlay/<model>/``, written by ``POST /images``, see
   :mod:`api.upload_overlay`): projected with the build's own PCA, encoded with its own trained
   8-bit quantizer into a small in-memory index, rows numbered after the build's (an
   :class:`OverlaidMatrix`); else
3. only when the lake has no build of the model at all: the first build (as before).

So no request rebuilds an existing matrix; new images from other embed runs appear once the
pipeline's ``suggest`` step builds their version. Object-store lakes work the same way: the builds
are key prefixes in the store (found with one listing per check), the chosen build's files are
mapped from the node's verified artifact cache (:func:`lake.compact.load_compact_from_store`), and
the overlay's vectors are objects under the same key (each read once per process; they never
change). Uploads into an object-store lake write their vectors there as they do locally
(``POST /images``; :mod:`api.upload_overlay`).
"""

from __future__ import annotations

import dataclasses
import io
import os
import re

import numpy as np

from lake.catalog import Lake
from lake.compact import (CompactMatrix, ImageIdTable, compact_dir, compact_key, ensure_compact, load_compact,
                          load_compact_from_store)

__all__ = ["served_matrix", "OverlaidIndex", "OverlaidIds", "search_excluding", "newest_build_dir",
           "newest_build_key"]

_VECTORS = "overlay vectors"   # the key in ``mapped`` of the overlay vectors read from a store


class OverlaidIds:
    """Row <-> image id over a build's :class:`ImageIdTable` and the overlay's ids (rows after it)."""

    def __init__(self, base: ImageIdTable, extra: list[str]):
        self.base, self.extra = base, list(extra)
        self._extra_rows = {i: len(base) + j for j, i in enumerate(self.extra)}

    def __len__(self) -> int:
        return len(self.base) + len(self.extra)

    def image_id(self, row: int) -> str:
        row = int(row)
        return self.base.image_id(row) if row < len(self.base) else self.extra[row - len(self.base)]

    def rows_of(self, image_ids) -> np.ndarray:
        ids = list(image_ids)
        rows = [self._extra_rows[i] for i in ids if i in self._extra_rows]
        return np.unique(np.concatenate([self.base.rows_of(ids), np.array(rows, np.int64)]))


class OverlaidIndex:
    """A build's (memory-mapped) SQ8 index followed by a small one of the overlay's rows."""

    def __init__(self, base, extra):
        self.base, self.extra = base, extra
        self.nbase = int(base.ntotal)

    @property
    def ntotal(self) -> int:
        return self.nbase + int(self.extra.ntotal)

    def search(self, x: np.ndarray, k: int, params=None, exclude: np.ndarray | None = None):
        import faiss

        exclude = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, np.int64)
        if params is not None and exclude.size == 0:
            raise ValueError("search an overlaid matrix with exclude=, not with FAISS parameters")

        def one(index, skip, offset):
            kk = min(k, int(index.ntotal))
            if kk <= 0:
                return np.full((len(x), 0), -np.inf, np.float32), np.full((len(x), 0), -1, np.int64)
            p = faiss.SearchParameters(sel=faiss.IDSelectorNot(faiss.IDSelectorBatch(skip))) if len(skip) else None
            d, i = index.search(x, kk, params=p)
            return d, np.where(i >= 0, i + offset, -1)

        d1, i1 = one(self.base, exclude[exclude < self.nbase], 0)
        d2, i2 = one(self.extra, exclude[exclude >= self.nbase] - self.nbase, self.nbase)
        d, i = np.hstack([d1, d2]), np.hstack([i1, i2])
        d = np.where(i >= 0, d, -np.inf)
        order = np.argsort(-d, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(d, order, 1).astype(np.float32), np.take_along_axis(i, order, 1)

    def reconstruct_batch(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.base.d), np.float32)
        low = rows < self.nbase
        if low.any():
            out[low] = self.base.reconstruct_batch(rows[low])
        if (~low).any():
            out[~low] = self.extra.reconstruct_batch(rows[~low] - self.nbase)
        return out


def search_excluding(m: CompactMatrix, x: np.ndarray, k: int, exclude: np.ndarray):
    """``m.index.search`` of ``x`` for ``k`` rows that are not in ``exclude`` (a plain or overlaid matrix)."""
    import faiss

    x = np.ascontiguousarray(x, np.float32)
    if isinstance(m.index, OverlaidIndex):
        return m.index.search(x, k, exclude=exclude)
    params = faiss.SearchParameters(sel=faiss.IDSelectorNot(faiss.IDSelectorBatch(exclude))) if len(exclude) else None
    return m.index.search(x, k, params=params)


def _newest(names, k: int, at_most: int) -> str | None:
    """The name ``v<version>-pca<k>`` with the highest version <= ``at_most`` among ``names``."""
    pattern = re.compile(rf"v(\d+)-pca{int(k)}")
    best = None
    for name in names:
        hit = pattern.fullmatch(name)
        if hit and int(hit.group(1)) <= at_most and (best is None or int(hit.group(1)) > best[0]):
            best = (int(hit.group(1)), name)
    return None if best is None else best[1]


def newest_build_dir(lake: Lake, model: str, k: int, at_most: int) -> str | None:
    """The folder of the newest finished build of ``model`` and ``k`` for a features version <= ``at_most``."""
    parent = os.path.dirname(compact_dir(lake, model, 0, k))
    try:
        names = [n for n in os.listdir(parent) if os.path.isfile(os.path.join(parent, n, "manifest.json"))]
    except FileNotFoundError:
        return None
    name = _newest(names, k, at_most)
    return None if name is None else os.path.join(parent, name)


def newest_build_key(store, model: str, k: int, at_most: int) -> str | None:
    """:func:`newest_build_dir` in an object store (one listing): the key prefix of the newest build
    whose manifest is in (a build without one never finished)."""
    parent = compact_key(model, 0, k).rsplit("/", 1)[0]
    names = [o.key[len(parent) + 1:-len("/manifest.json")] for o in store.list(parent)
             if o.key.endswith("/manifest.json") and o.key.count("/") == parent.count("/") + 2]
    name = _newest(names, k, at_most)
    return None if name is None else f"{parent}/{name}"


def _overlay_entries(lake: Lake, model: str) -> list[tuple[str, int, str]]:
    """(file, or key in the store, seq, image id) of the model's overlay files, by name."""
    from api.upload_overlay import overlay_dir

    folder = overlay_dir(lake, model)
    if lake.is_local:
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            return []
    else:
        from lake.store import LakeStore

        folder = folder[len(lake.root.rstrip("/")) + 1:]   # the key prefix: the folder below the lake root
        names = [o.key.rsplit("/", 1)[-1] for o in LakeStore.for_lake(lake).list(folder)]
    out = []
    for n in names:
        seq, dash, rest = n.partition("-")
        if dash and n.endswith(".npy") and seq.isdigit() and len(rest) == 68:
            out.append((os.path.join(folder, n) if lake.is_local else f"{folder}/{n}", int(seq), rest[:-4]))
    return out


def _read_vector(lake: Lake, where: str, read: dict | None) -> np.ndarray:
    """One overlay vector: a local file, or an object read once per process (``read`` keeps them).
    Raises OSError/ValueError (locally) or NotFound (in a store) when it is gone."""
    if lake.is_local:
        return np.load(where)
    if read is not None and where in read:
        return read[where]
    from lake.store import LakeStore

    v = np.load(io.BytesIO(LakeStore.for_lake(lake).read_bytes(where)))
    if read is not None:
        read[where] = v
    return v


def overlaid(base: CompactMatrix, lake: Lake, read: dict | None = None) -> CompactMatrix:
    """``base`` plus the upload overlay's vectors of its model that it does not hold (``base`` when none).
    ``read``: vectors already read from an object store, by key (filled in here)."""
    import faiss

    from api.upload_overlay import MAX_OVERLAY
    from lake.errors import NotFound

    entries = _overlay_entries(lake, base.model)
    held = set()
    if entries:
        ids = [e[2] for e in entries]
        held = {base.ids.image_id(r) for r in base.ids.rows_of(ids)}
    ids, vecs = [], []
    for where, _, image_id in entries:
        if image_id in held or image_id in ids:
            continue
        try:
            v = _read_vector(lake, where, read)
        except (OSError, ValueError, NotFound):
            continue     # removed meanwhile (the index folded it in), or not an array
        if v.shape != base.mean.shape:
            continue
        ids.append(image_id), vecs.append(v)
        if len(ids) >= MAX_OVERLAY:
            break
    if not ids:
        return base
    sq = faiss.downcast_index(base.index)
    extra = faiss.IndexScalarQuantizer(sq.d, sq.sq.qtype, sq.metric_type)
    faiss.copy_array_to_vector(faiss.vector_to_array(sq.sq.trained), extra.sq.trained)
    extra.is_trained = True
    extra.add(np.ascontiguousarray(base.project(np.stack(vecs)), np.float32))
    return dataclasses.replace(base, index=OverlaidIndex(base.index, extra), ids=OverlaidIds(base.ids, ids),
                               path=f"{base.path}+overlay{len(ids)}")


def served_matrix(lake: Lake, k: int, cache=None, *, mapped: dict | None = None) -> CompactMatrix:
    """The matrix a server process serves now (see the module docstring).

    ``cache``: the artifact cache an object-store lake's builds are mapped from (default: the
    node's). ``mapped``: the caller's per-process state, kept between calls: {folder or key prefix:
    CompactMatrix} of the build mapped (verified once), and the overlay vectors read from a store.
    Raises NotFound when the lake has no features; StoreUnavailable when its store cannot be reached.
    """
    from lake.vectors import default_model_key

    mapped = {} if mapped is None else mapped
    model = default_model_key(lake)
    if lake.is_local:
        from lake.commit import open_table

        version = open_table(lake, "features").version()
        where = newest_build_dir(lake, model, k, version)
        load = load_compact
    else:
        from deltalake.exceptions import TableNotFoundError

        from lake.artifact_cache import artifact_cache
        from lake.errors import NotFound
        from lake.store import LakeStore, open_delta

        try:
            version = open_delta(lake, "features").version()  # bounded timeouts: a request waits on it
        except TableNotFoundError:
            raise NotFound("no features in the lake yet; run `imagelake embed` first") from None
        store = LakeStore.for_lake(lake)
        where = newest_build_key(store, model, k, version)
        cache = cache or artifact_cache()

        def load(prefix: str) -> CompactMatrix:
            return load_compact_from_store(store, cache, prefix)
    if where is None:
        return ensure_compact(lake, k, model=model, cache=cache)     # the first build of this model
    base = mapped.get(where)
    if base is None:
        base = load(where)
        mapped.clear()          # older builds (and the vectors read for them) are no longer served
        mapped[where] = base
    if base.features_version == version:
        return base
    return overlaid(base, lake, read=mapped.setdefault(_VECTORS, {}) if not lake.is_local else None)
