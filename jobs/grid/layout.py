"""Grid layout: place n feature vectors on a near-square grid, one per cell, neighbours together.

The seeds' way (PCA → t-SNE → exact linear assignment of the whole n × n cost matrix) is cubic
and stops at tens of thousands of images. This one is O(n log n) and runs on one machine at 1M:

1. **Reduce.** L2-normalise, PCA to ``dims`` components fitted on a sample (randomised SVD).
2. **Balanced split.** Recursively cut the cell rectangle in two along its longer side and the
   points in two along the block's own principal direction, in proportion to the halves'
   capacities, down to blocks of a few cells (a kd-tree whose leaves are cells). Every image gets
   exactly one cell and similar images share a block at every scale.
3. **Refine (FLAS-style).** Repeatedly smooth the grid of the cells' vectors with a box filter of a
   shrinking radius (from min(0.3 · side, 20 cells) to 1) (normalised convolution: empty cells do not count), then re-solve small linear
   assignments between the items of each ``block × block`` tile and the smoothed vectors of its
   cells (tile offsets move every round). Each round makes every item sit where its surroundings look
   like it, so local order improves without losing the global arrangement.

Deterministic for a seed: every random choice comes from one ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import uniform_filter
from scipy.optimize import linear_sum_assignment

__all__ = ["LayoutParams", "Layout", "grid_shape", "reduce_dims", "fit_reduction", "project", "balanced_split",
           "refine", "layout_grid"]


@dataclass(frozen=True)
class LayoutParams:
    """Knobs of :func:`layout_grid` (defaults measured on Fashion-MNIST lite0 features, see README).

    dims: PCA components the layout works in. pca_sample: rows the PCA is fitted on.
    leaf_cells: the balanced split stops at blocks of at most this many cells.
    rounds: refinement rounds. block: side of the linear-assignment tiles.
    radius_start: first smoothing radius as a fraction of the grid side, at most ``radius_cap`` cells
    (items move a few cells per round, so wider smoothing only blurs); radius_end: last, in cells.
    """

    dims: int = 64
    pca_sample: int = 20_000
    leaf_cells: int = 16
    rounds: int = 32
    block: int = 8
    radius_start: float = 0.3
    radius_cap: float = 20.0
    radius_end: float = 1.0


@dataclass
class Layout:
    """``cells[i]`` is the cell (``gy * width + gx``) of item ``i``; ``xy`` its projection (PC1, PC2)."""

    width: int
    height: int
    cells: np.ndarray            # int64 (n,)
    xy: np.ndarray               # float32 (n, 2)
    timings: dict[str, float] = field(default_factory=dict)
    z: np.ndarray | None = None       # float32 (n, dims): the reduced vectors the layout placed
    mean: np.ndarray | None = None    # the reduction (see fit_reduction), for later images
    basis: np.ndarray | None = None

    @property
    def gx(self) -> np.ndarray:
        return (self.cells % self.width).astype(np.int32)

    @property
    def gy(self) -> np.ndarray:
        return (self.cells // self.width).astype(np.int32)

    def cell_items(self) -> np.ndarray:
        """int64 (height, width): the item in each cell, -1 where empty."""
        grid = np.full(self.width * self.height, -1, np.int64)
        grid[self.cells] = np.arange(len(self.cells))
        return grid.reshape(self.height, self.width)


def grid_shape(n: int) -> tuple[int, int]:
    """(width, height) of the near-square grid for n items: width = ceil(sqrt n), fewer than
    ``width`` cells empty (all in the layout, spread by the split, none in a separate last row)."""
    if n <= 0:
        return 0, 0
    width = math.ceil(math.sqrt(n))
    return width, math.ceil(n / width)


def reduce_dims(vectors: np.ndarray, dims: int, sample: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-normalise, centre and project on the top ``dims`` principal axes (fitted on a sample).

    Returns float32 (n, min(dims, d)) whose first column is PC1.
    """
    mean, basis = fit_reduction(vectors, dims, sample, rng)
    return project(vectors, mean, basis)


