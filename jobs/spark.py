"""The Spark session jobs run on: ``local[*]`` by default, any master with ``--master``.

Executors run this project's partition functions in Python workers, so they need the same Python
environment as the driver (``PYSPARK_PYTHON``); on a cluster, ship it with ``infra/`` scripts.
"""

from __future__ import annotations

import os
import sys

from lake.settings import Settings

__all__ = ["spark_session", "spark_conf"]


def spark_conf(settings: Settings) -> dict[str, str]:
    conf = {
        "spark.app.name": "imagelake",
        "spark.ui.enabled": "true" if settings.spark_ui else "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.memory": settings.spark_driver_memory,
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": "2048",
        "spark.python.worker.reuse": "true",
        "spark.sql.shuffle.partitions": "8",
        "spark.task.maxFailures": "4",
        "spark.driver.extraJavaOptions": "-Dio.netty.tryReflectionSetAccessible=true",
    }
    if settings.storage_options:  # executors read no settings file: the options (env names, no secrets)
        import json

        conf["spark.executorEnv.IMAGELAKE_STORAGE_OPTIONS"] = json.dumps(settings.storage_options, sort_keys=True)
    if settings.master.startswith("local"):
        # the Python daemon imports the tasks' modules once, before forking workers (jobs.spark_daemon);
        # on a cluster executors keep pyspark's own daemon (their Python path is the cluster's)
        conf["spark.python.daemon.module"] = "jobs.spark_daemon"
        conf["spark.driver.host"] = os.environ.get("SPARK_LOCAL_IP", "127.0.0.1")
        conf["spark.driver.bindAddress"] = conf["spark.driver.host"]
    return conf


def spark_session(settings: Settings, extra_conf: dict[str, str] | None = None):
    """Create (or reuse) the SparkSession for ``settings.master``.

    Python workers use this interpreter unless ``PYSPARK_PYTHON`` says otherwise, so a venv works
    without activation.
    """
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(settings.master)
    for k, v in {**spark_conf(settings), **(extra_conf or {})}.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark
