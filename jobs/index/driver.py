"""The index job's driver: plan, train on a sample, encode shards in parallel, publish atomically.

``run_index`` decides between three outcomes:

* **up to date** — every embedded image of the model is in the published build: nothing happens.
* **incremental** — images embedded since the last *full* build go into one delta folder (its own
  ``seqs``/``ids``/``vectors`` and shard files), encoded with the base build's trained index — no
  retraining. The delta always holds everything since the base, so a build is at most base + one
  delta and old deltas are simply superseded.
* **full** — a new plan, a new training sample, every vector re-encoded. Chosen when there is no
  build yet, on ``rebuild=True``, or when the **rebuild rule** fires:

  - the delta exceeds ``settings.index_rebuild_fraction`` (0.2) of the base build, or
  - the base is an exact Flat index and the total reached the Flat limit, or
  - drift: the delta's mean coarse residual (1 - cosine to the nearest IVF centroid) exceeds the
    base training sample's by more than 25 % (new kinds of images the centroids do not cover), or
  - images of the base build lost their features (removed or re-keyed), or the dimension changed.

A build is written into ``artifacts/index/<build_id>/`` (the job run id), the manifest last, then
published by one commit to ``index_builds``. A crash at any point before that commit leaves the
published build as it was; the unfinished folder is removed by the next build's prune. Builds of
one lake are serialised by the lake's ``index`` lock (a second run exits with code 3).

On an object-store lake (``s3://`` ...) the driver builds in a local temporary folder and places
each finished file into ``artifacts/index/<build_id>/`` in the store, encode tasks read their rows
of the placed vectors with ranged reads and upload their shards, and the manifest goes in last
(:mod:`jobs.index.place`); servers fetch verified copies into their artifact cache.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from functools import partial
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from jobs.index.build import (FORMAT, Manifest, build_key, builds_root, faiss_version, file_sha256,
                              read_manifest, read_manifest_from_store)
from jobs.index.place import BuildPlace, prune_store
from jobs.index.partition import SHARD_ROWS_SCHEMA, SHARD_STATS_SCHEMA, encode_partition
from jobs.index.plan import FLAT_BELOW, MAX_TRAIN, IndexPlan, choose_plan
from jobs.runner import Runner, SparkRunner, make_runner, partition_bounds
from jobs.runs import job_run
from lake.catalog import TABLES, Lake
from lake.commit import commit_rows, ensure_tables, now_utc, open_table
from lake.errors import BadInput, NotFound
from lake.lock import LakeLock
from lake.remote import delta_options
from lake.settings import Settings
from lake.vectors import default_model_key, features_key, list_to_matrix

__all__ = ["run_index", "resolve_model_key", "published_builds", "latest_build", "DRIFT_RATIO", "KEEP_BUILDS"]

log = logging.getLogger("imagelake.jobs.index")

DRIFT_RATIO = 1.25
KEEP_BUILDS = 3
_READ_BATCH = 8192


def _ensure_builds_table(lake: Lake) -> None:
    """Lakes made before ``index_builds`` gained its columns have it empty with the old schema:
    re-create it (it has no rows, so nothing is lost); a non-empty one with another schema is an error."""
    from deltalake import DeltaTable

    spec = TABLES["index_builds"]
    table = open_table(lake, "index_builds")
    if table.schema().to_arrow().names == spec.schema.names:
        return
    if table.file_uris():
        raise BadInput("the lake's index_builds table has an older schema and rows; migrate it before indexing")
    DeltaTable.create(lake.table_uri("index_builds"), spec.schema, mode="overwrite", name="index_builds",
                      description=spec.description, storage_options=delta_options(lake))


def resolve_model_key(lake: Lake, model: str | None) -> str:
    """The features key to index: a stored key (``name@version[+bf16]``) as is; for a registry
    name, its current version's stored key with the most rows (fp32 or reduced precision, see
    :func:`lake.vectors.features_key`); by default the key with most rows."""
    if not model:
        return default_model_key(lake)
    if "@" in model:
        return model
    from jobs.embed.models import get_model

    key = get_model(model).key
    return features_key(lake, key) or key


def published_builds(lake: Lake, model_key: str | None = None) -> list[dict]:
    """Published ``index_builds`` rows, newest first (optionally of one model)."""
    table = open_table(lake, "index_builds")
    if not table.file_uris():
        return []
    rows = [r for r in table.to_pyarrow_table().to_pylist()
            if r["state"] == "published" and (model_key is None or r["model"] == model_key)]
    return sorted(rows, key=lambda r: (r["created_at"], r["build_id"]), reverse=True)


def latest_build(lake: Lake, model_key: str | None = None) -> dict | None:
    rows = published_builds(lake, model_key)
    return rows[0] if rows else None


# -- reading the features ----------------------------------------------------------------------

def _connect(lake: Lake) -> tuple[duckdb.DuckDBPyConnection, int]:
    features, images = open_table(lake, "features"), open_table(lake, "images")
    con = duckdb.connect(config={"threads": 2})
    con.register("features", features.to_pyarrow_dataset())
    con.register("images", images.to_pyarrow_dataset())
    return con, features.version()


def _catalog(con: duckdb.DuckDBPyConnection, model_key: str) -> tuple[np.ndarray, list[str]]:
    """(seqs ascending, image ids) of every image with features of ``model_key``."""
    table = con.sql("SELECT i.seq, f.image_id FROM features f JOIN images i USING (image_id) "
                    "WHERE f.model = ? ORDER BY i.seq", params=[model_key]).to_arrow_table()
    return table.column("seq").to_numpy().astype(np.int64), table.column("image_id").to_pylist()


def _write_segment(con: duckdb.DuckDBPyConnection, folder: str, model_key: str, seqs: np.ndarray,
                   image_ids: list[str]) -> int:
    """Write ``seqs.npy``, ``ids.npy`` and the float16 normalised ``vectors.npy``; return d.

    Embeddings are streamed in batches and placed by seq, so memory stays at one batch plus the
    page cache whatever n is; nothing sorts the embeddings themselves.
    """
    np.save(os.path.join(folder, "seqs.npy"), seqs)
    ids = np.frombuffer(bytes.fromhex("".join(image_ids)), dtype=np.uint8).reshape(len(image_ids), 32)
    np.save(os.path.join(folder, "ids.npy"), ids)
    con.register("wanted", pa.table({"seq": pa.array(seqs)}))
    reader = con.sql("SELECT i.seq, f.embedding FROM features f JOIN images i USING (image_id) "
                     "WHERE f.model = ? AND i.seq IN (SELECT seq FROM wanted)",
                     params=[model_key]).to_arrow_reader(_READ_BATCH)
    vectors = None
    filled = 0
    for batch in reader:
        if batch.num_rows == 0:
            continue
        x = list_to_matrix(batch.column(1))
        if vectors is None:
            vectors = np.lib.format.open_memmap(os.path.join(folder, "vectors.npy"), mode="w+",
                                                dtype=np.float16, shape=(len(seqs), x.shape[1]))
        elif x.shape[1] != vectors.shape[1]:
            raise BadInput(f"features of {model_key} have different lengths ({x.shape[1]} and {vectors.shape[1]})")
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        rows = np.searchsorted(seqs, batch.column(0).to_numpy())
        order = np.argsort(rows)
        vectors[rows[order]] = x[order].astype(np.float16)
        filled += batch.num_rows
    con.unregister("wanted")
    if vectors is None or filled != len(seqs):
        raise BadInput(f"features of {model_key} changed while the index was being built; run it again")
    vectors.flush()
    d = int(vectors.shape[1])
    del vectors
    return d


# -- training and encoding ---------------------------------------------------------------------

def _sample(vectors: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    if n >= len(vectors):
        return np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), n, replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def _coarse_residual(index, x: np.ndarray) -> float | None:
    """Mean (1 - inner product with the nearest IVF centroid): how well the centroids cover ``x``."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or len(x) == 0:
        return None
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = index.chain.at(i).apply(x)
    dist, _ = ivf.quantizer.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return float(np.mean(1.0 - dist[:, 0]))


