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
pipeline's ``suggest`` step builds their version. Local lakes only (the overlay is); on an
object store the server maps the current version's build (:func:`lake.compact.ensure_compact`).
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from lake.catalog import Lake
from lake.compact import CompactMatrix, ImageIdTable, compact_dir, ensure_compact, load_compact

__all__ = ["served_matrix", "OverlaidIndex", "OverlaidIds", "search_excluding", "newest_build_dir"]


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


def newest_build_dir(lake: Lake, model: str, k: int, at_most: int) -> str | None:
    """The folder of the newest finished build of ``model`` and ``k`` for a features version <= ``at_most``."""
    parent = os.path.dirname(compact_dir(lake, model, 0, k))
    pattern = re.compile(rf"v(\d+)-pca{int(k)}")
    best = None
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return None
    for name in names:
        hit = pattern.fullmatch(name)
        if hit and int(hit.group(1)) <= at_most and os.path.isfile(os.path.join(parent, name, "manifest.json")):
            if best is None or int(hit.group(1)) > best[0]:
                best = (int(hit.group(1)), os.path.join(parent, name))
    return None if best is None else best[1]


def _overlay_entries(lake: Lake, model: str) -> list[tuple[str, int, str]]:
    from api.upload_overlay import overlay_dir

    folder = overlay_dir(lake, model)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        seq, dash, rest = n.partition("-")
        if dash and n.endswith(".npy") and seq.isdigit() and len(rest) == 68:
            out.append((os.path.join(folder, n), int(seq), rest[:-4]))
    return out


def overlaid(base: CompactMatrix, lake: Lake) -> CompactMatrix:
    """``base`` plus the upload overlay's vectors of its model that it does not hold (``base`` when none)."""
    import faiss

    from api.upload_overlay import MAX_OVERLAY

    entries = _overlay_entries(lake, base.model)
    held = set()
    if entries:
        ids = [e[2] for e in entries]
        held = {base.ids.image_id(r) for r in base.ids.rows_of(ids)}
    ids, vecs = [], []
    for path, _, image_id in entries:
        if image_id in held or image_id in ids:
            continue
        try:
            v = np.load(path)
        except (OSError, ValueError):
            continue     # removed meanwhile (the index folded it in)
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

    ``mapped``: the caller's {folder: CompactMatrix} of builds already mapped (verified once).
    Raises NotFound when the lake has no features.
    """
    from lake.commit import open_table
    from lake.vectors import default_model_key

    if not lake.is_local:
        return ensure_compact(lake, k, cache=cache)
    model = default_model_key(lake)
    version = open_table(lake, "features").version()
    folder = newest_build_dir(lake, model, k, version)
    if folder is None:
        return ensure_compact(lake, k, model=model)     # the first build of this model
    mapped = {} if mapped is None else mapped
    base = mapped.get(folder)
    if base is None:
        base = load_compact(folder)
        mapped.clear()          # older builds are no longer served
        mapped[folder] = base
    if base.features_version == version:
        return base
    return overlaid(base, lake)
