"""The embed partition function: rows (image_id, uri, ...) in, staged ``features``/``rejects`` out.

Runs in Spark Python workers (which fork), so it must stay picklable and must not import
deltalake. It reads each original by ``uri``, decodes while the model runs the previous batch
(a bounded thread pool; PIL releases the GIL), and writes one staged Parquet file per table, named
by run and partition, through :class:`lake.staging.StagedWriter`. A file that cannot be read or
decoded becomes a ``rejects`` row (stage ``embed``) and the partition goes on.

Stored values: ``embedding`` is the raw global-average-pooled feature vector (float32, not
L2-normalised; consumers normalise for cosine search). ``concept_ids``/``concept_probs`` are the
top-k ImageNet-1k classes of the softmax, probabilities descending (sum <= 1 up to float32 rounding).
"""

from __future__ import annotations

import collections
import datetime as dt
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa

from jobs.embed.artifact import OnnxArtifact
from jobs.embed.decode import ImageRejected, load_image, read_bytes
from jobs.embed.models import ModelSpec
from jobs.embed.runtime import get_runtime, resolve_device
from jobs.runner import PartitionContext
from lake.catalog import TABLES
from lake.staging import StagedWriter

__all__ = ["EmbedJob", "embed_partition", "STATS_SCHEMA", "top_concepts"]

STATS_SCHEMA = pa.schema([
    pa.field("partition", pa.int32()),
    pa.field("n_in", pa.int64()),
    pa.field("n_ok", pa.int64()),
    pa.field("n_rejected", pa.int64()),
    pa.field("features_file", pa.string()),
    pa.field("rejects_file", pa.string()),
    pa.field("runtime", pa.string()),
    pa.field("decode_s", pa.float64()),
    pa.field("model_s", pa.float64()),
    pa.field("load_s", pa.float64()),
    pa.field("write_s", pa.float64()),
    pa.field("task_s", pa.float64()),
    pa.field("started", pa.float64()),
])


@dataclass(frozen=True)
class EmbedJob:
    """Everything a task needs, decided once by the driver (picklable; shipped to executors).

    Attributes:
        device: ``cpu``, ``cuda``, or ``auto`` (resolved in the worker, which may have a GPU the
            driver lacks).
        engine: ``onnx`` or ``torch``; ``None`` picks ONNX Runtime on CPU, torch on CUDA.
        artifact: the verified ONNX export (required for the ONNX engine).
        threads: intra-op threads of the CPU runtime (the cores one task owns).
        decode_threads: decoder threads per task; 0 decodes inline, between model calls.
        precision: what every task computes in (``fp32``, ``bf16``, ``fp16``, ``int8``), decided by
            the driver; the rows are stored under ``spec.key_for(precision, key_engine)``, and a task
            whose runtime would compute in another precision fails instead of mixing it into the key.
        runtime: a CPU catalog runtime (:data:`jobs.embed.runtime.CATALOG`) the driver chose;
            ``artifact`` is then the ONNX file it reads (the fp32 export or the int8 QDQ model).
        key_engine: the engine the features key names (``ort``, ``openvino``; None: torch / fp32).
        gpu_decode: on CUDA, decode JPEGs on the GPU where torchvision can (CPU fallback per image).

    The stats' ``decode_s`` is the time the task waited for decoded images (all of the decoding
    when inline, only what the model did not hide when threaded); ``model_s`` the runtime's time.
    """

    spec: ModelSpec
    run_id: str
    staging_dir: str
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: Literal["onnx", "torch"] | None = None
    artifact: OnnxArtifact | None = None
    batch_size: int = 64
    threads: int = 1
    decode_threads: int = 0
    top_k: int = 50
    max_pixels: int = 100_000_000
    precision: str = "fp32"
    runtime: str | None = None
    key_engine: str | None = None
    gpu_decode: bool = True

    @property
    def model_key(self) -> str:
        return self.spec.key_for(self.precision, self.key_engine)


def top_concepts(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax then the ``k`` most probable classes per row, probabilities descending."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    k = min(k, p.shape[1])
    idx = np.argpartition(-p, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(p, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1).astype(np.int16), np.take_along_axis(vals, order, axis=1).astype(np.float32)


def _list_column(values: np.ndarray, type_: pa.DataType) -> pa.ListArray:
    n, width = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=type_))


def _decoded(rows: Iterator[dict], job: EmbedJob, pool: ThreadPoolExecutor | None):
    """(row, image or ImageRejected) in input order; at most ~2 batches decoding ahead.

    With a pool the first window is submitted here, before the first ``next()``: a task that still
    has to load its model decodes its first two batches meanwhile."""
    size, frac = job.spec.input_size, job.spec.crop_fraction

    def load(row):
        try:
            return row, load_image(row["uri"], size, frac, max_pixels=job.max_pixels)
        except ImageRejected as e:
            return row, e

    if pool is None:
        return (load(row) for row in rows)
    pending: collections.deque = collections.deque()
    window = 2 * job.batch_size
    for row in rows:
        pending.append(pool.submit(load, row))
        if len(pending) >= window:
            break

    def drain():
        for row in rows:
            yield pending.popleft().result()
            pending.append(pool.submit(load, row))
        while pending:
            yield pending.popleft().result()

    return drain()


