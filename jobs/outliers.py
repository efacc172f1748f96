"""The ``outliers`` step: how unusual each image is, from its k nearest neighbours in the index.

An image's ``score`` is ``1 - mean cosine similarity to its k nearest neighbours`` (k = setting
``outlier_k``), over the newest published index build of the model: the build's verified float16
copy of the unit vectors. Up to ``EXACT_BELOW`` vectors the neighbours are exact (blockwise inner
products); above, the build's own FAISS shards (IVF-PQ) give ``4 k`` candidates per image, which
are re-scored exactly against the float16 copy. A build's scores are written once, under its
``build_id`` (incremental: a re-run with the same build does nothing; a new build, full or
incremental, scores every image again, since new images change old images' neighbours).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.runs import job_run
from lake.catalog import TABLES, Lake
from lake.commit import commit_rows, ensure_tables, open_table
from lake.errors import NotFound
from lake.settings import Settings

__all__ = ["run_outliers", "knn_scores", "EXACT_BELOW"]

EXACT_BELOW = 20_000
_BLOCK = 2048


def _load_vectors(lake: Lake, row: dict, settings: Settings | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(seqs, image ids as hex, unit float16 vectors, shard paths) of a published build, verified
    (on an object-store lake: fetched into the artifact cache, checked against the manifest)."""
    from jobs.index.build import verified_manifests

    manifests = verified_manifests(lake, row, settings)
    seqs, ids, vectors, shards = [], [], [], []
    for m in manifests:
        seqs.append(np.load(m.path("seqs.npy")))
        raw = np.load(m.path("ids.npy"))
        ids.extend(bytes(r).hex() for r in raw)
        vectors.append(np.load(m.path("vectors.npy"), mmap_mode="r"))
        shards.extend(m.path(s["file"]) for s in m["shards"])
    return np.concatenate(seqs), np.array(ids), np.concatenate(vectors), shards


def knn_scores(vectors: np.ndarray, k: int, shards: list[str] | None = None, seqs: np.ndarray | None = None,
               nprobe: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(mean cosine to the k nearest others, cosine to the nearest) per row of unit ``vectors``.

    Exact below :data:`EXACT_BELOW` rows (or without ``shards``); else candidates from the FAISS
    ``shards`` (whose ids are ``seqs``), re-scored exactly.
    """
    n = len(vectors)
    k = max(1, min(k, n - 1))
    if n < 2:
        return np.zeros(n, np.float32), np.zeros(n, np.float32)
    mean, nearest = np.zeros(n, np.float32), np.zeros(n, np.float32)
    if n <= EXACT_BELOW or not shards:
        full = np.asarray(vectors, np.float32)
        for start in range(0, n, _BLOCK):
            block = full[start:start + _BLOCK]
            sims = block @ full.T
            sims[np.arange(len(block)), np.arange(start, start + len(block))] = -np.inf  # not itself
            top = -np.partition(-sims, k - 1, axis=1)[:, :k]
            mean[start:start + len(block)] = top.mean(axis=1)
            nearest[start:start + len(block)] = top.max(axis=1)
        return mean, nearest
    import faiss

    row_of = {int(s): i for i, s in enumerate(seqs)}
    indexes = []
    for path in shards:
        index = faiss.read_index(path)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = min(nprobe, ivf.nlist)
        indexes.append(index)
    kc = 4 * k + 1
    for start in range(0, n, _BLOCK):
        q = np.ascontiguousarray(vectors[start:start + _BLOCK], np.float32)
        labels = np.hstack([ix.search(q, min(kc, ix.ntotal))[1] for ix in indexes])
        for j, cand in enumerate(labels):
            rows = np.array(sorted({row_of[int(c)] for c in cand if c >= 0 and int(c) in row_of} - {start + j}), np.int64)
            if not len(rows):
                continue
            sims = np.asarray(vectors[rows], np.float32) @ q[j]
            top = np.sort(sims)[::-1][:k]
            mean[start + j], nearest[start + j] = top.mean(), top[0]
    return mean, nearest


def run_outliers(lake: Lake, settings: Settings, *, model: str | None = None) -> dict[str, Any]:
    """Score every image of the newest published index build of ``model`` (default: the most
    recently published build of any model), once per build.

    Raises:
        NotFound: no index build is published (run ``imagelake index`` first).
    """
    from jobs.index.driver import latest_build

    ensure_tables(lake, ["outliers", "index_builds", "job_runs"])
    row = latest_build(lake, model) if model else latest_build(lake)
    if row is None:
        raise NotFound("no index build is published" + (f" for model {model}" if model else "")
                       + "; run `imagelake index` before the outliers step")
    k = settings.outlier_k
    with job_run(lake, "outliers", {"build_id": row["build_id"], "k": k}, settings=settings) as run:
        done = open_table(lake, "outliers")
        if done.file_uris():
            import pyarrow.dataset as pads

            present = done.to_pyarrow_dataset().to_table(columns=["build_id"],
                                                         filter=pads.field("build_id") == row["build_id"]).num_rows
        else:
            present = 0
        result = {"run_id": run.run_id, "build_id": row["build_id"], "rows_in": 0, "rows_out": 0}
        if present:
            run.metrics.update(build_id=row["build_id"], scored=0, note="this build is scored already")
            return result
        seqs, ids, vectors, shards = _load_vectors(lake, row, settings)
        mean, nearest = knn_scores(vectors, k, shards, seqs)
        score = (1.0 - mean).astype(np.float32)
        order = np.lexsort((ids, -score))
        rank = np.empty(len(score), np.int64)
        rank[order] = np.arange(1, len(score) + 1)
        now = dt.datetime.now(dt.timezone.utc)
        table = pa.table({
            "build_id": pa.array([row["build_id"]] * len(ids), pa.string()), "image_id": pa.array(ids, pa.string()),
            "score": pa.array(score, pa.float32()), "nearest": pa.array(nearest, pa.float32()),
            "rank": pa.array(rank, pa.int64()), "k": pa.array([min(k, max(1, len(ids) - 1))] * len(ids), pa.int32()),
            "run_id": pa.array([run.run_id] * len(ids), pa.string()),
            "created_at": pa.array([now] * len(ids), TABLES["outliers"].schema.field("created_at").type),
        }).sort_by("image_id")
        committed = commit_rows(lake, "outliers", table, run_id=run.run_id)
        run.rows_in, run.rows_out = len(ids), committed.rows
        run.metrics.update(build_id=row["build_id"], scored=committed.rows, k=k,
                           exact=len(ids) <= EXACT_BELOW)
        result.update(rows_in=len(ids), rows_out=committed.rows)
    return result
