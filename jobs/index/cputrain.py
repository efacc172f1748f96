"""IVF-PQ training and encoding on the CPU without FAISS's fine-grained OpenMP parallelism.

FAISS parallelises PQ training inside each sub-quantizer's k-means (256 centroids in 20
dimensions: tiny parallel regions, one barrier each) and encoding inside each ``add`` call. On a
shared 2-core machine those barriers spin while the other core is busy: measured at 12k vectors
(d=1280, IVF128,PQ64, load average 13) PQ training took 15.7 CPU-s / 72 s wall with 2 OpenMP
threads and 2.6 CPU-s / 6.3 s wall the way done here. So:

* **coarse** k-means (one large matrix product per iteration) stays FAISS's, with ``threads``;
* **PQ**: the sub-quantizers are independent k-means runs; ``threads`` Python threads each train
  whole sub-quantizers with one OpenMP thread (FAISS releases the GIL; ``omp_set_num_threads`` in a
  non-OpenMP thread sets that thread's own value) — exactly what ``IndexIVFPQ.train`` computes
  (same coarse step, same residuals, same clustering parameters), parallel over sub-quantizers;
* **encoding**: chunks are encoded (``sa_encode``: coarse assignment + residual codes) by
  ``threads`` Python threads with one OpenMP thread each, then appended in order
  (``add_sa_codes``): the same lists and codes as ``add_with_ids``.

Other indexes (Flat, OPQ pre-transforms, custom factories) are trained by FAISS as before.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["train", "add_with_ids", "ENCODE_CHUNK"]

ENCODE_CHUNK = 16_384


def _ivfpq(index):
    import faiss

    ivf = faiss.downcast_index(index)
    return ivf if isinstance(ivf, faiss.IndexIVFPQ) and ivf.by_residual else None


def train(index, sample: np.ndarray, threads: int, seed: int = 1234):
    """Train ``index`` on ``sample``; IVF-PQ by the scheme above, anything else by ``index.train``.
    Returns the trained index (the same object)."""
    import faiss

    x = np.ascontiguousarray(sample, dtype=np.float32)
    threads = max(1, int(threads))
    ivf = _ivfpq(index)
    if ivf is None:
        faiss.omp_set_num_threads(threads)
        index.train(x)
        return index
    faiss.omp_set_num_threads(threads)
    ivf.train_q1(len(x), faiss.swig_ptr(x), False, ivf.metric_type)
    pq = ivf.pq
    cap = int(pq.cp.max_points_per_centroid) * int(pq.ksub)
    if len(x) > cap:  # what IndexIVF.train's subsampling for the encoder does
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), cap, replace=False))]
    assign = np.ascontiguousarray(ivf.quantizer.assign(x, 1).ravel(), dtype=np.int64)
    residuals = np.empty_like(x)
    ivf.quantizer.compute_residual_n(len(x), faiss.swig_ptr(x), faiss.swig_ptr(residuals),
                                     faiss.swig_ptr(assign))
    m, dsub, ksub = int(pq.M), int(pq.dsub), int(pq.ksub)
    cp = pq.cp

    def one(j: int) -> np.ndarray:
        faiss.omp_set_num_threads(1)
        part = np.ascontiguousarray(residuals[:, j * dsub:(j + 1) * dsub])
        clus = faiss.Clustering(dsub, ksub, cp)
        clus.train(part, faiss.IndexFlatL2(dsub))
        return faiss.vector_to_array(clus.centroids).reshape(ksub, dsub)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        centroids = list(pool.map(one, range(m)))
    faiss.copy_array_to_vector(np.ascontiguousarray(np.stack(centroids), dtype=np.float32).ravel(), pq.centroids)
    ivf.is_trained = True
    ivf.precompute_table()
    return index


def add_with_ids(index, vectors: np.ndarray, ids: np.ndarray, threads: int, chunk: int = ENCODE_CHUNK) -> None:
    """Encode rows of ``vectors`` (float16 or float32, e.g. a memory map) into ``index`` under ``ids``.

    IVF-PQ: ``threads`` Python threads encode chunks with one OpenMP thread each and the codes are
    appended in order; anything else: ``index.add_with_ids`` chunk by chunk."""
    import faiss

    threads = max(1, int(threads))
    n = len(vectors)
    if _ivfpq(index) is None:
        faiss.omp_set_num_threads(threads)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            index.add_with_ids(np.ascontiguousarray(vectors[lo:hi], dtype=np.float32),
                               np.ascontiguousarray(ids[lo:hi], dtype=np.int64))
        return

    def encode(lo: int) -> np.ndarray:
        faiss.omp_set_num_threads(1)
        return index.sa_encode(np.ascontiguousarray(vectors[lo:min(n, lo + chunk)], dtype=np.float32))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        # map yields in order; the codes (m + 1..2 bytes a row) of finished chunks wait to be appended
        for lo, codes in zip(range(0, n, chunk), pool.map(encode, range(0, n, chunk))):
            hi = min(n, lo + chunk)
            index.add_sa_codes(codes, np.ascontiguousarray(ids[lo:hi], dtype=np.int64))
