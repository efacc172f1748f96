"""`imagelake run`: steps, lock, failures, a real standalone Spark cluster, kill -9 and task retries.

Every fault test ends with the same check (:func:`assert_consistent`): every table readable, images
``seq`` dense and unique, no duplicated ``image_id``, ``features`` 1:1 with ``images`` for the model,
one thumbnail per image and size, one ``sources`` row per file, and after the janitor no staging
folder and no data file that no Delta version references.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deltalake import DeltaTable

from conftest import write_images
from kill import kill_when, staged_files, staging_folders, unfinished_runs
from jobs import pipeline
from jobs.pipeline import PipelineRequest, StepFailed, StepUnavailable, parse_steps, run_pipeline
from jobs.runner import FAIL_ONCE_ENV, LocalRunner, SparkRunner
from lake.catalog import Lake
from lake.errors import BadInput, LockHeld
from lake.janitor import clean
from lake.lock import LakeLock
from lake.settings import Settings

REPO = Path(__file__).resolve().parent.parent
MODEL = "efficientnet-lite0"
TABLES_WRITTEN = ("images", "sources", "thumbnails", "rejects", "features", "job_runs")


def _rows(lake: Lake, table: str, columns=None) -> list[dict]:
    return DeltaTable(lake.table_uri(table)).to_pyarrow_table(columns=columns).to_pylist()


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "imagelake", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _model_key() -> str:
    from jobs.embed.models import get_model
    return get_model(MODEL).key


def assert_consistent(lake: Lake, n_files: int, thumbnail_sizes=(64, 256)) -> None:
    """The lake holds exactly ``n_files`` distinct images, each complete, with nothing left over."""
    for t in TABLES_WRITTEN:
        DeltaTable(lake.table_uri(t)).to_pyarrow_table()  # readable
    images = _rows(lake, "images", ["image_id", "seq"])
    ids = {r["image_id"] for r in images}
    assert len(images) == n_files and len(ids) == n_files, "duplicated or lost images"
    assert sorted(r["seq"] for r in images) == list(range(n_files)), "seq not dense and unique"
    sources = _rows(lake, "sources", ["uri", "image_id"])
    assert len(sources) == n_files and len({r["uri"] for r in sources}) == n_files
    assert {r["image_id"] for r in sources} == ids
    thumbs = [(r["image_id"], r["size"]) for r in _rows(lake, "thumbnails", ["image_id", "size"])]
    assert len(thumbs) == len(set(thumbs)) == n_files * len(thumbnail_sizes)
    assert {i for i, _ in thumbs} == ids
    feats = [r["image_id"] for r in _rows(lake, "features", ["image_id", "model"]) if r["model"] == _model_key()]
    assert len(feats) == len(set(feats)) == n_files and set(feats) == ids, "features not 1:1 with images"
    assert not _rows(lake, "rejects"), "a good image was rejected"
    clean(lake, older_than_h=0)
    staging = Path(lake.path("_staging"))
    assert not staging.exists() or not list(staging.iterdir()), "staging left after the janitor"
    for t in TABLES_WRITTEN:
        table_dir = Path(lake.table_uri(t))
        referenced = set(DeltaTable(str(table_dir)).get_add_actions(flatten=True).column("path").to_pylist())
        on_disk = {p.name for p in table_dir.glob("*.parquet")}
        assert on_disk == referenced, f"orphan data files in {t}: {sorted(on_disk - referenced)}"


def _boom(lake, settings, runner=None):
    raise RuntimeError("the GPU caught fire")


# ---- the step registry ---------------------------------------------------------------------------

def test_steps_are_parsed_in_pipeline_order_and_bad_names_are_refused():
    assert parse_steps("embed, ingest") == ("ingest", "embed")
    assert parse_steps(None) == tuple(pipeline.STEPS)
    for bad, message in [("ingest,resize", "unknown step(s) resize"), (",", "names no step"),
                         ("embed,embed", "repeats a step")]:
        with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_steps(bad)


def test_a_step_missing_from_the_install_fails_the_run_unless_left_out(tmp_path, lake, local_settings, monkeypatch):
    monkeypatch.setitem(pipeline.STEPS, "grid", "jobs.grid_not_built.driver:run_grid")
    with pytest.raises(StepUnavailable, match="step grid is not in this install: no module jobs.grid_not_built"):
        run_pipeline(lake, local_settings, PipelineRequest(steps=("embed", "grid")))
    assert not _rows(lake, "job_runs"), "nothing may run when a named step is missing"
    # a step whose own import needs a package that is not installed: the default run fails, naming it
    (tmp_path / "pkgs").mkdir()
    (tmp_path / "pkgs" / "step_needing_a_package.py").write_text("import imagelake_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setitem(pipeline.STEPS, "tag", "step_needing_a_package:run")
    write_images(tmp_path / "imgs", 2)
    with pytest.raises(StepUnavailable) as failed:
        run_pipeline(lake, local_settings, PipelineRequest(images=str(tmp_path / "imgs")))  # default: every step
    message = str(failed.value)
    assert "step tag needs module 'imagelake_absent_dependency', which is not installed" in message
    assert "step grid is not in this install" in message
    assert message.endswith("or leave those steps out: --steps ingest,quality,embed,suggest,index,outliers,cluster")
    assert not _rows(lake, "job_runs") and not _rows(lake, "images"), "nothing may run"
    # left out with --steps, the missing steps are never imported and the run succeeds
    summary = run_pipeline(lake, local_settings, PipelineRequest(images=str(tmp_path / "imgs"), steps=("ingest",)))
    assert [(s["step"], s["rows_out"]) for s in summary.steps] == [("ingest", 2)]


def test_cli_default_run_exits_2_naming_a_missing_package(tmp_path, lake):
    """A real install without faiss (shadowed on PYTHONPATH by a package that is "not installed")."""
    shadow = tmp_path / "shadow" / "faiss"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'faiss'\", name='faiss')\n")
    write_images(tmp_path / "imgs", 2)
    env = {"PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{REPO}"}
    base = ("--lake", lake.root, "--runner", "local", "run", "--images", str(tmp_path / "imgs"), "--no-progress")
    proc = subprocess.run([sys.executable, "-m", "imagelake", *base], cwd=REPO, env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("imagelake: error: step cluster needs module 'faiss', which is not installed")
    assert "pip install 'imagelake[all]'" in proc.stderr and "out: --steps ingest,quality,embed," in proc.stderr
    assert proc.stdout == ""
    assert not Path(lake.table_uri("images")).exists() or not _rows(lake, "images")
    only = subprocess.run([sys.executable, "-m", "imagelake", *base, "--steps", "ingest"], cwd=REPO,
                          env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
    assert only.returncode == 0, only.stderr
    assert len(_rows(lake, "images")) == 2


def test_run_is_incremental_with_a_job_run_per_step(tmp_path, lake, local_settings):
    write_images(tmp_path / "imgs", 8)
    request = PipelineRequest(images=str(tmp_path / "imgs"), collection="c", steps=("ingest", "embed"))
    first = run_pipeline(lake, local_settings, request)
    assert [(s["step"], s["rows_in"], s["rows_out"]) for s in first.steps] == [("ingest", 8, 8), ("embed", 8, 8)]
    write_images(tmp_path / "imgs", 3, start=8)
    second = run_pipeline(lake, local_settings, request)
    assert [s["rows_out"] for s in second.steps] == [3, 3]
    third = run_pipeline(lake, local_settings, request)
    assert [s["rows_out"] for s in third.steps] == [0, 0]
    assert_consistent(lake, 11)
    runs = {r["run_id"]: r for r in _rows(lake, "job_runs") if r["state"] == "succeeded"}
    top = runs[first.run_id]
    assert top["job"] == "pipeline" and top["rows_out"] == 16
    steps = json.loads(top["metrics"])["steps"]
    assert [runs[s["run_id"]]["job"] for s in steps] == ["ingest", "embed"]  # each step's own row
    assert all(s["seconds"] >= 0 for s in steps) and json.loads(top["args"])["steps"] == ["ingest", "embed"]


def test_steps_after_embed_use_the_key_embed_wrote_with_its_precision(tmp_path, lake, local_settings):
    write_images(tmp_path / "imgs", 4)
    request = PipelineRequest(images=str(tmp_path / "imgs"), steps=("ingest", "embed", "index"), precision="bf16")
    summary = run_pipeline(lake, local_settings, request)
    key = _model_key() + "+bf16"
    assert [s["rows_out"] for s in summary.steps][:2] == [4, 4]
    assert {r["model"] for r in _rows(lake, "features", ["model"])} == {key}
    builds = [r for r in _rows(lake, "index_builds") if r["state"] == "published"]
    assert [(b["model"], b["ntotal"]) for b in builds] == [(key, 4)]
    again = run_pipeline(lake, local_settings, PipelineRequest(steps=("index",)))  # no embed step: the stored key
    index_runs = [json.loads(r["args"]) for r in _rows(lake, "job_runs")
                  if r["job"] == "index" and r["state"] == "succeeded"]
    assert [a["model"] for a in index_runs] == [key, key] and again.steps[0]["step"] == "index"


def test_a_failing_step_stops_the_run_names_the_step_and_is_recorded(tmp_path, lake, local_settings, monkeypatch):
    monkeypatch.setitem(pipeline.STEPS, "embed", f"{__name__}:_boom")
    write_images(tmp_path / "imgs", 2)
    with pytest.raises(StepFailed, match="step embed failed: RuntimeError: the GPU caught fire"):
        run_pipeline(lake, local_settings, PipelineRequest(images=str(tmp_path / "imgs"), steps=("ingest", "embed")))
    failed = [r for r in _rows(lake, "job_runs") if r["job"] == "pipeline" and r["state"] == "failed"]
    assert len(failed) == 1 and "step embed failed" in failed[0]["error"]
    assert [s["step"] for s in json.loads(failed[0]["metrics"])["steps"]] == ["ingest", "embed"]
    assert len(_rows(lake, "images")) == 2  # the steps before it keep their work


def test_cli_exit_codes_overlap_3_failure_1_bad_input_2(tmp_path, lake, monkeypatch):
    write_images(tmp_path / "imgs", 2)
    base = ("--lake", lake.root, "--runner", "local", "run", "--images", str(tmp_path / "imgs"))
    with LakeLock(lake, "pipeline", timeout=0, holder="a scheduled run"):
        held = _cli(*base, "--steps", "ingest")
        out, err = held.communicate(timeout=120)
    assert held.returncode == 3 and "'pipeline' lock is held by pid" in err and "a scheduled run" in err
    assert not _rows(lake, "images")
    bad = _cli(*base, "--steps", "ingest,bogus")
    assert bad.communicate(timeout=120)[1].strip().endswith("steps are ingest, quality, embed, suggest, index, outliers, cluster, tag, grid")
    assert bad.returncode == 2
    missing = _cli("--lake", lake.root, "--runner", "local", "run", "--images", str(tmp_path / "nope"),
                   "--steps", "ingest")
    err = missing.communicate(timeout=120)[1]
    assert missing.returncode == 2 and err.startswith("imagelake: error: step ingest failed:"), err


# ---- a real Spark standalone cluster --------------------------------------------------------------

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def standalone_cluster(tmp_path):
    """Master + 2 workers (1 core, 1 GiB each) on 127.0.0.1, started with infra/spark-standalone.sh."""
    env = dict(os.environ, PYTHON=sys.executable, SPARK_PID_DIR=str(tmp_path / "spark"), WAIT_S="120")
    port = _free_port()
    script = str(REPO / "infra" / "spark-standalone.sh")
    start = subprocess.Popen([script, "local", "--workers", "2", "--cores", "1", "--memory", "1g", "--port", str(port)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    pgid = start.pid
    pids: list[int] = []
    try:
        out, err = start.communicate(timeout=180)
        pids = [int(p.read_text()) for p in (tmp_path / "spark").glob("*.pid")]
        assert start.returncode == 0, err
        assert out.strip().splitlines()[-1] == f"spark://127.0.0.1:{port}"
        yield out.strip().splitlines()[-1], tmp_path / "spark"
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=60)
        try:
            os.killpg(pgid, signal.SIGKILL)  # executors and their Python workers, should any be left
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "a Spark daemon outlived the test"


@pytest.mark.spark
def test_pipeline_on_a_standalone_cluster_with_two_workers(tmp_path, standalone_cluster):
    master, spark_dir = standalone_cluster
    write_images(tmp_path / "imgs", 24)
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "spark-defaults.conf").write_text(
        (REPO / "infra" / "spark-defaults.conf").read_text() + "\nspark.executor.memory 512m\nspark.cores.max 2\n")
    lake = Lake.at(tmp_path / "lake")
    done = _cli("--lake", lake.root, "--master", master, "run", "--images", str(tmp_path / "imgs"),
                "--steps", "ingest,embed", "--no-progress", env={"SPARK_CONF_DIR": str(conf)})
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-3000:]
    assert out.startswith("run pipeline-") and "ingest 24 rows out" in out and "embed 24 rows out" in out
    assert_consistent(lake, 24)
    # the tasks ran in executors the two workers launched for this application
    apps = [p for p in spark_dir.glob("work/worker-*/app-*") if p.is_dir()]
    assert {p.parent.name for p in apps} == {"worker-1", "worker-2"}
    assert len({p.name for p in apps}) == 1, "the steps must share one Spark application (session)"
    top = [r for r in _rows(lake, "job_runs") if r["job"] == "pipeline" and r["state"] == "succeeded"]
    assert json.loads(top[0]["args"])["master"] == master


# ---- faults ---------------------------------------------------------------------------------------

@pytest.mark.spark
def test_a_task_failing_once_is_retried_without_duplicates(tmp_path, lake, spark):
    """Every partition of ingest and embed fails on its first attempt after staging its files."""
    write_images(tmp_path / "imgs", 12)
    markers = tmp_path / "faults"
    env = spark.sparkContext.environment  # shipped with each Python function to the executors
    env[FAIL_ONCE_ENV] = str(markers)
    try:
        settings = Settings(lake=lake.root, partition_files=4)
        summary = run_pipeline(lake, settings, PipelineRequest(images=str(tmp_path / "imgs"), steps=("ingest", "embed")),
                               runner=SparkRunner(settings, spark=spark))
    finally:
        env.pop(FAIL_ONCE_ENV, None)
    injected = sorted(p.name for p in markers.iterdir())
    assert [n for n in injected if n.startswith("ingest_partition.")] and \
        [n for n in injected if n.startswith("embed_partition.")], injected
    assert [s["rows_out"] for s in summary.steps] == [12, 12]
    assert_consistent(lake, 12)


def _kill_trial(lake_dir: Path, src: Path, runner: str, job: str, at: int) -> str:
    """Start `imagelake run` (ingest, embed), kill -9 it once ``job``'s tasks have staged ``at``
    files, and prove the kill landed mid-run; returns the step's run id left unfinished."""
    args = ["--lake", str(lake_dir), "--runner", runner, "run", "--images", str(src), "--steps", "ingest,embed",
            "--no-progress"]
    if runner == "spark":
        args[:0] = ["--master", "local[2]"]
    before, old = unfinished_runs(lake_dir), staging_folders(lake_dir)
    proc = _cli(*args, start_new_session=True)
    kill_when(proc, lambda: staged_files(lake_dir, job, old) >= at, f"{job} staged {at} files")
    new = unfinished_runs(lake_dir) - before          # no end row: the run was in progress
    assert sorted(r.split("-", 1)[0] for r in new) == sorted(["pipeline", job]), new
    return next(r for r in new if r.startswith(job))


