"""The embed job's driver: pick the images still to embed, fan out, commit once.

Incremental: only images of ``images`` without a ``features`` row for the run's features key
(``name@version``, or ``name@version+bf16`` for a reduced-precision run: see
:func:`run_precision`) are selected (an anti-join in DuckDB over the Delta tables). Idempotent: the
commit of ``features`` and ``rejects`` is once per run id and drops keys already present, so a
re-run, a retried task or a crashed-and-restarted run never duplicates a row. Images that failed
to decode are retried by the next run (the file may be readable by then); their ``rejects`` row is
not repeated.
"""

from __future__ import annotations

import logging
import math
import os
import time
from functools import partial
from typing import Any, Callable, Literal

import duckdb
import pyarrow as pa

from jobs.embed.artifact import ensure_onnx
from jobs.embed.models import PRECISIONS, get_model
from jobs.embed.partition import STATS_SCHEMA, EmbedJob, embed_partition
from jobs.embed.runtime import reduced_precision, resolve_device
from jobs.runner import INPUT_BATCH_ROWS, Runner, SparkRunner, StagedInput, default_parallelism, make_runner, stage_input
from jobs.runs import job_run
from lake.catalog import TABLES, Lake
from lake.commit import commit_staged, ensure_tables, open_table
from lake.errors import BadInput
from lake.lock import LakeLock
from lake.settings import Settings
from lake.staging import remove_staging

__all__ = ["run_embed", "run_precision", "select_pending", "stage_pending"]

log = logging.getLogger("imagelake.jobs.embed")

_PENDING_COLUMNS = ["image_id", "uri", "collection", "bytes", "mtime"]


_PENDING_SCHEMA = pa.schema([TABLES["images"].schema.field(c) for c in _PENDING_COLUMNS])


def _pending_sql(con: duckdb.DuckDBPyConnection, lake: Lake) -> str | None:
    """The pending-images query over registered ``images``/``features`` (None: no image at all)."""
    images = open_table(lake, "images")
    features = open_table(lake, "features")
    cols = ", ".join(f"i.{c}" for c in _PENDING_COLUMNS)
    if not images.file_uris():
        return None
    con.register("images", images.to_pyarrow_dataset())
    if features.file_uris():
        con.register("features", features.to_pyarrow_dataset())
        return (f"SELECT {cols} FROM images i WHERE NOT EXISTS (SELECT 1 FROM features f "
                f"WHERE f.model = $model AND f.image_id = i.image_id) ORDER BY i.seq")
    return f"SELECT {cols} FROM images i WHERE $model IS NOT NULL ORDER BY i.seq"


def select_pending(lake: Lake, model_key: str) -> pa.Table:
    """Rows of ``images`` (image_id, uri, collection, bytes, mtime) with no ``features`` row for
    ``model_key``, in ``seq`` order (so partitions are the same slices on a retry). In memory;
    :func:`stage_pending` streams the same rows into the lake instead."""
    con = duckdb.connect()
    try:
        con.execute("SET threads=2")
        sql = _pending_sql(con, lake)
        if sql is None:
            return _PENDING_SCHEMA.empty_table()
        return con.sql(sql, params={"model": model_key}).to_arrow_table().cast(_PENDING_SCHEMA)
    finally:
        con.close()


def stage_pending(lake: Lake, model_key: str, staging_dir: str, partition_rows: int,
                  min_partitions: int | Callable[[], int] = 1) -> StagedInput:
    """:func:`select_pending`'s rows, streamed in bounded batches into the run's staging folder as
    the embed tasks' input: ``ceil(n / partition_rows)`` partitions rounded up to a multiple of
    ``min_partitions`` (the task slots, so the last round of tasks keeps every slot busy), one
    Parquet file each (``min_partitions`` may be a function, called only when something is pending).
    The driver never holds the pending rows."""
    con = duckdb.connect()
    try:
        con.execute("SET threads=2")
        sql = _pending_sql(con, lake)
        if sql is None:
            return StagedInput((None,), _PENDING_SCHEMA, 0)
        params = {"model": model_key}
        n = con.sql(f"SELECT count(*) FROM ({sql})", params=params).fetchall()[0][0]
        if not n:
            return StagedInput((None,), _PENDING_SCHEMA, 0)
        least = max(1, min_partitions() if callable(min_partitions) else min_partitions)
        # a multiple of the task slots: 5 tasks on 2 slots leave one slot idle for the last fifth
        parts = min(n, least * math.ceil(math.ceil(n / partition_rows) / least))
        reader = con.sql(sql, params=params).to_arrow_reader(INPUT_BATCH_ROWS)
        return stage_input(staging_dir, "embed", reader, n, parts, _PENDING_SCHEMA)
    finally:
        con.close()


