"""FAISS on the GPU for the index build: train and encode there when this process sees one.

Written for the ``gpu`` extra (``faiss-gpu`` instead of ``faiss-cpu``); **not verified on a GPU**
in this repository's sessions (see README, "GPU"). With ``faiss-cpu`` (no ``get_num_gpus`` or zero
GPUs), or with ``IMAGELAKE_INDEX_GPU=0``, every function here is the plain CPU call, so the build is
the same on every machine. The index written to disk is always a CPU index (``index_gpu_to_cpu``):
searchers and incremental shards never need a GPU.

* :func:`train` clones the untrained index to GPU 0 (float16 lookup tables, so IVF-PQ with 64
  sub-quantizers fits the GPU's shared memory), trains it there and brings it back. When the whole
  index cannot be cloned (a factory string the GPU does not implement, e.g. OPQ chains in some
  versions), it falls back to the part that dominates training time: the coarse k-means of the IVF
  runs on a GPU flat index (``clustering_index``); the rest trains on the CPU.
* :func:`add_with_ids` encodes ``vectors`` on the GPU the same way (clone, add, copy back).

* :func:`encode` is the shard encoder's form of it: chunks of one shard streamed into one GPU
  clone, on the GPU Spark gave the task (``spark.task.resource.gpu.amount``), else GPU 0.

Hooks in the build: ``jobs/index/driver.py`` ``_train`` calls :func:`train` instead of
``index.train``; ``jobs/index/partition.py`` encodes each shard with :func:`encode` when
:func:`gpu_count` is non-zero (and on the CPU, from a fresh copy of the trained index, when the GPU
fails); :func:`add_with_ids` is for the GPU benchmark (``tests/bench/bench_gpu.py``).
"""

from __future__ import annotations

import logging
import os

import numpy as np

__all__ = ["gpu_count", "train", "add_with_ids", "encode", "task_gpu", "resources"]

log = logging.getLogger("imagelake.jobs.index")

_RES = None


def gpu_count() -> int:
    """GPUs FAISS can use in this process (0 with faiss-cpu, or with ``IMAGELAKE_INDEX_GPU=0``)."""
    if os.environ.get("IMAGELAKE_INDEX_GPU", "1") == "0":
        return 0
    try:
        import faiss
    except ImportError:
        return 0
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get else 0
    except RuntimeError:  # a CUDA build on a machine without a driver
        return 0


def resources():
    """One ``StandardGpuResources`` per process (temporary memory, streams, cuBLAS handle)."""
    global _RES
    import faiss

    if _RES is None:
        _RES = faiss.StandardGpuResources()
    return _RES


def _options():
    import faiss

    co = faiss.GpuClonerOptions()
    co.useFloat16 = True  # IVF-PQ: float16 lookup tables (M=64 x 256 x 4 B would not fit shared memory)
    return co


def _to_gpu(index, device: int = 0):
    import faiss

    return faiss.index_cpu_to_gpu(resources(), device, index, _options())


def _to_cpu(index):
    import faiss

    return faiss.index_gpu_to_cpu(index)


def task_gpu() -> int:
    """The GPU ordinal Spark's resource scheduling gave this task (its first address), else 0."""
    try:
        from pyspark import TaskContext
    except ImportError:
        return 0
    tc = TaskContext.get()
    gpus = tc.resources().get("gpu") if tc is not None else None
    try:
        return int(gpus.addresses[0]) if gpus is not None and gpus.addresses else 0
    except ValueError:
        return 0


def train(index, sample: np.ndarray):
    """Train ``index`` on ``sample``; returns the trained CPU index (a new object when trained on
    the GPU: use the return value)."""
    import faiss

    x = np.ascontiguousarray(sample, dtype=np.float32)
    if gpu_count() == 0:
        index.train(x)
        return index
    try:
        gpu_index = _to_gpu(index)
    except (RuntimeError, AttributeError) as e:  # not implemented on the GPU for this factory
        log.info("index: whole-index GPU training not available (%s); coarse k-means on the GPU", e)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.clustering_index = faiss.index_cpu_to_gpu(resources(), 0, faiss.IndexFlatL2(ivf.d))
        index.train(x)
        if ivf is not None:
            ivf.clustering_index = None
        return index
    gpu_index.train(x)
    return _to_cpu(gpu_index)


def add_with_ids(index, vectors: np.ndarray, ids: np.ndarray, chunk: int = 262_144):
    """Encode ``vectors`` into ``index`` under ``ids``; returns the CPU index (a new object when
    encoded on the GPU)."""
    import faiss

    target = index
    on_gpu = False
    if gpu_count() > 0:
        try:
            target, on_gpu = _to_gpu(index), True
        except (RuntimeError, AttributeError) as e:
            log.info("index: GPU encoding not available for this index (%s); encoding on the CPU", e)
    for lo in range(0, len(vectors), chunk):
        hi = min(len(vectors), lo + chunk)
        target.add_with_ids(np.ascontiguousarray(vectors[lo:hi], dtype=np.float32),
                            np.ascontiguousarray(ids[lo:hi], dtype=np.int64))
    return _to_cpu(target) if on_gpu else target


def encode(index, chunks, device: int | None = None):
    """Encode every ``(vectors, ids)`` of ``chunks`` into one GPU clone of the trained ``index``;
    returns the filled CPU index (``index`` itself is left empty).

    Raises:
        RuntimeError / AttributeError: the index cannot be cloned to or encoded on the GPU (a factory
            the GPU lacks, out of GPU memory); the caller encodes on the CPU instead.
    """
    target = _to_gpu(index, task_gpu() if device is None else device)
    for vectors, ids in chunks:
        for lo in range(0, len(vectors), 262_144):
            hi = min(len(vectors), lo + 262_144)
            target.add_with_ids(np.ascontiguousarray(vectors[lo:hi], dtype=np.float32),
                                np.ascontiguousarray(ids[lo:hi], dtype=np.int64))
    return _to_cpu(target)