def _train(folder: str, plan: IndexPlan, threads: int) -> tuple[str, float | None]:
    """Train ``plan.factory`` on a sample of ``vectors.npy``; write ``trained.faiss``."""
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    index = faiss.index_factory(plan.d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    vectors = np.load(os.path.join(folder, "vectors.npy"), mmap_mode="r")
    residual = None
    if not index.is_trained:
        sample = _sample(vectors, plan.train_n)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.cp.niter = 10                    # coarse k-means: 10 iterations are plenty here
            ivf.cp.max_points_per_centroid = 64   # >= 39 FAISS asks for; halves the k-means cost
            ivfpq = faiss.downcast_index(ivf)
            if isinstance(ivfpq, faiss.IndexIVFPQ):
                ivfpq.pq.cp.niter = 15
                ivfpq.do_polysemous_training = False  # unused at search time, and slow to train
        if isinstance(index, faiss.IndexPreTransform) and plan.opq:
            opq = faiss.downcast_VectorTransform(index.chain.at(0))
            opq.max_train_points = 32_768
        from jobs.index import cputrain, gpu  # FAISS on the GPU when present (the gpu extra)
        index = gpu.train(index, sample) if gpu.gpu_count() else cputrain.train(index, sample, threads)
        residual = _coarse_residual(index, sample[: min(len(sample), 20_000)])
    path = os.path.join(folder, "trained.faiss")
    faiss.write_index(index, path)
    return path, residual


def _task_threads(runner: Runner) -> int:
    if isinstance(runner, SparkRunner):
        return max(1, int(runner.spark.conf.get("spark.task.cpus", "1")))
    return max(1, os.cpu_count() or 1)


def _encode(runner: Runner, place: BuildPlace, trained_path: str, n: int, shard_size: int, d: int,
            trained_key: str | None = None) -> list[dict]:
    shards = max(1, math.ceil(n / shard_size))
    bounds = partition_bounds(n, shards)
    rows = pa.table({"shard": pa.array(range(shards), pa.int32()),
                     "start": pa.array([b[0] for b in bounds], pa.int64()),
                     "end": pa.array([b[1] for b in bounds], pa.int64())}, schema=SHARD_ROWS_SCHEMA)
    job = place.encode_job(trained_path, file_sha256(trained_path), _task_threads(runner), d=d,
                           trained_key=trained_key)
    stats = runner.map_partitions(partial(encode_partition, job=job), rows, shards, SHARD_STATS_SCHEMA,
                                  desc="index shards")
    out = sorted(stats.to_pylist(), key=lambda r: r["shard"])
    if [r["shard"] for r in out] != list(range(shards)) or sum(r["ntotal"] for r in out) != n:
        raise RuntimeError(f"index shards came back incomplete: {[(r['shard'], r['ntotal']) for r in out]}")
    return out


# -- the job -----------------------------------------------------------------------------------

def run_index(lake: Lake, settings: Settings, model: str | None = None, *, rebuild: bool = False,
              memory_budget_mb: int | None = None, shard_size: int | None = None, flat_below: int = FLAT_BELOW,
              max_train: int = MAX_TRAIN, opq: bool = False, factory: str | None = None,
              runner: Runner | None = None, progress: bool = False) -> dict[str, Any]:
    """Bring the model's published index up to date with its ``features`` (see the module docstring).

    Args:
        model: a registry name or a stored ``name@version`` key; default the most common key.
        rebuild: always make a full build (retrain).
        memory_budget_mb: resident budget of the PQ codes (default ``settings.index_memory_mb``).
        shard_size: vectors per shard (default ``settings.index_shard_size``).
        flat_below, max_train, opq, factory: see :func:`jobs.index.plan.choose_plan`.
        runner: where shards are encoded (Spark by default, LocalRunner in tests).
    Returns:
        ``action`` (``full``, ``incremental`` or ``up_to_date``), ``build_id``, ``run_id``, ``model``,
        ``factory``, ``ntotal``, ``delta``, ``shards``, ``reason``, ``seconds`` and timings.
    Raises:
        NotFound: no features for the model. BadInput: a bad option or budget. LockHeld: another
        index build of this lake is running.
    """
    budget = (settings.index_memory_mb if memory_budget_mb is None else memory_budget_mb) * 2**20
    shard_size = shard_size or settings.index_shard_size
    if shard_size <= 0 or budget <= 0 or not 0 < max_train <= 256_000:
        raise BadInput("shard_size and the memory budget must be positive, max_train in 1..256000")
    ensure_tables(lake, ["images", "features", "index_builds", "job_runs"])
    _ensure_builds_table(lake)
    if lake.is_local:
        os.makedirs(builds_root(lake), exist_ok=True)
    with LakeLock(lake, "index", timeout=0, holder="index"):
        model_key = resolve_model_key(lake, model)
        args = dict(model=model_key, rebuild=rebuild, memory_budget_mb=budget // 2**20, shard_size=shard_size,
                    opq=opq, factory=factory)
        owns = runner is None
        runner = runner or make_runner(settings, progress=progress)
        try:
            with job_run(lake, "index", args, settings=settings) as run:
                summary = _run(lake, settings, model_key, run, rebuild=rebuild, budget=budget,
                               shard_size=shard_size, flat_below=flat_below, max_train=max_train, opq=opq,
                               factory=factory, runner=runner)
                run.rows_out = summary.get("ntotal", 0)
                run.metrics.update({k: v for k, v in summary.items() if k not in ("run_id", "model")})
            summary["seconds"] = run.metrics["seconds"]
        finally:
            if owns:
                runner.close()
        if summary["action"] != "up_to_date":
            _prune(lake)
        return summary


def _run(lake, settings, model_key, run, *, rebuild, budget, shard_size, flat_below, max_train, opq, factory,
         runner) -> dict[str, Any]:
    con, features_version = _connect(lake)
    try:
        seqs, image_ids = _catalog(con, model_key)
        run.rows_in = len(seqs)
        if len(seqs) == 0:
            raise NotFound(f"no features for model {model_key}; run `imagelake embed` first")
        base_summary = dict(run_id=run.run_id, model=model_key, features_version=features_version)
        current = latest_build(lake, model_key)
        reason = "requested (--rebuild)" if rebuild else "no build yet"
        if current is not None and not rebuild:
            base_row = current if current["kind"] == "full" else _row(lake, current["base_build_id"])
            base, base_seqs = _base_manifest(lake, base_row)
            delta = np.setdiff1d(seqs, base_seqs, assume_unique=True)
            reason = _rebuild_reason(settings, base, base_seqs, seqs, delta, flat_below)
            if reason is None:
                published_delta = current["ntotal"] - base["ntotal"] if current["kind"] != "full" else 0
                if len(delta) == published_delta:
                    return dict(base_summary, action="up_to_date", build_id=current["build_id"],
                                factory=current["factory"], ntotal=int(current["ntotal"]), delta=int(published_delta),
                                reason="every embedded image is indexed")
                keep = np.isin(seqs, delta, assume_unique=True)
                result = _delta_build(lake, con, run, model_key, base_row, base, seqs[keep],
                                      [i for i, k in zip(image_ids, keep) if k], features_version, shard_size,
                                      runner)
                if isinstance(result, dict):
                    return dict(base_summary, **result)
                reason = result
        result = _full_build(lake, con, run, model_key, seqs, image_ids, features_version, budget, shard_size,
                             flat_below, max_train, opq, factory, runner)
        return dict(base_summary, reason=reason, **result)
    finally:
        con.close()


def _row(lake: Lake, build_id: str) -> dict:
    for row in published_builds(lake):
        if row["build_id"] == build_id:
            return row
    raise NotFound(f"index build {build_id} is not published")


def _rebuild_reason(settings: Settings, base: Manifest, base_seqs: np.ndarray, seqs: np.ndarray,
                    delta: np.ndarray, flat_below: int) -> str | None:
    if len(np.setdiff1d(base_seqs, seqs, assume_unique=True)):
        return "images of the base build no longer have features"
    if len(delta) > settings.index_rebuild_fraction * len(base_seqs):
        return (f"{len(delta)} new vectors exceed index_rebuild_fraction={settings.index_rebuild_fraction} "
                f"of the base build's {len(base_seqs)}")
    if base["plan"]["kind"] == "flat" and len(seqs) >= flat_below:
        return f"the collection outgrew the exact Flat index ({len(seqs)} >= {flat_below})"
    return None


def _base_manifest(lake: Lake, base_row: dict) -> tuple[Manifest, np.ndarray]:
    """The base build's manifest and its seqs (from the store on an object-store lake)."""
    if lake.is_local:
        base = read_manifest(os.path.join(lake.artifacts_dir(), base_row["path"]))
        return base, np.load(base.path("seqs.npy"))
    import io

    from lake.store import LakeStore

    store = LakeStore.for_lake(lake)
    base = read_manifest_from_store(store, f"artifacts/{base_row['path']}")
    return base, np.load(io.BytesIO(store.read_bytes(f"artifacts/{base_row['path']}/seqs.npy")), allow_pickle=False)


def _manifest_common(model_key: str, d: int, features_version: int, build_id: str) -> dict[str, Any]:
    return dict(format=FORMAT, build_id=build_id, model=model_key, d=d, faiss_version=faiss_version(),
                source_table="features", source_version=features_version, metric="inner_product",
                normalized=True, created_at=now_utc().isoformat())


def _full_build(lake, con, run, model_key, seqs, image_ids, features_version, budget, shard_size, flat_below,
                max_train, opq, factory, runner) -> dict[str, Any]:
    import time

    place = BuildPlace(lake, run.run_id)
    try:
        t0 = time.perf_counter()
        d = _write_segment(con, place.folder, model_key, seqs, image_ids)
        t1 = time.perf_counter()
        plan = choose_plan(len(seqs), d, budget, flat_below=flat_below, max_train=max_train, opq=opq,
                           factory=factory)
        trained_path, residual = _train(place.folder, plan, os.cpu_count() or 1)   # on the driver
        place.place("seqs.npy", "ids.npy", "vectors.npy", "trained.faiss")
        t2 = time.perf_counter()
        shards = _encode(runner, place, trained_path, len(seqs), shard_size, d)
        t3 = time.perf_counter()
        files = {n: {} for n in ("seqs.npy", "ids.npy", "vectors.npy", "trained.faiss")}
        files.update({s["file"]: {} for s in shards})
        manifest = place.write_manifest(dict(
            _manifest_common(model_key, d, features_version, run.run_id), kind="full", base_build_id=None,
            factory=plan.factory, plan=plan.to_dict(), ntotal=len(seqs), files=files,
            shards=[{k: s[k] for k in ("file", "ntotal", "seq_min", "seq_max")} for s in shards],
            drift={"coarse_residual": residual}), shards)
    except BaseException:
        place.discard()
        raise
    finally:
        place.close()
    _publish(lake, run.run_id, manifest, "full", None, len(seqs), [manifest])
    return dict(action="full", build_id=run.run_id, factory=plan.factory, plan=plan.to_dict(), ntotal=len(seqs),
                delta=0, shards=len(shards), read_s=round(t1 - t0, 2), train_s=round(t2 - t1, 2),
                encode_s=round(t3 - t2, 2), bytes_per_vector=plan.bytes_per_vector)


def _delta_build(lake, con, run, model_key, base_row, base: Manifest, seqs, image_ids, features_version,
                 shard_size, runner) -> dict[str, Any] | str:
    """Encode the delta with the base's trained index and publish base + delta; or, when the
    rebuild rule's dimension or drift checks fire, remove the delta folder and return the reason."""
    import faiss

    place = BuildPlace(lake, run.run_id)
    try:
        d = _write_segment(con, place.folder, model_key, seqs, image_ids)
        if d != base["d"]:
            place.discard()
            return f"the embedding dimension changed ({base['d']} -> {d})"
        trained_key = None
        if lake.is_local:
            trained_path = base.path("trained.faiss")
        else:
            trained_key = f"{build_key(base['build_id'])}/trained.faiss"
            trained_path = place.path(".base-trained.faiss")
            place.store.download(trained_key, trained_path)
        trained = faiss.read_index(trained_path)
        base_residual = (base.get("drift") or {}).get("coarse_residual")
        if base_residual:
            vectors = np.load(os.path.join(place.folder, "vectors.npy"), mmap_mode="r")
            residual = _coarse_residual(trained, _sample(vectors, 20_000))
            if residual is not None and residual > DRIFT_RATIO * base_residual:
                place.discard()
                return (f"drift: the new images' coarse residual {residual:.4f} exceeds {DRIFT_RATIO} x the base's "
                        f"{base_residual:.4f}")
        if file_sha256(trained_path) != base["files"]["trained.faiss"]["sha256"]:
            raise BadInput(f"the base build {base['build_id']}'s trained index is corrupt; run `imagelake index --rebuild`")
        place.place("seqs.npy", "ids.npy", "vectors.npy")
        shards = _encode(runner, place, trained_path, len(seqs), shard_size, d, trained_key=trained_key)
        files = {n: {} for n in ("seqs.npy", "ids.npy", "vectors.npy")}
        files.update({s["file"]: {} for s in shards})
        manifest = place.write_manifest(dict(
            _manifest_common(model_key, d, features_version, run.run_id), kind="incremental",
            base_build_id=base["build_id"], base_manifest_sha256=base.sha256, factory=base["factory"],
            plan=base["plan"], ntotal=len(seqs), files=files,
            shards=[{k: s[k] for k in ("file", "ntotal", "seq_min", "seq_max")} for s in shards]), shards)
    except BaseException:
        place.discard()
        raise
    finally:
        place.close()
    total = base["ntotal"] + len(seqs)
    _publish(lake, run.run_id, manifest, "incremental", base_row["build_id"], total, [base, manifest])
    return dict(action="incremental", build_id=run.run_id, base_build_id=base["build_id"], factory=base["factory"],
                ntotal=total, delta=len(seqs), shards=len(shards), reason="new images since the base build")


def _publish(lake: Lake, build_id: str, manifest: Manifest, kind: str, base_build_id: str | None, ntotal: int,
             manifests: list[Manifest]) -> None:
    shards = [{"file": f"index/{m['build_id']}/{s['file']}", "sha256": s["sha256"], "ntotal": s["ntotal"]}
              for m in manifests for s in m["shards"]]
    commit_rows(lake, "index_builds", [dict(
        build_id=build_id, kind=kind, base_build_id=base_build_id, model=manifest["model"],
        factory=manifest["factory"], d=manifest["d"], ntotal=ntotal, faiss_version=manifest["faiss_version"],
        source_version=manifest["source_version"], path=f"index/{manifest['build_id']}", shards=shards,
        manifest_sha256=manifest.sha256, params=json.dumps(manifest["plan"]), state="published",
        run_id=build_id, created_at=now_utc())], run_id=build_id)


def _prune(lake: Lake, keep: int = KEEP_BUILDS) -> list[str]:
    """Remove build folders that are unfinished or older than the ``keep`` newest published builds
    *of their model* (and the bases those need): indexing one model never removes another's builds.
    Call with the ``index`` lock held: nothing else is building."""
    per_model: dict[str, int] = {}
    kept: set[str] = set()
    for row in published_builds(lake):          # newest first
        per_model[row["model"]] = per_model.get(row["model"], 0) + 1
        if per_model[row["model"]] > keep:
            continue
        kept.add(row["build_id"])
        if row["base_build_id"]:
            kept.add(row["base_build_id"])
    removed = []
    if not lake.is_local:
        from lake.store import LakeStore

        removed = prune_store(LakeStore.for_lake(lake), kept)
        if removed:
            log.info("index: pruned %d old or unfinished build folders", len(removed))
        return removed
    root = builds_root(lake)
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name in kept or not os.path.isdir(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    if removed:
        log.info("index: pruned %d old or unfinished build folders", len(removed))
    return removed
