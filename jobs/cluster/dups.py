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

Above ``knn_min`` images (default :data:`KNN_MIN`, 50k) the default is :func:`knn_edges` instead: a
kNN graph by **nearest-centroid blocking**. k-means centroids (about one per 1,024 images) split
the vectors into lists (each image is a member of its nearest centroid's list); each query vector
is compared with the members of its ``nprobe`` nearest lists (:func:`auto_nprobe`: 1/32 of the lists, 4..16) by one dense matrix product per list
(BLAS, not one scan per query), which gives the exact similarity of every candidate pair, and keeps
its ``k`` best neighbours at or above ``sim``. Connected components of that graph are the groups:
a group larger than k is still one component through its members' chains. Candidates are exactly
re-checked by construction (the product is over the stored vectors), so every reported pair is a
true pair (precision 1); what blocking can miss is a pair split across lists that neither side
probes, which ``tests/test_dups_knn.py`` bounds on generated data (pair recall >= 0.99 against the
exact range search). Cost: about nprobe × n × 1,024 × d multiply-adds per query set plus the
centroid search (n × n/1,024 × d), independent of how many pairs there are.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["DupGroups", "dup_edges", "dup_groups", "groups_from_edges", "edges_of_new", "knn_edges", "auto_nprobe", "EXACT_MAX", "KNN_MIN"]

EXACT_MAX = 50_000
KNN_MIN = 50_000   # above this many images the kNN graph is the default
LIST_SIZE = 1024   # target members per list of the kNN blocking
_EPS = 1e-5  # float32 rounding: identical descriptors score 1 - ~1e-7


@dataclass(frozen=True)
class DupGroups:
    """``labels[i]``: the group of row i (-1: in no group); ``score[i]``: its best edge's similarity."""

    labels: np.ndarray   # int64 (n,)
    score: np.ndarray    # float32 (n,)
    n_groups: int
    n_edges: int
    index: str           # "flat", "ivf<nlist>,nprobe=<p>" or "knn<nlist>,nprobe=<p>,k=<k>"
    edges: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None   # (i, j, similarity), i < j


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
    lo, hi, s = _dedupe_pairs(i, j, s, n)
    return lo, hi, s, kind


def _dedupe_pairs(i: np.ndarray, j: np.ndarray, s: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    if len(lo):
        key = lo * n + hi
        order = np.lexsort((-s, key))
        key, lo, hi, s = key[order], lo[order], hi[order], s[order]
        first = np.ones(len(key), bool)
        first[1:] = key[1:] != key[:-1]
        lo, hi, s = lo[first], hi[first], s[first]
    return lo, hi, np.minimum(s, 1.0).astype(np.float32)


def _top_centroids(x: np.ndarray, centroids: np.ndarray, p: int, batch: int = 65536) -> np.ndarray:
    """(len(x), p) indices of each row's ``p`` nearest centroids by inner product, best first."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    out = np.empty((len(x), p), np.int64)
    for s in range(0, len(x), batch):
        _, ids = index.search(np.ascontiguousarray(x[s:s + batch]), p)
        out[s:s + batch] = ids
    return out


def auto_nprobe(nlist: int) -> int:
    """Lists each query probes by default: 1/32 of them, at least 4 and at most 16. Measured on generated
    descriptors with many background pairs near the threshold (tests/test_dups_knn.py, README):
    probing 1/32 of 125-500 lists keeps group-pair recall >= 0.994; the cap bounds the cost at 1M
    (16 of ~980 lists), where recall is not measured."""
    return int(min(16, max(4, -(-nlist // 32))))


def knn_edges(vectors: np.ndarray, sim: float, *, queries: list[np.ndarray] | None = None, k: int = 16,
              nprobe: int | None = None, list_size: int = LIST_SIZE, seed: int = 0,
              block: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Pairs (i, j, similarity), i < j, similarity >= ``sim``: each query row's ``k`` best neighbours
    at or above ``sim`` among the members of its ``nprobe`` nearest lists (see the module docstring).

    Args:
        vectors: (n, d) float32, unit length (the members).
        queries: query matrices aligned with ``vectors`` (default ``[vectors]``).
        k: most neighbours kept per query row (a group larger than k stays one component).
        nprobe: lists each query row is compared with (default :func:`auto_nprobe`).
        list_size: target members per list (nlist = n / list_size).
        block: query rows per matrix product (memory: block × the largest list × 4 bytes).
    """
    vectors = np.ascontiguousarray(vectors, np.float32)
    n, d = vectors.shape
    if n < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32), "none"
    nlist = max(1, int(round(n / list_size)))
    nprobe = max(1, min(auto_nprobe(nlist) if nprobe is None else nprobe, nlist))
    if nlist > 1:
        rng = np.random.default_rng(seed)
        sample = vectors[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
        km = faiss.Kmeans(d, nlist, niter=12, seed=seed, spherical=True, min_points_per_centroid=1,
                          max_points_per_centroid=10**9)
        km.train(sample)
        centroids = np.ascontiguousarray(km.centroids, np.float32)
    else:
        centroids = vectors[:1].copy()
    radius = float(sim) - _EPS
    own = _top_centroids(vectors, centroids, nprobe) if nlist > 1 else np.zeros((n, 1), np.int64)
    member_list = own[:, 0]
    order = np.argsort(member_list, kind="stable")
    bounds = np.searchsorted(member_list[order], np.arange(nlist + 1))
    rows, cols, sims = [], [], []
    for qi, q in enumerate(queries if queries is not None else [vectors]):
        q = np.ascontiguousarray(q, np.float32)
        if q.shape != vectors.shape:
            raise ValueError(f"query matrix {qi} has shape {q.shape}, the vectors {vectors.shape}")
        same = q.__array_interface__["data"][0] == vectors.__array_interface__["data"][0]
        probes = own if same or nlist == 1 else _top_centroids(q, centroids, nprobe)
        flat_q = np.repeat(np.arange(n, dtype=np.int64), probes.shape[1])
        flat_l = probes.reshape(-1)
        qorder = np.argsort(flat_l, kind="stable")
        qbounds = np.searchsorted(flat_l[qorder], np.arange(nlist + 1))
        for lst in range(nlist):
            members = order[bounds[lst]:bounds[lst + 1]]
            qrows = flat_q[qorder[qbounds[lst]:qbounds[lst + 1]]]
            if len(members) == 0 or len(qrows) == 0:
                continue
            m = vectors[members]
            for s in range(0, len(qrows), block):
                qr = qrows[s:s + block]
                prod = q[qr] @ m.T
                r, c = np.nonzero(prod >= radius)
                if len(r) == 0:
                    continue
                val = prod[r, c]
                src, dst = qr[r], members[c]
                keep = src != dst
                r, src, dst, val = r[keep], src[keep], dst[keep], val[keep]
                if len(r) and np.bincount(r).max() > k:  # bound memory: at most k per query row from each list
                    o = np.lexsort((-val, r))
                    r, src, dst, val = r[o], src[o], dst[o], val[o]
                    top = (np.arange(len(r)) - np.searchsorted(r, r, side="left")) < k
                    src, dst, val = src[top], dst[top], val[top]
                rows.append(src), cols.append(dst), sims.append(val)
    if not rows:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32), f"knn{nlist},nprobe={nprobe},k={k}"
    i, j, s = np.concatenate(rows), np.concatenate(cols), np.concatenate(sims).astype(np.float32)
    # the k best per query row (over all its lists and query sets)
    o = np.lexsort((-s, i))
    i, j, s = i[o], j[o], s[o]
    starts = np.searchsorted(i, i, side="left")
    rank = np.arange(len(i)) - starts
    keep = rank < k
    lo, hi, s = _dedupe_pairs(i[keep], j[keep], s[keep], n)
    return lo, hi, s, f"knn{nlist},nprobe={nprobe},k={k}"


def dup_groups(vectors: np.ndarray, sim: float, *, method: str = "auto", knn_min: int = KNN_MIN,
               **kwargs) -> DupGroups:
    """Connected components of the graph of pairs at similarity >= ``sim``; singletons get -1.

    ``method``: ``range`` (:func:`dup_edges`: exact up to ``exact_max``, IVF range search above),
    ``knn`` (:func:`knn_edges`), or ``auto``: knn above ``knn_min`` images, else range. Other
    keyword arguments go to the chosen function. Groups are numbered 0.. by their smallest row, so
    the same input gives the same labels.
    """
    n = len(vectors)
    if method not in ("auto", "range", "knn"):
        raise ValueError(f"method must be auto, range or knn, got {method!r}")
    if method == "knn" or (method == "auto" and n > knn_min):
        kw = {key: v for key, v in kwargs.items() if key in ("queries", "k", "nprobe", "list_size", "seed", "block")}
        i, j, s, kind = knn_edges(vectors, sim, **kw)
    else:
        kw = {key: v for key, v in kwargs.items() if key in ("queries", "exact_max", "nprobe", "batch", "seed")}
        i, j, s, kind = dup_edges(vectors, sim, **kw)
    return groups_from_edges(n, i, j, s, kind)


def groups_from_edges(n: int, i: np.ndarray, j: np.ndarray, s: np.ndarray, kind: str) -> DupGroups:
    """Connected components of ``n`` rows joined by the pairs (i, j) of similarity s; singletons get -1;
    groups numbered 0.. by their smallest row."""
    if n == 0:
        return DupGroups(np.zeros(0, np.int64), np.zeros(0, np.float32), 0, 0, kind, (i, j, s))
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
    return DupGroups(labels, score, len(comps), int(len(i)), kind, (i, j, s))


def edges_of_new(vectors: np.ndarray, first_new: int, queries: list[np.ndarray], sim: float,
                 batch: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j, similarity), i < j, similarity >= ``sim``, with j a new row: every row from
    ``first_new`` on (and its ``queries`` twins, aligned with those rows) compared exactly with
    every row (FAISS flat range search). Cost: new rows × all rows × d per query set."""
    vectors = np.ascontiguousarray(vectors, np.float32)
    n = len(vectors)
    empty = np.zeros(0, np.int64)
    if first_new >= n or n < 2:
        return empty, empty, np.zeros(0, np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    radius = float(sim) - _EPS
    rows, cols, sims = [], [], []
    for q in queries:
        for start in range(0, len(q), batch):
            block = np.ascontiguousarray(q[start:start + batch], np.float32)
            lims, dist, ids = index.range_search(block, radius)
            src = np.repeat(np.arange(first_new + start, first_new + start + len(block), dtype=np.int64),
                            np.diff(lims).astype(np.int64))
            keep = ids != src
            rows.append(src[keep]), cols.append(ids[keep].astype(np.int64)), sims.append(dist[keep])
    i, j, s = np.concatenate(rows), np.concatenate(cols), np.concatenate(sims).astype(np.float32)
    return _dedupe_pairs(i, j, s, n)
