"""Topic clusters: spherical k-means (FAISS) over reduced embeddings, then Ward over the centroids.

k-means gives the finest level (k clusters; k from n by :func:`choose_k` unless set). A Ward
hierarchy over the k centroids (k × k, tiny next to n × n) is cut into coarser levels; a *level* is
named by its number of clusters, so ``level=10`` is the cut into 10 topics. New images are assigned
to the nearest centroid and inherit that centroid's coarser labels, so a later run places new
images without moving old ones. The PCA projection is part of the model (fitted with it).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from jobs.cluster.descriptor import l2_normalize
from lake.errors import BadInput

__all__ = ["Projection", "TopicModel", "choose_k", "default_levels", "fit_projection", "fit_topics"]


def choose_k(n: int) -> int:
    """round(√(n/2)), within 2..4096 and at most n: 5k images → 50, 70k → 187, 1M → 707."""
    return int(min(n, max(2, min(4096, round(np.sqrt(n / 2))))))


def default_levels(k: int) -> list[int]:
    """k, then roughly ÷4 while at least 2: k=50 → [50, 12, 3]."""
    levels, level = [k], k // 4
    while level >= 2:
        levels.append(level)
        level //= 4
    return levels


@dataclass(frozen=True)
class Projection:
    """x ↦ normalise(normalise(x) @ A.T + b); the identity when ``A`` is empty."""

    A: np.ndarray  # (d_out, d_in) float32, or shape (0, 0)
    b: np.ndarray  # (d_out,)

    def apply(self, x: np.ndarray, batch: int = 65536) -> np.ndarray:
        if self.A.size == 0:
            return l2_normalize(x)
        out = np.empty((len(x), self.A.shape[0]), np.float32)
        for s in range(0, len(x), batch):
            out[s:s + batch] = l2_normalize(l2_normalize(x[s:s + batch]) @ self.A.T + self.b)
        return out


def fit_projection(x: np.ndarray, dim: int, sample: int = 100_000, seed: int = 0) -> Projection:
    """PCA to ``dim`` dimensions trained on at most ``sample`` rows; identity if ``dim`` is 0 or
    there are too few rows (< 4·dim) or dimensions to reduce."""
    n, d = x.shape
    if dim <= 0 or dim >= d or n < 4 * dim:
        return Projection(np.zeros((0, 0), np.float32), np.zeros(0, np.float32))
    rng = np.random.default_rng(seed)
    rows = x if n <= sample else x[np.sort(rng.choice(n, sample, replace=False))]
    pca = faiss.PCAMatrix(d, dim)
    pca.train(np.ascontiguousarray(l2_normalize(rows)))
    A = faiss.vector_to_array(pca.A).reshape(dim, d).astype(np.float32)
    b = faiss.vector_to_array(pca.b).astype(np.float32)
    return Projection(A, b)


@dataclass(frozen=True)
class TopicModel:
    """Centroids (k, d) of unit-length vectors and, per level, each centroid's label at that level."""

    centroids: np.ndarray
    levels: dict[int, np.ndarray]   # level (number of clusters) -> (k,) int labels 0..level-1

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid of each row of ``x`` (unit length) and its cosine similarity."""
        index = faiss.IndexFlatIP(self.centroids.shape[1])
        index.add(np.ascontiguousarray(self.centroids, np.float32))
        sims, ids = index.search(np.ascontiguousarray(x, np.float32), 1)
        return ids[:, 0].astype(np.int64), sims[:, 0].astype(np.float32)


def _parse_levels(levels: list[int] | None, k: int) -> list[int]:
    if not levels:
        return default_levels(k)
    bad = [v for v in levels if v < 1]
    if bad:
        raise BadInput(f"levels must be positive numbers of clusters, got {bad}")
    return sorted({min(v, k) for v in levels} | {k}, reverse=True)


def fit_topics(x: np.ndarray, k: int | None = None, levels: list[int] | None = None,
               niter: int = 20, seed: int = 0) -> TopicModel:
    """Spherical k-means on unit-length rows of ``x`` and a Ward hierarchy over the centroids.

    Raises:
        BadInput: fewer than 2 images, or k or a level out of range.
    """
    n, d = x.shape
    if n < 2:
        raise BadInput(f"topic clusters need at least 2 embedded images, the lake has {n}")
    k = choose_k(n) if not k else int(k)
    if not 2 <= k <= n:
        raise BadInput(f"k must be between 2 and the number of images ({n}), got {k}")
    kmeans = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=256, min_points_per_centroid=1)
    kmeans.train(np.ascontiguousarray(x, np.float32))
    centroids = l2_normalize(kmeans.centroids)
    out: dict[int, np.ndarray] = {}
    tree = linkage(centroids.astype(np.float64), method="ward") if k > 2 else None
    for level in _parse_levels(levels, k):
        if level == k or tree is None:
            out[level] = np.arange(k, dtype=np.int64) if level == k else np.zeros(k, np.int64)
        else:
            out[level] = fcluster(tree, level, criterion="maxclust").astype(np.int64) - 1
    return TopicModel(centroids, out)
