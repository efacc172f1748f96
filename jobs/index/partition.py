"""The shard-encoding partition function: one input row per shard, one shard file out.

Each row names a contiguous range ``[start, end)`` of the build folder's ``vectors.npy`` /
``seqs.npy`` (rows sorted by seq, so a shard is a range of seq). The task loads the trained empty
index, checks its sha256 first, memory-maps the float16 vectors, adds them chunk by chunk with
their seqs as FAISS ids, and writes ``shard-NNNNN.faiss`` to a temporary name, then renames it:
a retried or speculative attempt overwrites the same name, and a killed one leaves only a temp
file. Runs in Spark workers (which fork): no deltalake here.

Where FAISS sees a GPU (``faiss-gpu``, the ``gpu`` extra; :func:`jobs.index.gpu.gpu_count`) a shard
is encoded on it (:func:`jobs.index.gpu.encode`: one clone of the trained index on the task's GPU,
the chunks streamed in, the filled index copied back); when that fails (a factory the GPU lacks,
out of GPU memory) the shard is encoded on the CPU from a fresh copy of the trained index, so the
file is the same either way. The stats row says where (``device``). **The GPU branch has not run on
a GPU**: the tests drive it on the CPU with a stand-in for the GPU clone.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from jobs.index import cputrain, gpu
from jobs.index.build import file_sha256
from jobs.runner import PartitionContext
from lake.errors import CorruptArtifact

__all__ = ["EncodeJob", "encode_partition", "SHARD_ROWS_SCHEMA", "SHARD_STATS_SCHEMA", "shard_file"]

SHARD_ROWS_SCHEMA = pa.schema([pa.field("shard", pa.int32()), pa.field("start", pa.int64()),
                               pa.field("end", pa.int64())])
SHARD_STATS_SCHEMA = pa.schema([
    pa.field("shard", pa.int32()), pa.field("file", pa.string()), pa.field("ntotal", pa.int64()),
    pa.field("seq_min", pa.int64()), pa.field("seq_max", pa.int64()), pa.field("bytes", pa.int64()),
    pa.field("seconds", pa.float64()), pa.field("sha256", pa.string()), pa.field("device", pa.string()),
])
log = logging.getLogger("imagelake.jobs.index")
_CHUNK = 32_768


def shard_file(shard: int) -> str:
    return f"shard-{shard:05d}.faiss"


@dataclass(frozen=True)
class EncodeJob:
    """What every task needs (picklable): the folder with the vectors, and the trained index.

    Attributes:
        folder: the build folder holding ``vectors.npy``/``seqs.npy`` and receiving the shards.
        trained_path / trained_sha256: the trained empty index and the sha256 it must have.
        threads: FAISS (OpenMP) threads per task (the cores a task owns).
    """

    folder: str
    trained_path: str
    trained_sha256: str
    threads: int = 1
    # object-store lakes: where the task reads and writes (keys relative to the lake root)
    lake_root: str | None = None
    prefix: str | None = None          # the build folder's key, receives the shards
    trained_key: str | None = None
    d: int = 0
    vectors_offset: int = 0            # bytes before the data of vectors.npy / seqs.npy (npy headers)
    seqs_offset: int = 0


def _fill(read_index, chunks, threads: int):
    """The trained index (``read_index()``) filled with every ``(vectors, ids)`` of ``chunks()``,
    on the GPU when FAISS sees one (CPU fallback), else with :func:`cputrain.add_with_ids`.
    Returns ``(index, device)``, device ``cuda:N`` or ``cpu``."""
    if gpu.gpu_count() > 0:
        device = gpu.task_gpu()
        try:
            return gpu.encode(read_index(), chunks(), device), f"cuda:{device}"
        except (RuntimeError, AttributeError, MemoryError) as e:
            log.warning("index shard: GPU encoding failed (%s); encoding on the CPU", e)
    index = read_index()
    for vectors, ids in chunks():
        cputrain.add_with_ids(index, vectors, ids, threads)
    return index, "cpu"


def _encode_one(job: EncodeJob, shard: int, start: int, end: int) -> dict:
    if job.lake_root:
        return _encode_remote(job, shard, start, end)
    import faiss

    t0 = time.perf_counter()
    if file_sha256(job.trained_path) != job.trained_sha256:
        raise CorruptArtifact(f"trained index {job.trained_path} does not match the sha256 the driver recorded")
    vectors = np.load(os.path.join(job.folder, "vectors.npy"), mmap_mode="r")
    seqs = np.load(os.path.join(job.folder, "seqs.npy"), mmap_mode="r")
    index, device = _fill(lambda: faiss.read_index(job.trained_path),
                          lambda: iter([(vectors[start:end], seqs[start:end])]), job.threads)
    name = shard_file(shard)
    final = os.path.join(job.folder, name)
    tmp = os.path.join(job.folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dict(shard=shard, file=name, ntotal=int(index.ntotal), seq_min=int(seqs[start]) if end > start else -1,
                seq_max=int(seqs[end - 1]) if end > start else -1, bytes=os.path.getsize(final),
                seconds=time.perf_counter() - t0, sha256=file_sha256(final), device=device)


def _encode_remote(job: EncodeJob, shard: int, start: int, end: int) -> dict:
    import hashlib
    import shutil
    import tempfile

    import faiss

    from lake.store import LakeStore

    t0 = time.perf_counter()
    store = LakeStore.for_lake(job.lake_root)
    work = tempfile.mkdtemp(prefix=f"imagelake-shard-{shard}-")
    try:
        trained = store.read_bytes(job.trained_key)
        if hashlib.sha256(trained).hexdigest() != job.trained_sha256:
            raise CorruptArtifact(f"trained index {job.trained_key} does not match the sha256 the driver recorded")
        trained_path = os.path.join(work, "trained.faiss")
        with open(trained_path, "wb") as f:
            f.write(trained)
        seqs = np.frombuffer(store.read_range(f"{job.prefix}/seqs.npy", job.seqs_offset + 8 * start,
                                              job.seqs_offset + 8 * end), dtype="<i8")
        row = 2 * job.d

        def chunks():
            for lo in range(start, end, _CHUNK):
                hi = min(end, lo + _CHUNK)
                raw = store.read_range(f"{job.prefix}/vectors.npy", job.vectors_offset + row * lo,
                                       job.vectors_offset + row * hi)
                yield np.frombuffer(raw, dtype="<f2").reshape(hi - lo, job.d), seqs[lo - start:hi - start]

        index, device = _fill(lambda: faiss.read_index(trained_path), chunks, job.threads)
        name = shard_file(shard)
        local = os.path.join(work, name)
        faiss.write_index(index, local)
        sha, size = file_sha256(local), os.path.getsize(local)
        store.upload(f"{job.prefix}/{name}", local)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dict(shard=shard, file=name, ntotal=int(index.ntotal), seq_min=int(seqs[0]) if end > start else -1,
                seq_max=int(seqs[-1]) if end > start else -1, bytes=size, seconds=time.perf_counter() - t0,
                sha256=sha, device=device)


def encode_partition(batches: Iterator[pa.RecordBatch], ctx: PartitionContext, *, job: EncodeJob) -> Iterator[pa.RecordBatch]:
    """Encode every shard row of this partition; yield one stats row per shard written."""
    out = []
    for batch in batches:
        for row in batch.to_pylist():
            out.append(_encode_one(job, int(row["shard"]), int(row["start"]), int(row["end"])))
    if out:
        yield pa.RecordBatch.from_pylist(out, schema=SHARD_STATS_SCHEMA)
