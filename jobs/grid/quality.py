"""The layout quality metric: neighbourhood preservation.

For a cell, take the images in its (up to) 8 grid neighbours; its score is the share of them that
are among the cell image's ``k`` = 50 nearest neighbours in feature space (cosine, exact, FAISS).
The layout's quality is the mean score over cells (all of them, or a random sample of ``sample``
cells at scale; the kNN still searches the whole collection). 1.0: every grid neighbour is a
feature-space neighbour; a random placement scores about k / n.
"""

from __future__ import annotations

import numpy as np

__all__ = ["neighbourhood_preservation", "random_baseline"]

_OFFSETS = [(-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)]


_BLOCK = 65_536


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _block_knn(xq: np.ndarray, xb: np.ndarray, k: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    d, i = faiss.knn(xq, xb, min(k, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)
    if d.shape[1] < k:   # a last block smaller than k: pad with nothing
        d = np.hstack([d, np.full((len(d), k - d.shape[1]), -np.inf, np.float32)])
        i = np.hstack([i, np.full((len(i), k - i.shape[1]), -1, np.int64)])
    return np.ascontiguousarray(d, np.float32), np.where(i >= 0, i + offset, -1).astype(np.int64)


def random_baseline(n: int, k: int = 50) -> float:
    """What a random placement is expected to score."""
    return min(1.0, k / max(1, n - 1))


def neighbourhood_preservation(vectors: np.ndarray, cells: np.ndarray, width: int, height: int, *,
                               k: int = 50, sample: int | None = 20_000, seed: int = 0,
                               threads: int | None = None) -> float:
    """Mean share of each cell's 8 grid neighbours that are among its k nearest in feature space.

    Args:
        vectors: (n, d) features (normalised here; cosine similarity).
        cells: (n,) cell of each item, ``gy * width + gx``.
        sample: score this many random items (None: all).
    """
    import faiss

    n = len(vectors)
    if n < 2:
        return 0.0
    k = min(k, n - 1)
    rng = np.random.default_rng(seed)
    queries = np.arange(n) if sample is None or sample >= n else np.sort(rng.choice(n, sample, replace=False))
    if threads:
        faiss.omp_set_num_threads(int(threads))
    # exact search block by block (no normalised copy nor index of the whole collection: 10 GB at 1M)
    xq = _unit(vectors[queries])
    heap = faiss.ResultHeap(len(queries), k + 1, keep_max=True)
    for lo in range(0, n, _BLOCK):
        heap.add_result(*_block_knn(xq, _unit(vectors[lo:lo + _BLOCK]), k + 1, lo))
    heap.finalize()
    knn = heap.I
    grid = np.full(width * height, -1, np.int64)
    grid[cells] = np.arange(n)
    gx, gy = cells[queries] % width, cells[queries] // width
    neigh = []
    for dx, dy in _OFFSETS:
        nx, ny = gx + dx, gy + dy
        inside = (nx >= 0) & (nx < width) & (ny >= 0) & (ny < height)
        neigh.append(np.where(inside, grid[np.clip(ny, 0, height - 1) * width + np.clip(nx, 0, width - 1)], -1))
    neigh = np.stack(neigh, axis=1)                                 # (q, 8), -1 outside/empty
    hits = (neigh[:, :, None] == knn[:, None, :]) & (neigh[:, :, None] >= 0)
    hits &= neigh[:, :, None] != queries[:, None, None]
    found = hits.any(axis=2).sum(axis=1)
    present = (neigh >= 0).sum(axis=1)
    scores = found / np.maximum(present, 1)
    return float(scores[present > 0].mean()) if (present > 0).any() else 0.0
