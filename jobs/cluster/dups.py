"""Near-duplicate groups: every pair at similarity >= sim, joined transitively, without an n×n matrix.

A FAISS range search over unit-length descriptors (inner product = cosine) finds, for each image,
the images at or above ``sim``; the edges go into a sparse matrix and
``scipy.sparse.csgraph.connected_components`` turns them into groups (single linkage: a chain of
near-duplicates is one group, as imagecluster's groups at sim close to 1 are). Memory is the index
(n × d × 4 bytes) plus the edges; time is about n × (vectors scanned per query).

Up to ``exact_max`` images the search is exact (``IndexFlatIP``). Above, an ``IndexIVFFlat`` with
about 4·√n lists, trained on a sample, scans ``nprobe`` lists per query: near-duplicates are much
closer to each other than to anything else, so they land in the same or a neighbouring list, and
the benchmark measures what recall this costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["DupGroups", "dup_edges", "dup_groups", "EXACT_MAX"]

EXACT_MAX = 50_000
_EPS = 1e-5  # float32 rounding: identical descriptors score 1 - ~1e-7


@dataclass(frozen=True)
class DupGroups:
    """``labels[i]``: the group of row i (-1: in no group); ``score[i]``: its best edge's similarity."""

    labels: np.ndarray   # int64 (n,)
    score: np.ndarray    # float32 (n,)
    n_groups: int
    n_edges: int
    index: str           # "flat" or "ivf<nlist>,nprobe=<p>"


def _index(vectors: np.ndarray, exact_max: int, nprobe: int, seed: int) -> tuple[faiss.Index, str]:
    n, d = vectors.shape
    if n <= exact_max:
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return index, "flat"
    nlist = int(min(65536, max(64, 4 * np.sqrt(n))))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = vectors[np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))]
    index.train(sample)
    index.add(vectors)
    index.nprobe = nprobe
    return index, f"ivf{nlist},nprobe={nprobe}"


def dup_edges(vectors: np.ndarray, sim: float, *, queries: list[np.ndarray] | None = None,
              exact_max: int = EXACT_MAX, nprobe: int = 8, batch: int = 16384,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Pairs (i, j, similarity) with i < j and similarity >= ``sim`` (each pair once, best score).

    Args:
        vectors: (n, d) float32, unit length.
        queries: query matrices aligned with ``vectors`` (default: ``[vectors]``); e.g. the
            descriptor and its flipped twin, so a mirrored copy is found too.
    """
    vectors = np.ascontiguousarray(vectors, np.float32)
    n = len(vectors)
    if n < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32), "none"
    index, kind = _index(vectors, exact_max, nprobe, seed)
    radius = float(sim) - _EPS
    rows, cols, sims = [], [], []
    for q in queries or [vectors]:
        for start in range(0, n, batch):
            block = np.ascontiguousarray(q[start:start + batch], np.float32)
            lims, dist, ids = index.range_search(block, radius)
            counts = np.diff(lims).astype(np.int64)
            src = np.repeat(np.arange(start, start + len(block), dtype=np.int64), counts)
            keep = ids != src
            rows.append(src[keep]), cols.append(ids[keep].astype(np.int64)), sims.append(dist[keep])
    i, j, s = np.concatenate(rows), np.concatenate(cols), np.concatenate(sims).astype(np.float32)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    if len(lo):
        key = lo * n + hi
        order = np.lexsort((-s, key))
        key, lo, hi, s = key[order], lo[order], hi[order], s[order]
        first = np.ones(len(key), bool)
        first[1:] = key[1:] != key[:-1]
        lo, hi, s = lo[first], hi[first], s[first]
    return lo, hi, np.minimum(s, 1.0), kind


def dup_groups(vectors: np.ndarray, sim: float, **kwargs) -> DupGroups:
    """Connected components of the graph of pairs at similarity >= ``sim``; singletons get -1.

    Groups are numbered 0.. by their smallest row, so the same input gives the same labels.
    """
    n = len(vectors)
    i, j, s, kind = dup_edges(vectors, sim, **kwargs)
    if n == 0:
        return DupGroups(np.zeros(0, np.int64), np.zeros(0, np.float32), 0, 0, kind)
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n)).tocsr()
    _, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp)
    in_group = sizes[comp] >= 2
    labels = np.full(n, -1, np.int64)
    rows = np.flatnonzero(in_group)
    comps, first = np.unique(comp[rows], return_index=True)
    rank = np.empty(len(comps), np.int64)
    rank[np.argsort(first)] = np.arange(len(comps))
    labels[rows] = rank[np.searchsorted(comps, comp[rows])]
    score = np.zeros(n, np.float32)
    if len(s):
        np.maximum.at(score, i, s)
        np.maximum.at(score, j, s)
    return DupGroups(labels, score, len(comps), int(len(i)), kind)