def fit_reduction(vectors: np.ndarray, dims: int, sample: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), basis (d, k)) of the PCA :func:`reduce_dims` applies: kept with a layout so that
    later images are projected into the same space (:mod:`jobs.grid.incremental`)."""
    x = np.asarray(vectors, np.float32)
    n, d = x.shape
    rows = x if n <= sample else x[np.sort(rng.choice(n, sample, replace=False))]
    rows = _unit(rows)
    mean = rows.mean(axis=0)
    k = min(dims, d, len(rows))
    centred = rows - mean
    if len(rows) <= 512 or k * 4 >= min(d, len(rows)):
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        basis = vt[:k]
    else:  # randomised range finder with power iterations (Halko et al.)
        q = centred @ rng.standard_normal((d, k + 10)).astype(np.float32)
        for _ in range(4):
            q, _ = np.linalg.qr(q)
            q, _ = np.linalg.qr(centred @ (centred.T @ q))
        _, _, vt = np.linalg.svd(q.T @ centred, full_matrices=False)
        basis = vt[:k]
    return mean.astype(np.float32), np.ascontiguousarray(basis.T, dtype=np.float32)


def project(vectors: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """float32 (n, k): unit-normalised rows, centred, on ``basis`` (chunked: no second n x d copy)."""
    x = np.asarray(vectors, np.float32)
    out = np.empty((len(x), basis.shape[1]), np.float32)
    for start in range(0, len(x), 65536):
        out[start:start + 65536] = (_unit(x[start:start + 65536]) - mean) @ basis
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _principal_direction(z: np.ndarray, guide: np.ndarray) -> np.ndarray:
    """Top principal direction of the rows of z (power iteration), signed to agree with ``guide``."""
    c = z - z.mean(axis=0)
    v = c[:, :1].T @ c if len(c) > 1 else np.ones((1, z.shape[1]), np.float32)
    v = v.ravel()
    for _ in range(3):
        v = c.T @ (c @ v)
        v /= max(float(np.linalg.norm(v)), 1e-12)
    if float(v @ guide) < 0:
        v = -v
    return v


def balanced_split(z: np.ndarray, width: int, height: int, leaf_cells: int = 16) -> np.ndarray:
    """Initial placement: cell index for every row of z (kd-split by local principal directions).

    Blocks whose capacity exceeds their items leave cells empty; holes are spread, never piled up.
    """
    n, p = z.shape
    cells = np.empty(n, np.int64)
    ex = np.zeros(p, np.float32)
    ey = np.zeros(p, np.float32)
    ex[0] = 1.0
    ey[min(1, p - 1)] = 1.0
    stack = [(np.arange(n), 0, 0, width, height)]
    while stack:
        idx, x0, y0, w, h = stack.pop()
        m = len(idx)
        if m == 0:
            continue
        if w * h <= leaf_cells or m == 1:
            cells[idx] = _fill_leaf(z[idx], x0, y0, w, h, width, ex, ey)
            continue
        horizontal = w >= h   # cut the longer side
        if horizontal:
            w1 = w // 2
            c1, c2 = w1 * h, (w - w1) * h
        else:
            h1 = h // 2
            c1, c2 = w * h1, w * (h - h1)
        k = int(round(m * c1 / (c1 + c2)))
        k = min(max(k, m - c2), c1)
        direction = _principal_direction(z[idx], ex if horizontal else ey)
        proj = z[idx] @ direction
        order = np.argsort(proj, kind="stable")
        first, second = idx[order[:k]], idx[order[k:]]
        if horizontal:
            stack.append((first, x0, y0, w1, h))
            stack.append((second, x0 + w1, y0, w - w1, h))
        else:
            stack.append((first, x0, y0, w, h1))
            stack.append((second, x0, y0 + h1, w, h - h1))
    return cells


def _fill_leaf(z: np.ndarray, x0: int, y0: int, w: int, h: int, width: int,
               ex: np.ndarray, ey: np.ndarray) -> np.ndarray:
    """Cells for the m <= w*h rows of a small block: rows by PC2, then columns by PC1 in each row."""
    m = len(z)
    slots = np.linspace(0, w * h, m, endpoint=False).astype(np.int64) if m < w * h else np.arange(m)
    by_y = np.argsort(z @ ey, kind="stable")
    out = np.empty(m, np.int64)
    sy, sx = slots // w, slots % w
    for row in np.unique(sy):
        pos = np.flatnonzero(sy == row)
        members = by_y[pos]
        members = members[np.argsort(z[members] @ ex, kind="stable")]
        out[members] = (y0 + row) * width + x0 + sx[pos]
    return out


def refine(z: np.ndarray, cells: np.ndarray, width: int, height: int, params: LayoutParams,
           rng: np.random.Generator) -> np.ndarray:
    """FLAS-style rounds of smoothing + blockwise linear assignment; returns the new cells."""
    n, p = z.shape
    grid = np.full(width * height, -1, np.int64)
    grid[cells] = np.arange(n)
    b = params.block
    side = max(width, height)
    r0 = max(min(params.radius_start * side, params.radius_cap), params.radius_end)
    for it in range(params.rounds):
        t = it / max(1, params.rounds - 1)
        radius = r0 * (params.radius_end / r0) ** t
        size = max(1, int(round(2 * radius + 1)))
        occupied = grid >= 0
        field_ = np.zeros((height, width, p), np.float32)
        field_.reshape(-1, p)[occupied] = z[grid[occupied]]
        mask = occupied.reshape(height, width).astype(np.float32)
        smooth = uniform_filter(field_, size=(size, size, 1), mode="nearest")
        weight = uniform_filter(mask, size=size, mode="nearest")
        smooth /= np.maximum(weight, 1e-6)[..., None]
        oy, ox = int(rng.integers(b)), int(rng.integers(b))
        _assign_blocks(z, grid, smooth.reshape(-1, p), width, height, b, ox, oy)
    out = np.empty(n, np.int64)
    occupied = np.flatnonzero(grid >= 0)
    out[grid[occupied]] = occupied
    return out


def _assign_blocks(z: np.ndarray, grid: np.ndarray, targets: np.ndarray, width: int, height: int,
                   b: int, ox: int, oy: int) -> None:
    """One round of linear assignment inside each b × b tile (tiles start at -ox, -oy)."""
    ys = np.arange(height)
    xs = np.arange(width)
    tile_y = (ys + oy) // b
    tile_x = (xs + ox) // b
    tile_of_cell = (tile_y[:, None] * (tile_x[-1] + 1) + tile_x[None, :]).ravel()
    occupied = np.flatnonzero(grid >= 0)
    tiles = tile_of_cell[occupied]
    order = np.argsort(tiles, kind="stable")
    occupied, tiles = occupied[order], tiles[order]
    starts = np.flatnonzero(np.r_[True, tiles[1:] != tiles[:-1]])
    ends = np.r_[starts[1:], len(tiles)]
    cap = b * b
    n_tiles = len(starts)
    # Padded batch: slot j of tile t is occupied[starts[t] + j] when j < count.
    counts = ends - starts
    slot = np.arange(len(occupied)) - np.repeat(starts, counts)
    tile_idx = np.repeat(np.arange(n_tiles), counts)
    cell_pad = np.full((n_tiles, cap), -1, np.int64)
    cell_pad[tile_idx, slot] = occupied
    item_pad = grid[np.maximum(cell_pad, 0)]
    # Slots past a tile's count are never read (only cost[t, :c, :c] is solved), so no masking.
    zi = z[np.maximum(item_pad, 0)]
    tc = targets[np.maximum(cell_pad, 0)]
    # |z_i - t_j|^2 minus |z_i|^2, which is the same for every cell of an item's row.
    cost = np.einsum("tjp,tjp->tj", tc, tc)[:, None, :] - 2.0 * np.matmul(zi, tc.transpose(0, 2, 1))

    def solve(tiles_: range) -> None:   # tiles own disjoint cells: the writes never collide
        for t in tiles_:
            c = int(counts[t])
            if c < 2:
                continue
            _, cols = linear_sum_assignment(cost[t, :c, :c])
            grid[cell_pad[t, cols]] = item_pad[t, :c]

    workers = _solver_threads(n_tiles)
    if workers == 1:
        solve(range(n_tiles))
        return
    # scipy's assignment solver releases the GIL: the tiles of a round are solved on every core
    step = -(-n_tiles // workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(solve, [range(lo, min(n_tiles, lo + step)) for lo in range(0, n_tiles, step)]))


def _solver_threads(n_tiles: int) -> int:
    """Threads for one round's assignments: one per core, none below 256 tiles (~30 ms of work)."""
    return 1 if n_tiles < 256 else max(1, min(os.cpu_count() or 1, 8))


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - comes with scikit-learn
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def layout_grid(vectors: np.ndarray, seed: int = 0, params: LayoutParams | None = None,
                spare: float = 0.0) -> Layout:
    """Lay out ``vectors`` (n, d) on a near-square grid; the same inputs and seed give the same cells.

    ``spare``: leave about this share of n extra cells empty, spread over the map by the split, for
    later images (:mod:`jobs.grid.incremental`).

    Raises:
        ValueError: no vectors.
    """
    params = params or LayoutParams()
    n = len(vectors)
    if n == 0:
        raise ValueError("nothing to lay out")
    rng = np.random.default_rng(seed)
    width, height = grid_shape(n + int(math.ceil(n * max(0.0, spare))))
    timings = {}
    # One BLAS thread: most products here are small, and on a shared machine BLAS threads that
    # spin-wait for busy cores made even the PCA 10-30x slower (measured under load).
    with _one_blas_thread():
        t0 = time.perf_counter()
        mean, basis = fit_reduction(vectors, params.dims, params.pca_sample, rng)
        if basis.shape[1] < 2:
            basis = np.pad(basis, ((0, 0), (0, 2 - basis.shape[1])))
        z = project(vectors, mean, basis)
        timings["reduce_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cells = balanced_split(z, width, height, params.leaf_cells)
        timings["split_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if params.rounds > 0 and n > 1:
            cells = refine(z, cells, width, height, params, rng)
        timings["refine_s"] = time.perf_counter() - t0
    return Layout(width, height, cells, np.ascontiguousarray(z[:, :2]), timings, z=z, mean=mean, basis=basis)