def test_kill_9_at_random_points_then_rerun_loses_and_duplicates_nothing(tmp_path):
    """6 kill -9 trials (4 in-process, 2 on Spark local[2]: one in ingest, one in embed), new files before each, each killed
    while the ingest or the embed step was staging its tasks' files (proven by the exit status and
    by the runs left without an end row); then a clean re-run completes the lake exactly."""
    src, lake_dir = tmp_path / "imgs", tmp_path / "lake"
    rng = random.Random(9)
    n = 0
    outcomes = []
    for trial in range(6):
        write_images(src, 4, start=n)
        n += 4
        runner = "spark" if trial in (3, 5) else "local"
        job = rng.choice(["ingest", "embed"])
        at = rng.randint(1, 3) if job == "ingest" else 1    # 4+ ingest tasks; embed stages one file a task
        outcomes.append((runner, job, at, _kill_trial(lake_dir, src, runner, job, at)))
        lake = Lake.at(lake_dir)
        ids = [r["image_id"] for r in _rows(lake, "images", ["image_id"])]
        assert len(ids) == len(set(ids)), outcomes      # readable, no duplicates, whatever the kill left
    assert {o[1] for o in outcomes} == {"ingest", "embed"}, outcomes
    done = _cli("--lake", str(lake_dir), "--runner", "local", "run", "--images", str(src), "--steps", "ingest,embed")
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert_consistent(Lake.at(lake_dir), n)


# ---- infra files ----------------------------------------------------------------------------------

def test_infra_scripts_and_schedules_are_well_formed():
    """Shell scripts parse, the Airflow DAG compiles (Airflow itself is not installed here), and the
    command lines in cron and systemd are ones `imagelake` accepts."""
    import shlex

    from imagelake.cli import build_parser

    infra = REPO / "infra"
    for script in [*infra.glob("*.sh"), *infra.glob("k8s/*.sh")]:
        assert os.access(script, os.X_OK), f"{script} is not executable"
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script}: {done.stderr}"
    compile((infra / "airflow" / "imagelake_dag.py").read_text(), "imagelake_dag.py", "exec")
    lines = [line.split(".venv/bin/imagelake", 1)[1].split(">>")[0]
             for line in (infra / "imagelake.cron").read_text().splitlines() if not line.startswith("#") and line]
    lines += [line.split("/bin/imagelake", 1)[1] for f in infra.glob("systemd/*.service")
              for line in f.read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 4
    commands = [build_parser().parse_args(shlex.split(line)).command for line in lines]
    assert sorted(commands) == ["janitor", "run", "run", "serve"]
