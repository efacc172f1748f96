"""Reading embeddings files for :mod:`jobs.embed.importer`, batch by batch: Parquet, ``.npz``, ``.npy``.

Each reader answers (the key column's name, an iterator of :class:`Batch`, the row count) and reads
at most ``batch_rows`` rows at a time (``.npy`` memory-mapped; an ``.npz`` member whole, as NumPy
has no lazy reader for it). :func:`prefetched` reads one batch ahead on a background thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lake.errors import BadInput

__all__ = ["Batch", "read_parquet", "read_numpy", "prefetched"]


@dataclass
class Batch:
    """One batch of rows of the input file."""

    keys: pa.Array            # string
    vectors: pa.Array         # list<float> (or fixed_size_list)
    probs: pa.Array | None    # list<float> or None


def _as_list_array(matrix: np.ndarray) -> pa.Array:
    matrix = np.ascontiguousarray(matrix)
    n, d = matrix.shape
    values = pa.array(matrix.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, d) if d else pa.array([[]] * n, pa.list_(values.type))


def read_parquet(path: str, key: str | None, batch_rows: int) -> tuple[str, Iterator[Batch], int]:
    f = pq.ParquetFile(path)
    names = f.schema_arrow.names
    key = key or next((k for k in ("image_id", "uri") if k in names), None)
    if key is None or key not in names:
        raise BadInput(f"{path}: no key column; the file needs image_id or uri (its columns: {', '.join(names)})")
    vec = next((c for c in ("embedding", "embeddings", "vector") if c in names), None)
    if vec is None:
        raise BadInput(f"{path}: no embedding column (its columns: {', '.join(names)})")
    probs = "concept_probs" if "concept_probs" in names else None
    columns = [key, vec] + ([probs] if probs else [])

    def batches() -> Iterator[Batch]:
        # use_threads=False: the column decoders' thread pool doubled the read's CPU time (8 vs 4 CPU-s
        # for 100k rows of 1280 + 1000 floats) and bought no wall time on 2 cores
        for b in f.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False):
            yield Batch(pc.cast(b.column(0), pa.string()), b.column(1), b.column(2) if probs else None)
    return key, batches(), f.metadata.num_rows


def read_numpy(path: str, key: str | None, keys_file: str | None, batch_rows: int) -> tuple[str, Iterator[Batch], int]:
    if path.endswith(".npy"):
        if not keys_file:
            raise BadInput(f"{path}: a .npy file holds only the vectors; name its rows with --keys FILE "
                           "(one image id or URI a line), or use .npz or Parquet")
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
        with open(keys_file, encoding="utf-8") as fh:
            keys = np.array([line.rstrip("\r\n") for line in fh if line.strip()], dtype=object)
        key = key or "image_id"
        probs = None
    else:
        with np.load(path, allow_pickle=False) as z:
            members = set(z.files)
            mname = next((m for m in ("embedding", "embeddings", "vectors") if m in members), None)
            key = key or next((k for k in ("image_id", "uri") if k in members), None)
            if mname is None or key is None or key not in members:
                raise BadInput(f"{path}: an .npz needs arrays embedding and image_id (or uri); it has "
                               f"{', '.join(sorted(members)) or 'none'}")
            matrix, keys = z[mname], z[key].astype(str).astype(object)
            probs = z["concept_probs"] if "concept_probs" in members else None
    if matrix.ndim != 2:
        raise BadInput(f"{path}: the embeddings must be a 2-D array (rows × dimension), got shape {matrix.shape}")
    if len(keys) != matrix.shape[0] or (probs is not None and (probs.ndim != 2 or len(probs) != len(keys))):
        raise BadInput(f"{path}: {matrix.shape[0]} vectors but {len(keys)} keys"
                       + ("" if probs is None else f" and {len(probs)} concept_probs rows"))
    if not np.issubdtype(matrix.dtype, np.number):
        raise BadInput(f"{path}: embeddings must be numbers, got dtype {matrix.dtype}")

    def batches() -> Iterator[Batch]:
        for lo in range(0, len(keys), batch_rows):
            hi = min(len(keys), lo + batch_rows)
            m = np.asarray(matrix[lo:hi], dtype=np.float32)
            yield Batch(pa.array(list(keys[lo:hi]), pa.string()), _as_list_array(m),
                         None if probs is None else _as_list_array(np.asarray(probs[lo:hi], np.float32)))
    return key, batches(), len(keys)


def prefetched(batches: Iterator[Batch]) -> Iterator[Batch]:
    """``batches`` read one ahead on a background thread (Parquet decoding releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="import-read") as pool:
        ahead = pool.submit(next, batches, None)
        while True:
            b = ahead.result()
            if b is None:
                return
            ahead = pool.submit(next, batches, None)
            yield b
