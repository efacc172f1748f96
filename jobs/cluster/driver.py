"""The cluster job's driver: duplicate descriptors on the runner, FAISS and SciPy on the driver.

Why the driver: range search and k-means need every vector in one index, and one machine holds
them comfortably when reduced (1M × 384 float32 ≈ 1.5 GB); FAISS uses all its cores. The part
that scales with image bytes — decoding a thumbnail per image for the duplicate descriptor — runs
as a partition function on Spark (or in process), one task per ``thumbnails`` data file.

Every run recomputes the duplicate groups over all images (they depend on every pair) and writes
them under its run id. Topic clusters are fitted once and kept: a later run assigns only images
that have no row under the current topic model; ``recluster`` fits a new model over all images.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.cluster.descriptor import DESCRIPTOR_SCHEMA, PIXEL_DIM, DescriptorJob, combine, descriptor_partition
from jobs.cluster.dups import dup_groups
from jobs.cluster.state import current_state, topic_artifact_dir
from jobs.cluster.topics import Projection, TopicModel, fit_projection, fit_topics
from jobs.runner import Runner, make_runner
from jobs.runs import job_run
from lake.artifacts import read_arrays, write_arrays
from lake.catalog import TABLES, Lake
from lake.commit import commit_rows, ensure_tables, now_utc, open_table
from lake.migrate import upgrade_table
from lake.errors import BadInput, CorruptArtifact, NotFound
from lake.settings import Settings
from lake.vectors import Embeddings, list_to_matrix, load_embeddings

__all__ = ["run_cluster", "pixel_descriptors", "check_sim"]

log = logging.getLogger("imagelake.jobs.cluster")


def check_sim(sim: float) -> float:
    """``sim`` as a float in 0..1 (imagecluster's meaning: 1 = identical only).

    Raises:
        BadInput: not a number in 0..1.
    """
    try:
        value = float(sim)
    except (TypeError, ValueError):
        raise BadInput(f"sim must be a number from 0 to 1 (1 = identical only), got {sim!r}") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise BadInput(f"sim must be a number from 0 to 1 (1 = identical only), got {sim!r}")
    return value


def pixel_descriptors(lake: Lake, settings: Settings, image_ids: list[str], runner: Runner) -> np.ndarray:
    """(n, PIXEL_DIM) pixel parts aligned with ``image_ids``; zeros for images without a thumbnail."""
    thumbs = open_table(lake, "thumbnails")
    files = thumbs.file_uris()
    out = np.zeros((len(image_ids), PIXEL_DIM), np.float32)
    if not files or not image_ids:
        return out
    job = DescriptorJob(size=min(settings.thumbnail_sizes))
    table = runner.map_partitions(partial(descriptor_partition, job=job), pa.table({"file": files}),
                                  len(files), DESCRIPTOR_SCHEMA, desc="cluster descriptors")
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    rows = np.array([position.get(i, -1) for i in table.column("image_id").to_pylist()], np.int64)
    pixels = list_to_matrix(table.column("pixels"), PIXEL_DIM) if table.num_rows else np.zeros((0, PIXEL_DIM), np.float32)
    keep = rows >= 0
    out[rows[keep]] = pixels[keep]
    return out


def _dup_rows(run_id: str, emb: Embeddings, labels: np.ndarray, score: np.ndarray, at) -> pa.Table:
    members = np.flatnonzero(labels >= 0)
    ids = pa.array(emb.image_ids).take(pa.array(members))
    return pa.table({
        "run_id": pa.array([run_id] * len(members), pa.string()), "image_id": ids,
        "kind": pa.array(["dup"] * len(members), pa.string()),
        "cluster_id": pa.array([f"{run_id}.dup.{g}" for g in labels[members]], pa.string()),
        "level": pa.array(np.zeros(len(members), np.int32)), "score": pa.array(score[members]),
        "created_at": pa.array([at] * len(members), TABLES["clusters"].schema.field("created_at").type),
        "model_run": pa.array([run_id] * len(members), pa.string()),
    })


def _topic_rows(run_id: str, model_run: str, image_ids: list[str], model: TopicModel,
                fine: np.ndarray, sims: np.ndarray, at) -> pa.Table:
    n = len(image_ids)
    parts = []
    ts_type = TABLES["clusters"].schema.field("created_at").type
    for level, labels in model.levels.items():
        lab = labels[fine]
        parts.append(pa.table({
            "run_id": pa.array([run_id] * n, pa.string()), "image_id": pa.array(image_ids, pa.string()),
            "kind": pa.array(["topic"] * n, pa.string()),
            "cluster_id": pa.array([f"{model_run}.topic.{level}.{x}" for x in lab], pa.string()),
            "level": pa.array(np.full(n, level, np.int32)), "score": pa.array(sims),
            "created_at": pa.array([at] * n, ts_type), "model_run": pa.array([model_run] * n, pa.string()),
        }))
    return pa.concat_tables(parts) if parts else TABLES["clusters"].schema.empty_table()


def _save_model(lake: Lake, run_id: str, model_key: str, proj: Projection, model: TopicModel) -> None:
    arrays = {"centroids": model.centroids, "pca_A": proj.A, "pca_b": proj.b}
    arrays.update({f"level_{level}": labels for level, labels in model.levels.items()})
    write_arrays(topic_artifact_dir(lake, run_id), arrays,
                 {"kind": "topic", "run_id": run_id, "model": model_key, "k": int(len(model.centroids)),
                  "levels": sorted(model.levels, reverse=True)})


def _load_model(lake: Lake, model_run: str) -> tuple[str, Projection, TopicModel]:
    art = read_arrays(topic_artifact_dir(lake, model_run))
    levels = {int(name.split("_", 1)[1]): arr for name, arr in art.arrays.items() if name.startswith("level_")}
    return (art.meta["model"], Projection(art.arrays["pca_A"], art.arrays["pca_b"]),
            TopicModel(art.arrays["centroids"], levels))


def _unassigned(lake: Lake, model_run: str, image_ids: list[str]) -> np.ndarray:
    """Rows of ``image_ids`` with no topic row under ``model_run``."""
    import duckdb

    clusters = open_table(lake, "clusters")
    if not clusters.file_uris():
        return np.arange(len(image_ids))
    con = duckdb.connect()
    try:
        con.register("clusters", clusters.to_pyarrow_dataset())
        con.register("wanted", pa.table({"image_id": image_ids, "row": np.arange(len(image_ids))}))
        rows = con.sql("SELECT w.row FROM wanted w WHERE NOT EXISTS (SELECT 1 FROM clusters c WHERE "
                       "c.kind = 'topic' AND c.model_run = $m AND c.image_id = w.image_id) ORDER BY 1",
                       params={"m": model_run}).to_arrow_table()
    finally:
        con.close()
    return rows.column("row").to_numpy().astype(np.int64)


def run_cluster(lake: Lake, settings: Settings, *, sim: float | None = None, levels: list[int] | None = None,
                k: int | None = None, recluster: bool = False, model: str | None = None,
                runner: Runner | None = None, progress: bool = False) -> dict[str, Any]:
    """Near-duplicate groups over every embedded image, and topic clusters (fitted or extended).

    Args:
        sim: duplicate threshold 0..1 (default: setting ``dup_sim``).
        levels: topic cut levels as numbers of clusters (default k, k/4, k/16, ... >= 2); only used
            when a model is fitted.
        k: k-means k (default: setting ``topic_k``, else :func:`choose_k`).
        recluster: fit a new topic model over all images even if one exists.
        model: features model key (default: the one with most rows).
    Returns:
        run_id, model, images, dup_groups, dup_images, topic_model, topic_fitted, topic_assigned,
        k, levels, seconds (plus timings).
    Raises:
        BadInput: bad sim/k/levels. NotFound: no features yet (run ``imagelake embed``).
    """
    import time

    sim = check_sim(settings.dup_sim if sim is None else sim)
    if k is not None and k < 2:
        raise BadInput(f"k must be at least 2, got {k}")
    lake.ensure()
    ensure_tables(lake, ["images", "thumbnails", "features", "clusters", "job_runs"])
    upgrade_table(lake, "clusters")
    state = current_state(lake)
    emb = load_embeddings(lake, model)
    if len(emb) == 0:
        raise NotFound(f"no features for model {emb.model}; run `imagelake embed` first")
    owns = runner is None
    runner = runner or make_runner(settings, progress=progress)
    args = dict(sim=sim, levels=levels, k=k, recluster=recluster, model=emb.model)
    try:
        with job_run(lake, "cluster", args, settings=settings) as run:
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            pixels = pixel_descriptors(lake, settings, emb.image_ids, runner)
            timings["descriptor_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            proj = fit_projection(emb.vectors, settings.cluster_pca_dim)
            reduced = proj.apply(emb.vectors)
            desc, flipped = combine(reduced, pixels)
            groups = dup_groups(desc, sim, queries=[desc, flipped])
            timings["dup_s"] = time.perf_counter() - t0
            at = now_utc()
            tables = [_dup_rows(run.run_id, emb, groups.labels, groups.score, at)]

            t0 = time.perf_counter()
            topic_model, fitted = state.topic_model, False
            loaded = None
            if topic_model and not recluster:
                try:
                    loaded = _load_model(lake, topic_model)
                except CorruptArtifact as e:
                    log.warning("topic model %s unusable (%s); fitting a new one", topic_model, e)
                if loaded is not None and (loaded[0] != emb.model or loaded[1].A.shape[1:] not in ((emb.d,), (0,))):
                    log.warning("topic model %s was fitted on %s; fitting a new one for %s", topic_model, loaded[0], emb.model)
                    loaded = None
            if loaded is None:
                topics = fit_topics(reduced, k or settings.topic_k or None, levels)
                topic_model, fitted = run.run_id, True
                _save_model(lake, run.run_id, emb.model, proj, topics)
                rows = np.arange(len(emb))
                x = reduced
            else:
                _, tproj, topics = loaded
                rows = _unassigned(lake, topic_model, emb.image_ids)
                x = tproj.apply(emb.vectors[rows]) if len(rows) else np.zeros((0, topics.centroids.shape[1]), np.float32)
            if len(rows):
                fine, sims = topics.assign(x)
                ids = [emb.image_ids[r] for r in rows]
                tables.append(_topic_rows(run.run_id, topic_model, ids, topics, fine, sims, at))
            timings["topic_s"] = time.perf_counter() - t0
            table = pa.concat_tables([t.cast(TABLES["clusters"].schema) for t in tables])
            committed = commit_rows(lake, "clusters", table, run_id=run.run_id)
            run.rows_in, run.rows_out = len(emb), committed.rows
            summary = dict(run_id=run.run_id, model=emb.model, images=len(emb), sim=sim,
                           dup_groups=groups.n_groups, dup_images=int((groups.labels >= 0).sum()),
                           dup_index=groups.index, topic_model=topic_model, topic_fitted=fitted,
                           topic_assigned=int(len(rows)), k=int(len(topics.centroids)),
                           levels=sorted(topics.levels, reverse=True),
                           thumbnails_missing=int((np.abs(pixels).sum(axis=1) == 0).sum()),
                           **{key: round(v, 3) for key, v in timings.items()})
            run.metrics.update({key: v for key, v in summary.items() if key != "run_id"})
        summary["seconds"] = run.metrics["seconds"]
        return summary
    finally:
        if owns:
            runner.close()


