"""The cluster job's driver: duplicate descriptors on the runner, FAISS and SciPy on the driver.

Why the driver: range search and k-means need every vector in one index, and one machine holds
them comfortably when reduced (1M × 384 float32 ≈ 1.5 GB); FAISS uses all its cores. The part
that scales with image bytes — decoding a thumbnail per image for the duplicate descriptor — runs
as a partition function on Spark (or in process), one task per ``thumbnails`` data file.

A run recomputes the duplicate groups over all images only when it must: with the previous run's
dup state (:mod:`jobs.cluster.incremental`) it computes descriptors and pairs for the new images
alone and joins them with the old groups; either way the groups are written under its run id. Topic clusters are fitted once and kept: a later run assigns only images
that have no row under the current topic model; ``recluster`` fits a new model over all images.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.cluster import incremental
from jobs.cluster.descriptor import DESCRIPTOR_SCHEMA, PIXEL_DIM, DescriptorJob, combine, descriptor_partition
from jobs.cluster.dups import dup_groups, edges_of_new, groups_from_edges
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
from lake.vectors import default_model_key, list_to_matrix, load_embeddings, load_few_embeddings

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


def pixel_descriptors(lake: Lake, settings: Settings, image_ids: list[str], runner: Runner,
                      only: bool = False) -> np.ndarray:
    """(n, PIXEL_DIM) pixel parts aligned with ``image_ids``; zeros for images without a thumbnail.
    ``only``: decode the thumbnails of ``image_ids`` alone (a few), not every one of the table."""
    thumbs = open_table(lake, "thumbnails")
    files = thumbs.file_uris()
    out = np.zeros((len(image_ids), PIXEL_DIM), np.float32)
    if not files or not image_ids:
        return out
    job = DescriptorJob(size=min(settings.thumbnail_sizes), only=tuple(image_ids) if only else ())
    table = runner.map_partitions(partial(descriptor_partition, job=job), pa.table({"file": files}),
                                  len(files), DESCRIPTOR_SCHEMA, desc="cluster descriptors")
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    rows = np.array([position.get(i, -1) for i in table.column("image_id").to_pylist()], np.int64)
    pixels = list_to_matrix(table.column("pixels"), PIXEL_DIM) if table.num_rows else np.zeros((0, PIXEL_DIM), np.float32)
    keep = rows >= 0
    out[rows[keep]] = pixels[keep]
    return out


def _dup_rows(run_id: str, image_ids: list[str], labels: np.ndarray, score: np.ndarray, at) -> pa.Table:
    members = np.flatnonzero(labels >= 0)
    ids = pa.array(image_ids, pa.string()).take(pa.array(members))
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
                k: int | None = None, recluster: bool = False, model: str | None = None, full: bool = False,
                runner: Runner | None = None, progress: bool = False) -> dict[str, Any]:
    """Near-duplicate groups over every embedded image, and topic clusters (fitted or extended).

    Args:
        sim: duplicate threshold 0..1 (default: setting ``dup_sim``).
        levels: topic cut levels as numbers of clusters (default k, k/4, k/16, ... >= 2); only used
            when a model is fitted.
        k: k-means k (default: setting ``topic_k``, else :func:`choose_k`).
        recluster: fit a new topic model over all images even if one exists (implies ``full``).
        model: features model key (default: the one with most rows).
        full: recompute every image's descriptor and pair, refitting the projection, even when the
            previous run's dup state allows an incremental run (:mod:`jobs.cluster.incremental`).
    Returns:
        run_id, model, images, dup_mode (full/incremental), dup_new, dup_groups, dup_images,
        topic_model, topic_fitted, topic_assigned, k, levels, seconds (plus timings).
    Raises:
        BadInput: bad sim/k/levels. NotFound: no features yet (run ``imagelake embed``).
    """
    sim = check_sim(settings.dup_sim if sim is None else sim)
    if k is not None and k < 2:
        raise BadInput(f"k must be at least 2, got {k}")
    lake.ensure()
    ensure_tables(lake, ["images", "thumbnails", "features", "clusters", "job_runs"])
    upgrade_table(lake, "clusters")
    state = current_state(lake)
    key = model or default_model_key(lake)
    meta = incremental.state_meta(key, sim, settings.cluster_pca_dim, min(settings.thumbnail_sizes))
    topic_loaded = None if recluster else _usable_topic_model(lake, state.topic_model, key)
    step = None if (full or recluster or topic_loaded is None) else incremental.plan(lake, state.dup_state, meta)
    owns = runner is None
    runner = runner or make_runner(settings, progress=progress)
    args = dict(sim=sim, levels=levels, k=k, recluster=recluster, model=key, full=full)
    try:
        with job_run(lake, "cluster", args, settings=settings) as run:
            timings: dict[str, float] = {}
            dups = _dups_full(lake, settings, key, sim, runner, timings) if step is None else \
                _dups_incremental(lake, settings, key, sim, step, runner, timings)
            incremental.save_state(lake, run.run_id, dups.seqs, dups.desc, dups.projection, dups.groups.edges,
                                   dict(meta, thumbnails_missing=dups.thumbnails_missing))
            at = now_utc()
            groups = dups.groups
            tables = [_dup_rows(run.run_id, dups.image_ids, groups.labels, groups.score, at)]

            t0 = time.perf_counter()
            topic_model, fitted = state.topic_model, False
            if topic_loaded is None:
                reduced = dups.projection.apply(dups.vectors())
                topics = fit_topics(reduced, k or settings.topic_k or None, levels)
                topic_model, fitted = run.run_id, True
                _save_model(lake, run.run_id, key, dups.projection, topics)
                rows = np.arange(len(dups.image_ids))
                x = reduced
            else:
                _, tproj, topics = topic_loaded
                rows = _unassigned(lake, topic_model, dups.image_ids)
                x = tproj.apply(dups.vectors(rows)) if len(rows) else \
                    np.zeros((0, topics.centroids.shape[1]), np.float32)
            if len(rows):
                fine, sims = topics.assign(x)
                ids = [dups.image_ids[r] for r in rows]
                tables.append(_topic_rows(run.run_id, topic_model, ids, topics, fine, sims, at))
            timings["topic_s"] = time.perf_counter() - t0
            table = pa.concat_tables([t.cast(TABLES["clusters"].schema) for t in tables])
            committed = commit_rows(lake, "clusters", table, run_id=run.run_id)
            run.rows_in, run.rows_out = len(dups.image_ids), committed.rows
            summary = dict(run_id=run.run_id, model=key, images=len(dups.image_ids), sim=sim,
                           dup_mode="full" if step is None else "incremental", dup_new=dups.n_new,
                           dup_groups=groups.n_groups, dup_images=int((groups.labels >= 0).sum()),
                           dup_index=groups.index, dup_state=run.run_id, topic_model=topic_model,
                           topic_fitted=fitted, topic_assigned=int(len(rows)), k=int(len(topics.centroids)),
                           levels=sorted(topics.levels, reverse=True), thumbnails_missing=dups.thumbnails_missing,
                           **{name: round(v, 3) for name, v in timings.items()})
            run.metrics.update({name: v for name, v in summary.items() if name != "run_id"})
        summary["seconds"] = run.metrics["seconds"]
        if state.dup_state and state.dup_state != run.run_id:
            incremental.remove_state(lake, state.dup_state)
        return summary
    finally:
        if owns:
            runner.close()


class _Dups:
    """One run's duplicate groups over its rows, and what the state and the topic step need."""

    def __init__(self, seqs, image_ids, desc, projection, groups, thumbnails_missing, n_new, vectors):
        self.seqs, self.image_ids, self.desc, self.projection = seqs, image_ids, desc, projection
        self.groups, self.thumbnails_missing, self.n_new, self._vectors = groups, thumbnails_missing, n_new, vectors

    def vectors(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The embeddings of ``rows`` (default all) of this run's row order."""
        return self._vectors(rows)


def _dups_full(lake: Lake, settings: Settings, key: str, sim: float, runner: Runner, timings: dict) -> _Dups:
    emb = load_embeddings(lake, key)
    if len(emb) == 0:
        raise NotFound(f"no features for model {emb.model}; run `imagelake embed` first")
    t0 = time.perf_counter()
    pixels = pixel_descriptors(lake, settings, emb.image_ids, runner)
    timings["descriptor_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    proj = fit_projection(emb.vectors, settings.cluster_pca_dim)
    desc, flipped = combine(proj.apply(emb.vectors), pixels)
    groups = dup_groups(desc, sim, queries=[desc, flipped])
    timings["dup_s"] = time.perf_counter() - t0
    return _Dups(emb.seqs, emb.image_ids, desc, proj, groups, _missing(pixels), len(emb),
                 lambda rows: emb.vectors if rows is None else emb.vectors[rows])


def _dups_incremental(lake: Lake, settings: Settings, key: str, sim: float, step, runner: Runner,
                      timings: dict) -> _Dups:
    old, n_old = step.state, len(step.state.seqs)
    new = load_few_embeddings(lake, key, step.new_seqs)
    t0 = time.perf_counter()
    pixels = pixel_descriptors(lake, settings, new.image_ids, runner, only=True)
    timings["descriptor_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if len(new):
        desc_new, flipped_new = combine(old.projection.apply(new.vectors), pixels)
        desc = np.vstack([old.desc, desc_new])
        i, j, s = edges_of_new(desc, n_old, [desc_new, flipped_new], sim)
        i, j, s = (np.concatenate([a, b]) for a, b in zip(old.edges, (i, j, s)))
    else:
        desc, (i, j, s) = old.desc, old.edges
    groups = groups_from_edges(len(desc), i, j, s, f"incremental:{len(new)} new, flat")
    timings["dup_s"] = time.perf_counter() - t0
    seqs = np.concatenate([old.seqs, new.seqs])
    ids = old.image_ids + new.image_ids

    def vectors(rows):
        rows = np.arange(len(seqs)) if rows is None else np.asarray(rows, np.int64)
        if len(rows) and rows.min() >= n_old:
            return new.vectors[rows - n_old]
        return load_few_embeddings(lake, key, seqs[rows]).vectors if len(rows) else new.vectors[:0]
    missing = int(old.meta.get("thumbnails_missing", 0)) + _missing(pixels)
    return _Dups(seqs, ids, desc, old.projection, groups, missing, len(new), vectors)


def _missing(pixels: np.ndarray) -> int:
    return int((np.abs(pixels).sum(axis=1) == 0).sum())


def _usable_topic_model(lake: Lake, topic_model: str | None, key: str):
    """The current topic model (key, projection, model) if it was fitted on ``key``'s vectors, else None."""
    if not topic_model:
        return None
    try:
        loaded = _load_model(lake, topic_model)
    except CorruptArtifact as e:
        log.warning("topic model %s unusable (%s); fitting a new one", topic_model, e)
        return None
    if loaded[0] != key:
        log.warning("topic model %s was fitted on %s; fitting a new one for %s", topic_model, loaded[0], key)
        return None
    return loaded
