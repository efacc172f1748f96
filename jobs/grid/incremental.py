"""New images into an existing layout: old cells kept, new ones placed into free cells that fit them.

A full layout (:func:`jobs.grid.layout.layout_grid` with ``spare`` = setting ``grid_spare_fraction``)
leaves that share of extra cells empty, spread over the map by the balanced split, and keeps its
*state* beside the tiles (``layout.npz``): the PCA it worked in and, per cell, the seq of its image
(-1: free) and its reduced vector (float16). A later run then costs what its new images cost:

1. **Place.** Each free cell gets the mean reduced vector of the images around it (a normalised
   ``(2r+1)²`` box filter, r = 2); each new image (projected with the stored PCA) is matched to the
   free cells nearest to it (FAISS, exact, 32 candidates), pairs taken greedily by distance, one
   image per cell; images whose candidates all went are matched again against the cells left.
   Images no longer selected (deleted, or out of ``--where``) free their cells.
2. **Tiles.** ``cells.bin`` is the old pack copied in runs with the new cells' thumbnails inserted;
   the pre-rendered overview levels are cut again from the kept base mosaic with only the changed
   cells redrawn (:func:`jobs.grid.tiles.save_mosaic`).

When the new images do not fit into the free cells, the caller lays everything out anew.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import uniform_filter

from jobs.grid.tiles import BACKGROUND, Pyramid, _fit, _paste, finish_tiles, load_mosaic, save_mosaic

__all__ = ["STATE", "LayoutState", "save_state", "load_state", "place_new", "update_tiles"]

STATE = "layout.npz"


@dataclass
class LayoutState:
    """What a layout keeps for later images: its PCA, and per cell the image's seq (-1 free) and z."""

    width: int
    height: int
    mean: np.ndarray        # float32 (d,)
    basis: np.ndarray       # float32 (d, dims)
    cell_seq: np.ndarray    # int64 (width*height,)
    cell_z: np.ndarray      # float16 (width*height, dims); zeros where free

    @property
    def free(self) -> int:
        return int((self.cell_seq < 0).sum())


def save_state(folder: str, state: LayoutState) -> None:
    tmp = os.path.join(folder, STATE + ".tmp.npz")
    np.savez(tmp, shape=np.array([state.width, state.height]), mean=state.mean, basis=state.basis,
             cell_seq=state.cell_seq, cell_z=state.cell_z)
    os.replace(tmp, os.path.join(folder, STATE))


def load_state(folder: str) -> LayoutState | None:
    """The state of the layout in ``folder``; None for a layout without one (made before it existed)."""
    try:
        with np.load(os.path.join(folder, STATE)) as z:
            w, h = (int(v) for v in z["shape"])
            return LayoutState(w, h, z["mean"], z["basis"], z["cell_seq"], z["cell_z"])
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return None


def place_new(state: LayoutState, z_new: np.ndarray, radius: int = 2, candidates: int = 32) -> np.ndarray:
    """Free cells (int64, one per row of ``z_new``) for the new images; ``state`` is not changed.

    Raises:
        ValueError: more new images than free cells.
    """
    import faiss

    m = len(z_new)
    free = np.flatnonzero(state.cell_seq < 0)
    if m > len(free):
        raise ValueError(f"{m} new images do not fit into {len(free)} free cells")
    if m == 0:
        return np.zeros(0, np.int64)
    h, w, p = state.height, state.width, state.cell_z.shape[1]
    occupied = (state.cell_seq >= 0).reshape(h, w).astype(np.float32)
    size = 2 * radius + 1
    field_ = uniform_filter(state.cell_z.astype(np.float32).reshape(h, w, p), size=(size, size, 1), mode="constant")
    weight = uniform_filter(occupied, size=size, mode="constant").ravel()[free]
    targets = np.ascontiguousarray(field_.reshape(-1, p)[free] / np.maximum(weight, 1e-6)[:, None], np.float32)
    del field_
    queries = np.ascontiguousarray(z_new, np.float32)
    out = np.full(m, -1, np.int64)
    open_new = np.arange(m)
    open_cell = np.ones(len(free), bool)
    while len(open_new):
        cand = np.flatnonzero(open_cell)
        k = min(candidates, len(cand))
        index = faiss.IndexFlatL2(p)
        index.add(targets[cand])
        dist, idx = index.search(queries[open_new], k)
        order = np.argsort(dist, axis=None, kind="stable")
        rows, cols = np.unravel_index(order, dist.shape)
        done = np.zeros(len(open_new), bool)
        for r, c in zip(rows.tolist(), idx[rows, cols].tolist()):
            if done[r] or c < 0:
                continue
            cell = cand[c]
            if open_cell[cell]:
                open_cell[cell] = False
                out[open_new[r]] = free[cell]
                done[r] = True
        open_new = open_new[~done]
    return out


def update_tiles(base_folder: str, folder: str, pyramid: Pyramid, added: dict[int, bytes | None],
                 removed: np.ndarray, meta: dict) -> dict:
    """The tile artifact of the base layout with ``added`` cells (cell -> 64 px JPEG) filled and
    ``removed`` cells emptied, written to ``folder`` (manifest last). Returns the manifest.

    Raises:
        FileNotFoundError: the base has no kept mosaic (the caller lays out anew).
    """
    base = load_mosaic(base_folder)
    if base is None:
        raise FileNotFoundError(f"{base_folder} keeps no mosaic")
    os.makedirs(folder, exist_ok=True)
    p = pyramid
    old = np.load(os.path.join(base_folder, "cells.idx"))
    sizes = np.diff(old)
    removed = np.asarray(removed, np.int64)
    sizes[removed] = 0
    changed = np.union1d(removed, np.fromiter(added, np.int64, len(added)))
    pack_in = os.path.join(base_folder, "cells.bin")
    pack_path = os.path.join(folder, "cells.bin")
    with open(pack_in, "rb") as src, open(pack_path + ".tmp", "wb") as dst:
        start = 0
        for cell in changed.tolist() + [len(sizes)]:
            # the old cells [start, cell) are one contiguous run of the old pack
            a, b = int(old[start]), int(old[cell])
            src.seek(a)
            while a < b:
                chunk = src.read(min(b - a, 64 << 20))
                dst.write(chunk)
                a += len(chunk)
            if cell < len(sizes):
                jpeg = added.get(cell)
                sizes[cell] = len(jpeg) if jpeg else 0
                if jpeg:
                    dst.write(jpeg)
            start = cell + 1
    os.replace(pack_path + ".tmp", pack_path)
    offsets = np.zeros(len(sizes) + 1, np.int64)
    offsets[1:] = np.cumsum(sizes)
    blank = Image.new("RGB", (p.base_px, p.base_px), BACKGROUND)
    for cell in changed.tolist():
        gy, gx = divmod(cell, p.width)
        base.paste(blank, (gx * p.base_px, gy * p.base_px))
        _paste(base, _fit(added.get(cell) or b"", p.base_px), gx * p.base_px, gy * p.base_px, p.base_px)
    save_mosaic(folder, base)
    return finish_tiles(folder, p, offsets, base, meta)
