"""The near-duplicate descriptor: what "similar enough to be the same picture" is measured on.

EfficientNet embeddings alone separate planted duplicates from distinct photos poorly: a crop, a
half-size resize or a quality-30 recompress of a small photo can score below the similarity of two
unrelated photos (measured: planted pairs down to 0.67, unrelated pairs up to 0.85; recall 0.71 at
precision 0.95). Two cheap pixel features computed from the 64 px thumbnail close the gap:

* ``layout``: the thumbnail box-filtered to 8×8 RGB, each channel's mean removed (tolerates resize,
  recompress and a brightness shift; compared both ways round, so a left-right flip matches);
* ``colour``: a 4×4×4 RGB histogram, square-rooted (Hellinger), which tolerates crops and flips.

The descriptor is ``[√0.4·embedding, √0.3·layout, √0.3·colour]`` with each part L2-normalised, so
its inner product is ``0.4·cos(embedding) + 0.3·cos(layout) + 0.3·cos(colour)`` — in 0..1 for
these features, 1 for identical pictures, imagecluster's meaning of ``sim``. The weights were chosen
on planted crops/resizes/recompressions/flips/colour shifts (tests/bench/bench_cluster.py).

The pixel parts are computed by :func:`descriptor_partition`, a runner partition function over the
``thumbnails`` table's Parquet files (read with pyarrow; no deltalake in workers).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.runner import PartitionContext
from lake.staging import filesystem_for

__all__ = ["WEIGHTS", "PIXEL_DIM", "DESCRIPTOR_SCHEMA", "DescriptorJob", "pixel_descriptor",
           "descriptor_partition", "combine", "l2_normalize"]

WEIGHTS = {"embedding": 0.4, "layout": 0.3, "colour": 0.3}
_GRID, _BINS = 8, 4
LAYOUT_DIM = _GRID * _GRID * 3
PIXEL_DIM = LAYOUT_DIM + _BINS ** 3
DESCRIPTOR_SCHEMA = pa.schema([pa.field("image_id", pa.string()), pa.field("pixels", pa.list_(pa.float32()))])


@dataclass(frozen=True)
class DescriptorJob:
    size: int                     # the thumbnail size (px) the descriptor is computed from
    only: tuple[str, ...] = ()    # these images only (an incremental run's new ones); () = all


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pixel_descriptor(jpeg: bytes) -> np.ndarray:
    """``layout`` (8×8×3, mean-removed) then ``colour`` (64 bins, sqrt) of one thumbnail, float32."""
    im = Image.open(io.BytesIO(jpeg)).convert("RGB")
    grid = np.asarray(im.resize((_GRID, _GRID), Image.Resampling.BOX), np.float32)
    grid = grid - grid.mean(axis=(0, 1), keepdims=True)
    q = (np.asarray(im, np.uint8).reshape(-1, 3) // (256 // _BINS)).astype(np.int64)
    hist = np.bincount((q[:, 0] * _BINS + q[:, 1]) * _BINS + q[:, 2], minlength=_BINS ** 3).astype(np.float32)
    return np.concatenate([grid.reshape(-1), np.sqrt(hist / max(1.0, hist.sum()))]).astype(np.float32)


def descriptor_partition(batches: Iterator[pa.RecordBatch], ctx: PartitionContext, *,
                         job: DescriptorJob) -> Iterator[pa.RecordBatch]:
    """Rows ``file`` (thumbnails data files) in; ``image_id, pixels`` out (unreadable thumbnails skipped)."""
    ids, descs = [], []
    for batch in batches:
        for uri in batch.column("file").to_pylist():
            fs, path = filesystem_for(uri)
            where = [("size", "=", job.size)] + ([("image_id", "in", list(job.only))] if job.only else [])
            table = pq.read_table(path, filesystem=fs, columns=["image_id", "size", "jpeg"], filters=where)
            for image_id, jpeg in zip(table.column("image_id").to_pylist(), table.column("jpeg").to_pylist()):
                if jpeg is None:
                    continue
                try:
                    descs.append(pixel_descriptor(jpeg))
                except (OSError, ValueError):
                    continue
                ids.append(image_id)
    flat = np.concatenate(descs) if descs else np.zeros(0, np.float32)
    pixels = pa.ListArray.from_arrays(pa.array(np.arange(len(ids) + 1, dtype=np.int32) * PIXEL_DIM), pa.array(flat))
    yield pa.RecordBatch.from_arrays([pa.array(ids, pa.string()), pixels], schema=DESCRIPTOR_SCHEMA)


def _flip_layout(layout: np.ndarray) -> np.ndarray:
    return layout.reshape(-1, _GRID, _GRID, 3)[:, :, ::-1, :].reshape(len(layout), -1)


def combine(embedding: np.ndarray, pixels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The descriptor and its left-right-flipped twin, both (n, d) float32.

    Args:
        embedding: (n, e) embeddings (any scale; normalised here), e.g. PCA-reduced.
        pixels: (n, PIXEL_DIM) from :func:`pixel_descriptor`, rows of zeros where an image has no
            thumbnail (such an image can reach at most 0.4 and never joins a group at sim > 0.4);
            ``None`` to use the embedding alone (weight 1).
    """
    emb = l2_normalize(embedding)
    if pixels is None:
        return emb, emb
    layout, colour = pixels[:, :LAYOUT_DIM], pixels[:, LAYOUT_DIM:]
    w = {k: np.float32(np.sqrt(v)) for k, v in WEIGHTS.items()}
    desc = np.hstack([w["embedding"] * emb, w["layout"] * l2_normalize(layout), w["colour"] * l2_normalize(colour)])
    flipped = np.hstack([w["embedding"] * emb, w["layout"] * l2_normalize(_flip_layout(layout)),
                         w["colour"] * l2_normalize(colour)])
    return np.ascontiguousarray(desc), np.ascontiguousarray(flipped)
