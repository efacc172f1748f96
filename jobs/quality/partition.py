"""Image quality measures of one partition of thumbnails: a pure partition function (Spark or in process).

From each image's 256 px JPEG thumbnail (the largest made at ingest up to 256 px), decoded to grey
levels 0..255:

* ``blur``: variance of the 4-neighbour Laplacian (sharp edges give large values; CleanVision and
  the classic focus measure);
* ``brightness`` and ``contrast``: mean and standard deviation of the grey levels, scaled to 0..1;
* ``entropy``: Shannon entropy of the 256-bin grey histogram, in bits (0 for a flat image, 8 at most);
* ``saturation``: mean HSV saturation (0..1), near 0 for a grayscale picture;
* ``aspect``: longer over shorter side of the original.

Flags compare them with the thresholds in :class:`QualityJob` (the settings ``quality_*``). Rows go to
one staged Parquet file per partition (``_staging/<run>/image_quality/part-<partition>.parquet``);
the driver commits exactly the files the tasks report.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.runner import PartitionContext
from lake.catalog import TABLES
from lake.staging import StagedWriter, filesystem_for

__all__ = ["QualityJob", "QUALITY_STATS_SCHEMA", "TODO_SCHEMA", "measure", "quality_partition", "FLAGS"]

FLAGS = ("blurry", "dark", "bright", "low_contrast", "low_information", "grayscale", "odd_aspect", "tiny")

TODO_SCHEMA = pa.schema([("file", pa.string()), ("image_id", pa.string()), ("width", pa.int32()),
                         ("height", pa.int32())])
QUALITY_STATS_SCHEMA = pa.schema([("partition", pa.int32()), ("rows", pa.int64()), ("unreadable", pa.int64()),
                                  ("file", pa.string())])


@dataclass(frozen=True)
class QualityJob:
    run_id: str
    staging_dir: str
    size: int
    created_at: dt.datetime
    blur: float
    dark: float
    bright: float
    low_contrast: float
    low_information: float
    grayscale: float
    odd_aspect: float
    tiny: int


def measure(jpeg: bytes) -> dict[str, float]:
    """blur, brightness, contrast, entropy and saturation of one thumbnail (see the module docstring)."""
    im = Image.open(io.BytesIO(jpeg))
    im.draft("RGB", im.size)
    rgb = im.convert("RGB")
    grey = np.asarray(rgb.convert("L"), np.float32)
    if grey.shape[0] >= 3 and grey.shape[1] >= 3:
        lap = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1])
        blur = float(lap.var())
    else:
        blur = 0.0
    hist = np.bincount(grey.astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    sat = np.asarray(rgb.convert("HSV"), np.uint8)[..., 1]
    return {"blur": blur, "brightness": float(grey.mean() / 255), "contrast": float(grey.std() / 255),
            "entropy": float(-(p * np.log2(p)).sum()), "saturation": float(sat.mean() / 255)}


def _row(job: QualityJob, image_id: str, width: int | None, height: int | None, m: dict[str, float]) -> dict:
    short, long = (min(width, height), max(width, height)) if width and height else (None, None)
    aspect = long / short if short else None
    flags = {"blurry": m["blur"] < job.blur, "dark": m["brightness"] < job.dark,
             "bright": m["brightness"] > job.bright, "low_contrast": m["contrast"] < job.low_contrast,
             "low_information": m["entropy"] < job.low_information, "grayscale": m["saturation"] < job.grayscale,
             "odd_aspect": aspect is not None and aspect > job.odd_aspect,
             "tiny": short is not None and short < job.tiny}
    return {"image_id": image_id, **{k: round(v, 6) for k, v in m.items()},
            "aspect": round(aspect, 4) if aspect else None, **flags,
            "issues": [f for f in FLAGS if flags[f]], "run_id": job.run_id, "created_at": job.created_at}


def quality_partition(batches: Iterator[pa.RecordBatch], ctx: PartitionContext, *,
                      job: QualityJob) -> Iterator[pa.RecordBatch]:
    """Rows ``file, image_id, width, height`` (sorted by file) in; one stats row naming the staged file out."""
    todo: dict[str, dict[str, tuple]] = {}
    for batch in batches:
        for r in batch.to_pylist():
            todo.setdefault(r["file"], {})[r["image_id"]] = (r["width"], r["height"])
    spec = TABLES["image_quality"]
    writer = StagedWriter(job.staging_dir, "image_quality", ctx.partition_id, spec.schema, sort_by=spec.sort_by)
    rows = unreadable = 0
    try:
        for uri, wanted in todo.items():
            fs, path = filesystem_for(uri)
            table = pq.read_table(path, filesystem=fs, columns=["image_id", "size", "jpeg"],
                                  filters=[("size", "=", job.size)])
            out = []
            for image_id, jpeg in zip(table.column("image_id").to_pylist(), table.column("jpeg").to_pylist()):
                if image_id not in wanted:
                    continue
                try:
                    m = measure(jpeg)
                except (OSError, ValueError, TypeError):
                    unreadable += 1
                    continue
                out.append(_row(job, image_id, *wanted.pop(image_id), m))
            writer.write(out)
            rows += len(out)
        staged = writer.close()
    except BaseException:
        writer.abort()
        raise
    yield pa.RecordBatch.from_pylist([dict(partition=ctx.partition_id, rows=rows, unreadable=unreadable,
                                           file=staged)], schema=QUALITY_STATS_SCHEMA)
