"""Airflow DAG: `imagelake run` every 15 minutes, then the janitor once a day.

Copy this file into Airflow's dags/ folder on a machine (or image) where imagelake is installed.
Settings come from Airflow Variables (defaults in brackets): ``imagelake_bin``
[/opt/imagelake/.venv/bin/imagelake], ``imagelake_lake`` [/data/lakehouse], ``imagelake_images``
[/data/photos], ``imagelake_master`` [local[*]].

Runs never overlap (``max_active_runs=1``, and the lake's own lock). Exit code 3 — another run holds
the lock — marks the task skipped rather than failed; any other non-zero exit fails it, and the
task log holds imagelake's one-line error naming the failing step.
"""

from __future__ import annotations

import datetime as dt

from airflow import DAG

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:  # Airflow 2
    from airflow.operators.bash import BashOperator

IMAGELAKE = "{{ var.value.get('imagelake_bin', '/opt/imagelake/.venv/bin/imagelake') }}"
LAKE = "{{ var.value.get('imagelake_lake', '/data/lakehouse') }}"
IMAGES = "{{ var.value.get('imagelake_images', '/data/photos') }}"
MASTER = "{{ var.value.get('imagelake_master', 'local[*]') }}"

with DAG(
    dag_id="imagelake",
    description="Incremental imagelake pipeline: ingest, embed, index, cluster, tag, grid",
    schedule=dt.timedelta(minutes=15),
    start_date=dt.datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": dt.timedelta(minutes=2)},
    tags=["imagelake"],
) as dag:
    run = BashOperator(
        task_id="run",
        bash_command=f"{IMAGELAKE} --lake {LAKE} --master '{MASTER}' run --images {IMAGES} --no-progress",
        skip_on_exit_code=3,
        execution_timeout=dt.timedelta(hours=12),
    )
    janitor = BashOperator(
        task_id="janitor",
        bash_command=(f"if [ \"$(date -u +%H%M)\" \\< 0015 ]; then {IMAGELAKE} --lake {LAKE} janitor; "
                      "else echo 'janitor runs in the first run after midnight UTC'; fi"),
        trigger_rule="all_done",
    )
    run >> janitor