def run_precision(device: str, engine: str | None, runner: Runner, precision: str = "auto") -> str:
    """The one precision every task of the run computes in (and the features key says).

    ``auto``: fp32 on CPU (and with the ONNX engine); on CUDA the GPU's reduced precision (bf16,
    else fp16). Device ``auto`` is decided here only where the tasks run on this machine (the
    in-process runner, or a ``local[...]`` master): on a cluster executors may or may not have a
    GPU, so ``auto`` means fp32 there and GPU executors compute in fp32 too (``--device cuda``, or
    ``--precision bf16``, asks for reduced precision everywhere).

    Raises:
        BadInput: an unknown precision, or a reduced one with the ONNX engine (fp32 only).
    """
    if precision != "auto":
        if precision not in PRECISIONS:
            raise BadInput(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision != "fp32" and engine == "onnx":
            raise BadInput(f"the ONNX engine computes in fp32; {precision} needs the torch engine")
        return precision
    if engine == "onnx" or device == "cpu":
        return "fp32"
    if device == "cuda":
        return reduced_precision()
    on_this_machine = not isinstance(runner, SparkRunner) or runner.master.startswith("local")
    return reduced_precision() if on_this_machine and resolve_device("auto") == "cuda" else "fp32"


def _task_threads(runner: Runner) -> int:
    """The cores one task owns: ``spark.task.cpus`` under Spark, all of them in process."""
    if isinstance(runner, SparkRunner):
        return max(1, int(runner.spark.conf.get("spark.task.cpus", "1")))
    return max(1, os.cpu_count() or 1)


def run_embed(lake: Lake, settings: Settings, model: str = "efficientnet-lite0",
              device: Literal["auto", "cpu", "cuda"] = "auto", runner: Runner | None = None,
              progress: bool = False, *, batch_size: int | None = None, partition_rows: int = 2048,
              engine: Literal["onnx", "torch"] | None = None, precision: str = "auto",
              runtime: str = "auto") -> dict[str, Any]:
    """Embed every image that has no features for ``model``'s current version.

    Args:
        lake: the lake (``images`` is read; ``features``, ``rejects``, ``job_runs`` are written).
        settings: ``runner`` picks Spark or in-process when ``runner`` is None; ``max_image_pixels``
            guards decoding.
        model: a registered model name (:data:`jobs.embed.models.MODELS`).
        device: ``auto`` (CUDA where the executor sees a GPU, else CPU), ``cpu`` or ``cuda``.
        runner: an existing runner to reuse (its Spark session is left running); else one is made
            from ``settings`` and closed at the end.
        progress: show a progress bar on stderr.
        batch_size: images per model call; default 64 on CPU, 256 on CUDA.
        partition_rows: most images per task (Spark gets at least one task per core).
        engine: force ``onnx`` or ``torch``; default ONNX Runtime on CPU, torch on CUDA.
        precision: ``auto`` (see :func:`run_precision`), ``fp32``, ``bf16`` or ``fp16``: what every
            task computes in; reduced precision is stored under ``name@version+bf16`` (``+fp16``).
        runtime: a CPU catalog runtime (``ort-fp32``, ``ort-int8``, ``openvino-bf16``, ...) or
            ``auto``: on CPU on this machine, with no engine or precision forced, the fastest that
            passes the quality gate (:func:`jobs.embed.choose.choose_runtime`, cached per machine).
    Returns:
        ``run_id``, ``model`` (the stored features key), ``precision``, ``pending`` (images selected), ``embedded``
        (feature rows committed), ``rejected`` (images that failed now), ``rejects_committed``
        (new rejects rows), ``features_version``, ``runtimes``, ``seconds``, ``images_per_s``, and
        ``decode_ms_per_image`` / ``model_ms_per_image`` / ``write_ms_per_image`` (task time per
        image: waiting for decoded images, in the model, building and writing the staged rows),
        ``model_load_s`` (summed over tasks; 0 for a task whose worker had the model loaded),
        ``tasks_s`` (summed task time), ``map_s`` (wall time of all tasks) and ``slots`` (tasks
        that run at once): ``tasks_s / (slots * map_s)`` is how busy the task slots were.
    Raises:
        NotFound: unknown model. BadInput: bad device, or ``cuda`` without a GPU on the driver.
    """
    spec = get_model(model)
    if device == "cuda":
        resolve_device(device)
    elif device not in ("auto", "cpu"):
        raise BadInput(f"device must be auto, cpu or cuda, got {device!r}")
    if engine not in (None, "onnx", "torch"):
        raise BadInput(f"engine must be onnx or torch, got {engine!r}")
    if engine == "onnx" and device == "cuda":
        raise BadInput("the ONNX engine runs on CPU here; use --device cpu, or the torch engine on CUDA")
    if partition_rows <= 0:
        raise BadInput(f"partition_rows must be positive, got {partition_rows!r}")
    from jobs.embed.choose import check_runtime_name
    check_runtime_name(runtime)
    lake.ensure()
    ensure_tables(lake, ["images", "features", "rejects", "job_runs"])
    owns_runner = runner is None
    runner = runner or make_runner(settings, progress=progress)
    try:
        choice = _choose(lake, spec, device, engine, precision, runner, runtime, settings)
        precision = choice.precision if choice else run_precision(device, engine, runner, precision)
        key = choice.key if choice else spec.key_for(precision)
        args = dict(model=key, device=device, engine=engine, precision=precision, batch_size=batch_size,
                    **({"runtime": choice.name} if choice else {}))
        with job_run(lake, "embed", args, settings=settings) as run:
            def min_parts() -> int:  # Spark gets at least one task per core (asked only when needed)
                if isinstance(runner, SparkRunner):
                    return default_parallelism(settings) // _task_threads(runner)
                return 1
            pending = stage_pending(lake, key, lake.staging_dir(run.run_id), partition_rows, min_parts)
            run.rows_in = pending.num_rows
            summary: dict[str, Any] = dict(run_id=run.run_id, model=key, precision=precision,
                                           pending=pending.num_rows, embedded=0, rejected=0,
                                           rejects_committed=0, runtimes=[])
            if pending.num_rows:
                summary.update(_embed(lake, settings, spec, device, engine, precision, runner, pending,
                                      run.run_id, batch_size, choice))
            remove_staging(lake.staging_dir(run.run_id))
            if choice:
                summary.update(choice.summary())
            run.rows_out = summary["embedded"]
            run.metrics.update({k: v for k, v in summary.items() if k not in ("run_id", "model", "precision")})
        summary["seconds"] = run.metrics["seconds"]
        summary["images_per_s"] = round(pending.num_rows / summary["seconds"], 2) if summary["seconds"] else None
        return summary
    finally:
        if owns_runner:
            runner.close()


def _choose(lake, spec, device, engine, precision, runner, runtime, settings):
    """The catalog runtime of this run, or None for the engine/precision path (CUDA, a forced engine
    or precision, or ``auto`` on a cluster, whose executors this driver cannot measure)."""
    from jobs.embed.choose import choose_runtime

    if runtime != "auto":
        if device == "cuda" or engine is not None or precision != "auto":
            raise BadInput("--runtime names a CPU runtime; leave --device/--engine/--precision at auto with it")
        return choose_runtime(lake, spec, runtime, _task_threads(runner), max_pixels=settings.max_image_pixels)
    on_this_machine = not isinstance(runner, SparkRunner) or runner.master.startswith("local")
    if engine is not None or precision != "auto" or not on_this_machine or resolve_device(device) != "cpu":
        return None
    return choose_runtime(lake, spec, "auto", _task_threads(runner), max_pixels=settings.max_image_pixels)


def _embed(lake, settings, spec, device, engine, precision, runner, pending: StagedInput, run_id, batch_size,
           choice=None):
    on_gpu = engine != "onnx" and not choice and resolve_device(device) == "cuda"  # as the driver sees it
    artifact = choice.artifact if choice else None
    if not choice and engine != "torch" and device != "cuda" and precision == "fp32":
        # With auto, executors without a GPU fall back to ONNX: have the export ready for them.
        with LakeLock(lake, f"export-{spec.name}", timeout=600, holder=f"embed {run_id}"):
            artifact = ensure_onnx(lake.artifacts_dir(), spec)
    threads = _task_threads(runner)
    slots = default_parallelism(settings) // threads if isinstance(runner, SparkRunner) else 1
    job = EmbedJob(spec=spec, run_id=run_id, staging_dir=lake.staging_dir(run_id), device=device,
                   engine=engine, artifact=artifact, batch_size=batch_size or (256 if on_gpu else 64),
                   threads=threads, decode_threads=min(8, threads) if on_gpu else (1 if threads > 1 else 0),
                   max_pixels=settings.max_image_pixels, precision=precision,
                   runtime=choice.name if choice else None, key_engine=choice.key_engine if choice else None)
    t0 = time.perf_counter()
    stats = runner.map_partitions(partial(embed_partition, job=job), pending, pending.num_partitions,
                                  STATS_SCHEMA, desc=f"embed {job.model_key}")
    map_s = time.perf_counter() - t0
    s = stats.to_pydict()
    feats = commit_staged(lake, "features", [f for f in s["features_file"] if f], run_id=run_id, dedupe=True)
    rejs = commit_staged(lake, "rejects", [f for f in s["rejects_file"] if f], run_id=run_id, dedupe=True)
    n_in = sum(s["n_in"])
    if n_in != pending.num_rows:
        log.warning("embed %s: %d images selected but tasks saw %d", run_id, pending.num_rows, n_in)
    per_image = 1000 / max(1, n_in)
    return dict(embedded=feats.rows, rejected=sum(s["n_rejected"]), rejects_committed=rejs.rows,
                features_version=feats.version, runtimes=sorted(set(s["runtime"])), partitions=len(s["n_in"]),
                decode_ms_per_image=round(per_image * sum(s["decode_s"]), 3),
                model_ms_per_image=round(per_image * sum(s["model_s"]), 3),
                write_ms_per_image=round(per_image * sum(s["write_s"]), 3),
                model_load_s=round(sum(s["load_s"]), 3), tasks_s=round(sum(s["task_s"]), 3),
                map_s=round(map_s, 3), slots=slots)