def _chunks(decoded, batch_size: int):
    chunk = []
    for item in decoded:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _gpu_chunks(rows: Iterator[dict], job: EmbedJob, pool: ThreadPoolExecutor | None, device: str):
    """Batches of (row, uint8 [S, S, 3] tensor on ``device`` or ImageRejected): the files are read
    on the host (threads, one batch ahead), decoded and resized on the GPU
    (:func:`jobs.embed.gpu_decode.decode_batch`, CPU fallback per image). Unverified on a GPU."""
    from jobs.embed.gpu_decode import decode_batch

    def read(row):
        try:
            return row, read_bytes(row["uri"])
        except ImageRejected as e:
            return row, e

    pending: collections.deque = collections.deque()

    def flush(items):
        ok = [(i, data) for i, (_, data) in enumerate(items) if not isinstance(data, ImageRejected)]
        decoded = decode_batch([d for _, d in ok], job.spec.input_size, job.spec.crop_fraction, device,
                               max_pixels=job.max_pixels)
        out = [(row, data) for row, data in items]
        for (i, _), img in zip(ok, decoded):
            out[i] = (items[i][0], img)
        return out

    batch = []
    for row in rows:
        pending.append(pool.submit(read, row) if pool else None)
        if pool is None:
            pending[-1] = read(row)
        if len(pending) >= 2 * job.batch_size:
            item = pending.popleft()
            batch.append(item.result() if pool else item)
            if len(batch) == job.batch_size:
                yield flush(batch)
                batch = []
    while pending:
        item = pending.popleft()
        batch.append(item.result() if pool else item)
        if len(batch) == job.batch_size:
            yield flush(batch)
            batch = []
    if batch:
        yield flush(batch)


def embed_partition(batches: Iterator[pa.RecordBatch], ctx: PartitionContext, *,
                    job: EmbedJob) -> Iterator[pa.RecordBatch]:
    """Embed one partition; yields one stats row (see :data:`STATS_SCHEMA`).

    Input columns: ``image_id``, ``uri`` and optionally ``collection``, ``bytes``, ``mtime`` (copied
    into ``rejects`` rows so they carry the same key as ingest's).
    """
    started, t_task = time.time(), time.perf_counter()
    features = StagedWriter(job.staging_dir, "features", ctx.partition_id, TABLES["features"].schema)
    rejects = StagedWriter(job.staging_dir, "rejects", ctx.partition_id, TABLES["rejects"].schema)
    # A catalog (CPU) runtime always gets one decode thread: the next batch decodes while the model
    # runs (PIL and the runtimes release the GIL), also when the task owns a single core. The first
    # window is submitted before the model loads (a worker's first task loads it), so the two overlap.
    decode_threads = job.decode_threads or (1 if job.runtime else 0)
    pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode") if decode_threads else None
    n_in = 0
    decode_s = model_s = write_s = 0.0
    try:
        rows = (row for b in batches for row in b.to_pylist())
        on_gpu_decode = job.gpu_decode and job.runtime is None and job.engine != "onnx" and \
            resolve_device(job.device) == "cuda"
        stack = np.stack
        if not on_gpu_decode:
            chunks = _chunks(_decoded(rows, job, pool), job.batch_size)
        device = "cpu" if job.engine == "onnx" or job.runtime else resolve_device(job.device)
        runtime = get_runtime(job.spec, device, artifact=job.artifact, threads=job.threads, engine=job.engine,
                              precision=job.precision, runtime=job.runtime)
        load_s = time.perf_counter() - t_task
        if runtime.precision != job.precision:
            raise RuntimeError(f"embed task {ctx.partition_id}: the {runtime.name} runtime computes in "
                               f"{runtime.precision}, the run writes {job.model_key} ({job.precision})")
        if on_gpu_decode:  # decided once the runtime (and the GPU it runs on) is known
            from jobs.embed import gpu_decode
            gpu = str(getattr(runtime, "device", "cpu"))
            if gpu.startswith("cuda") and gpu_decode.gpu_decode_available(gpu):
                chunks, stack = _gpu_chunks(rows, job, pool, gpu), gpu_decode.stack
            else:
                chunks = _chunks(_decoded(rows, job, pool), job.batch_size)
        while True:
            t0 = time.perf_counter()
            chunk = next(chunks, None)
            decode_s += time.perf_counter() - t0
            if chunk is None:
                break
            n_in += len(chunk)
            now = dt.datetime.now(dt.timezone.utc)
            ok = [(row, img) for row, img in chunk if not isinstance(img, ImageRejected)]
            rejects.write([dict(uri=row["uri"], collection=row.get("collection"), bytes=row.get("bytes"),
                                mtime=row.get("mtime"), stage="embed", reason=err.reason, detail=str(err)[:2000],
                                run_id=job.run_id, rejected_at=now)
                           for row, err in chunk if isinstance(err, ImageRejected)])
            if not ok:
                continue
            t0 = time.perf_counter()
            emb, logits = runtime.embed(stack([img for _, img in ok]))
            model_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            ids, probs = top_concepts(logits, job.top_k)
            n = len(ok)
            features.write(pa.table({
                "image_id": pa.array([row["image_id"] for row, _ in ok], pa.string()),
                "model": pa.array([job.model_key] * n, pa.string()),
                "embedding": _list_column(emb.astype(np.float32, copy=False), pa.float32()),
                "concept_ids": _list_column(ids, pa.int16()),
                "concept_probs": _list_column(probs, pa.float32()),
                "run_id": pa.array([job.run_id] * n, pa.string()),
                "created_at": pa.array([now] * n, TABLES["features"].schema.field("created_at").type),
            }))
            write_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        features_file, rejects_file = features.close(), rejects.close()
        write_s += time.perf_counter() - t0
    except BaseException:
        features.abort()
        rejects.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    yield pa.RecordBatch.from_pylist([dict(
        partition=ctx.partition_id, n_in=n_in, n_ok=features.rows, n_rejected=rejects.rows,
        features_file=features_file, rejects_file=rejects_file, runtime=runtime.name,
        decode_s=decode_s, model_s=model_s, load_s=load_s, write_s=write_s,
        task_s=time.perf_counter() - t_task, started=started)], schema=STATS_SCHEMA)
