"""Where the current clustering is: the last successful ``cluster`` run and its topic model.

``job_runs`` is the record: a succeeded ``cluster`` run's metrics name its dup run (itself) and the
topic model run whose centroids it used. Dup groups are those rows of the current run; topic rows
are every row whose ``model_run`` is the current model (the run that fitted it plus later runs that
assigned new images to it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import duckdb

from lake.catalog import Lake
from lake.commit import open_table

__all__ = ["ClusterState", "current_state", "topic_artifact_dir"]


@dataclass(frozen=True)
class ClusterState:
    run_id: str | None        # the last succeeded cluster run (its dup groups are current)
    topic_model: str | None   # the run whose topic model is current
    model: str | None         # the features model key it clustered
    dup_state: str | None = None   # the run whose dup state (jobs.cluster.incremental) is current


def topic_artifact_dir(lake: Lake, model_run: str) -> str:
    return lake.artifacts_dir("clusters", model_run)


def current_state(lake: Lake) -> ClusterState:
    runs = open_table(lake, "job_runs")
    if not runs.file_uris():
        return ClusterState(None, None, None)
    con = duckdb.connect()
    try:
        con.register("job_runs", runs.to_pyarrow_dataset())
        rows = con.sql("SELECT run_id, metrics FROM job_runs WHERE job = 'cluster' AND state = 'succeeded' "
                       "ORDER BY ended_at DESC, run_id DESC LIMIT 1").fetchall()
    finally:
        con.close()
    if not rows:
        return ClusterState(None, None, None)
    metrics = json.loads(rows[0][1] or "{}")
    return ClusterState(rows[0][0], metrics.get("topic_model"), metrics.get("model"), metrics.get("dup_state"))
