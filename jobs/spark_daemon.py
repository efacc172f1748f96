"""Spark's Python daemon with the partition functions' imports done once, before it forks workers.

Spark starts one Python daemon per executor (``python -m pyspark.daemon``), which forks a worker
per task slot; each worker then imports what the partition functions need (pyarrow, numpy, Pillow,
ONNX Runtime, this project's modules) on its first task. Run as ``spark.python.daemon.module``
(:func:`jobs.spark.spark_conf`, local masters), this module imports them in the daemon, so every
forked worker starts with them loaded (copy-on-write) and a job's first tasks do not each pay
them. Nothing here starts a thread, opens a file or builds a model: those stay in the tasks.
"""

from __future__ import annotations

import importlib

#: Imported in the daemon before it forks. Optional ones missing from an install are skipped.
PRELOAD = ("numpy", "pyarrow", "pyarrow.parquet", "PIL.Image", "PIL.JpegImagePlugin", "pyspark.worker",
           "pyspark.sql.pandas.serializers", "jobs.runner", "jobs.ingest.partition", "jobs.embed.partition",
           "onnxruntime")


def preload() -> list[str]:
    """Import :data:`PRELOAD`; the names that could not be imported (never raises)."""
    missing = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # an optional engine not installed, or a broken one: the task will say
            missing.append(name)
    return missing


if __name__ == "__main__":
    preload()
    from pyspark.daemon import manager

    manager()
