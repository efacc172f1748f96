"""Shared-nothing: a real Spark standalone cluster (master + 2 workers) running ``imagelake run``
with every installed step on an ``s3://`` lake on the loopback S3 server (``tests/s3_server.py``).

Each worker has its own ``SPARK_LOCAL_DIRS``, work directory and current directory; the driver runs
in a third one. The images are in the bucket too (``s3://<bucket>/images``), so the only thing the
three share is the S3 server: no step may read or write a path on one node's disk that another
node needs. One cluster serves the whole module:

1. two ``imagelake run`` with every step (ingest, quality, embed, suggest, index, outliers, cluster,
   tag, grid; those not in this install left out) started at once into the bucket: one proceeds,
   the other exits 3 (the lake's ``pipeline`` lock); the same rows, ids, ``seq``, tags and
   near-duplicate groups as the same run on a local lake of the same images; every artifact is an
   object in the bucket, nothing is left in staging or in any node's folders; the janitor sweeps
   the bucket; the grid's tiles are read back from it;
2. new images, and kill -9 of one worker (the worker daemon, its executor and that executor's
   Python workers) while the embed step's tasks are staging their files in the bucket: the run
   completes on the other worker or fails cleanly (exit 1, a ``failed`` row), and a re-run
   leaves every table without duplicates.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from PIL import Image

from photo_lake import write_photos
from s3_server import S3Server

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "infra" / "spark-standalone.sh")
pytestmark = [pytest.mark.spark,
              pytest.mark.skipif(not (shutil.which("java") or os.environ.get("JAVA_HOME")),
                                 reason="a Spark standalone cluster needs Java (no java on PATH, no JAVA_HOME)")]


def _steps() -> str:
    from jobs.pipeline import STEPS, StepUnavailable, resolve_step

    names = []
    for name in STEPS:
        try:
            resolve_step(name)
        except StepUnavailable:
            if name in ("ingest", "embed", "suggest", "index", "cluster", "tag", "grid"):
                raise
            continue
        names.append(name)
    return ",".join(names)


def _images(folder: Path) -> None:
    """36 photo views of 12 scenes, plus 3 near-duplicates (one pixel changed) and 2 exact copies."""
    write_photos(folder, per_class=3)
    for i, name in enumerate(("astronaut", "coffee", "rocket")):
        src = folder / name / "photo_00000.png"
        im = Image.open(src).convert("RGB")
        im.putpixel((0, 0), tuple(255 - v for v in im.getpixel((0, 0))))
        im.save(folder / name / "near_dup.png")
        if i < 2:
            shutil.copy(src, folder / name / "exact_copy.png")


def _tables(root: str, storage_options: dict | None) -> dict:
    from deltalake import DeltaTable

    def rows(name, cols):
        return DeltaTable(f"{root}/tables/{name}", storage_options=storage_options).to_pyarrow_table(
            columns=cols).to_pylist()

    images = rows("images", ["image_id", "seq"])
    clusters = rows("clusters", ["run_id", "image_id", "kind", "cluster_id"])
    runs = rows("job_runs", ["run_id", "job", "state"])
    cluster_run = max(r["run_id"] for r in runs if r["job"] == "cluster" and r["state"] == "succeeded")
    dup: dict[str, set] = {}
    for r in clusters:
        if r["kind"] == "dup" and r["run_id"] == cluster_run:
            dup.setdefault(r["cluster_id"], set()).add(r["image_id"])
    return {
        "image_ids": sorted(r["image_id"] for r in images),
        "seqs": sorted(r["seq"] for r in images),
        "counts": {t: len(rows(t, None)) for t in ("images", "sources", "thumbnails", "features", "rejects",
                                                   "image_quality", "grid", "grid_layouts")},
        "dup_groups": sorted(sorted(g) for g in dup.values() if len(g) > 1),
        "tags": len(rows("tags", ["image_id"])),
        "failed": [r for r in runs if r["state"] == "failed"],
    }


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_log(log: Path, text: str, pid: int, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while text not in (log.read_text() if log.exists() else ""):
        assert _alive(pid), f"{log.name} exited: {log.read_text()[-3000:] if log.exists() else ''}"
        assert time.monotonic() - t0 < timeout, f"{log.name}: no {text!r} after {timeout} s"
        time.sleep(0.2)


def _upload_images(store, folder: Path, prefix: str) -> int:
    n = 0
    for p in sorted(folder.rglob("*.png")):
        store.write_bytes(f"{prefix}/{p.relative_to(folder).as_posix()}", p.read_bytes())
        n += 1
    return n


def _cli(c: dict, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imagelake", "--lake", c["root"], "--master", c["master"], *args],
                            cwd=c["driver_dir"], env=c["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The S3 server with the images in its bucket, and master + 2 workers (1 core, 1 GiB each)."""
    base = tmp_path_factory.mktemp("s3cluster")
    server = S3Server()
    pid_dir = base / "pids"
    daemons: list[int] = []
    try:
        opts = server.storage_options()
        bucket = server.make_bucket()
        from lake.store import LakeStore

        store = LakeStore(f"s3://{bucket}", opts)
        src = base / "src"
        _images(src)
        assert _upload_images(store, src, "images") == 41
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1",
                   SPARK_PID_DIR=str(pid_dir), WAIT_S="120", IMAGELAKE_CACHE_DIR=str(base / "driver-cache"),
                   IMAGELAKE_ARTIFACT_CACHE_DIR=str(base / "driver-cache" / "artifacts"), **opts)
        env.pop("SPARK_LOCAL_DIRS", None)
        port = _free_port()
        master = f"spark://127.0.0.1:{port}"
        subprocess.run([SCRIPT, "master", "--host", "127.0.0.1", "--port", str(port), "--webui-port", "0"],
                       env=dict(env, NO_WAIT="1"), check=True, capture_output=True, timeout=60,
                       cwd=base, start_new_session=True)
        daemons.append(int((pid_dir / "master.pid").read_text()))
        nodes = []
        for i in (1, 2):
            node = base / f"node-{i}"   # this worker's only disk: its own cwd, work and local dirs
            (node / "local").mkdir(parents=True)
            subprocess.run([SCRIPT, "worker", master, "--cores", "1", "--memory", "1g", "--instance", str(i),
                            "--host", "127.0.0.1", "--webui-port", "0"],
                           env=dict(env, SPARK_LOCAL_DIRS=str(node / "local"), SPARK_WORKER_DIR=str(node / "work")),
                           check=True, capture_output=True, timeout=60, cwd=node, start_new_session=True)
            daemons.append(int((pid_dir / f"worker-{i}.pid").read_text()))
            nodes.append(node)
        _wait_log(pid_dir / "logs" / "master.out", "Starting Spark master at", daemons[0])
        for i, pid in ((1, daemons[1]), (2, daemons[2])):
            _wait_log(pid_dir / "logs" / f"worker-{i}.out", "Successfully registered with master", pid)
        conf = base / "conf"
        conf.mkdir()
        (conf / "spark-defaults.conf").write_text(
            (REPO / "infra" / "spark-defaults.conf").read_text()
            + "\nspark.executor.memory 512m\nspark.cores.max 2\nspark.driver.memory 1g\n")
        driver_dir = base / "driver"
        driver_dir.mkdir()
        env["SPARK_CONF_DIR"] = str(conf)
        c = dict(server=server, opts=opts, bucket=bucket, store=store, root=f"s3://{bucket}/lake",
                 images=f"s3://{bucket}/images", env=env, master=master, driver_dir=driver_dir, nodes=nodes,
                 daemons=daemons, base=base, src=src)
        t0 = time.monotonic()  # two runs at once: one proceeds, the other finds the lock held
        procs = [_cli(c, "run", "--images", c["images"], "--steps", _steps(), "--no-progress") for _ in range(2)]
        results = [(p.wait(900), *p.communicate()) for p in procs]
        c.update(first=next((r for r in results if r[0] == 0), results[0]), both=results,
                 first_s=time.monotonic() - t0)
        yield c
    finally:
        subprocess.run([SCRIPT, "stop"], env=dict(os.environ, SPARK_PID_DIR=str(pid_dir)), capture_output=True,
                       timeout=60)
        for pid in daemons:  # executors and their Python workers, should any be left
            for q in _tree(pid) if _alive(pid) else []:
                try:
                    os.kill(q, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        server.stop()


def _lake_tables(c: dict) -> dict:
    return _tables(c["root"], c["opts"])


def _assert_no_duplicates(c: dict) -> None:
    from deltalake import DeltaTable

    def rows(name, cols):
        return DeltaTable(f"{c['root']}/tables/{name}", storage_options=c["opts"]).to_pyarrow_table(
            columns=cols).to_pylist()

    images = rows("images", ["image_id", "seq"])
    ids = [r["image_id"] for r in images]
    assert len(ids) == len(set(ids)), "duplicated images"
    assert sorted(r["seq"] for r in images) == list(range(len(images))), "seq not dense and unique"
    feats = [(r["image_id"], r["model"]) for r in rows("features", ["image_id", "model"])]
    assert len(feats) == len(set(feats)), "duplicated features"
    thumbs = [(r["image_id"], r["size"]) for r in rows("thumbnails", ["image_id", "size"])]
    assert len(thumbs) == len(set(thumbs)), "duplicated thumbnails"
    uris = [r["uri"] for r in rows("sources", ["uri"])]
    assert len(uris) == len(set(uris)), "duplicated sources"


def test_every_step_on_the_cluster_into_the_bucket(cluster):
    rc, out, err = cluster["first"]
    assert rc == 0, err[-4000:]
    for step in _steps().split(","):
        assert f" {step} " in out or f"{step} " in out, (step, out)
    t = _lake_tables(cluster)
    # 41 files, 2 exact copies: paths, not images
    assert t["counts"]["images"] == 39 and t["counts"]["sources"] == 41 and t["counts"]["rejects"] == 0
    assert t["seqs"] == list(range(39)) and not t["failed"]
    assert t["counts"]["features"] == 39 and t["counts"]["thumbnails"] == 39 * 2
    assert t["tags"] > 0 and t["counts"]["grid"] >= 39
    assert len(t["dup_groups"]) >= 3, t["dup_groups"]  # the one-pixel near-duplicates at least
    keys = [o.key for o in cluster["store"].list("lake/artifacts")]
    assert any(k.startswith("lake/artifacts/index/") for k in keys), keys     # the FAISS build
    assert any(k.startswith("lake/artifacts/tiles/") for k in keys), keys
    assert not cluster["store"].list("lake/_staging"), "staging left by a succeeded run"
    # the tasks ran in executors both workers launched, under their own folders only
    for node in cluster["nodes"]:
        assert list((node / "work").glob("worker-*/app-*")), f"no executor on {node.name}"
    assert not any(cluster["driver_dir"].iterdir()), sorted(p.name for p in cluster["driver_dir"].iterdir())
    print(f"\nall steps on the 2-worker cluster into s3: {cluster['first_s']:.1f} s")


def test_two_runs_at_once_one_proceeds_the_other_exits_3(cluster):
    codes = sorted(rc for rc, _, _ in cluster["both"])
    assert codes == [0, 3], "\n".join(err[-2000:] for _, _, err in cluster["both"])
    loser = next(err for rc, _, err in cluster["both"] if rc == 3)
    assert "'pipeline' lock is held" in loser, loser


def test_same_results_as_the_local_lake(cluster):
    """The same run on a local lake (in-process runner) of the same files: equal ids, seq, row counts
    of every table, tags and near-duplicate groups."""
    rc, _, err = cluster["first"]
    assert rc == 0, err[-3000:]
    local_root = cluster["base"] / "local-lake"
    env = dict(os.environ, PYTHONPATH=str(REPO), IMAGELAKE_RUNNER="local",
               XDG_CACHE_HOME=str(cluster["base"] / "xdg-cache"))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "imagelake", "--lake", str(local_root), "run", "--images",
                        str(cluster["src"]), "--steps", "ingest,quality,embed,suggest,index,cluster,tag,grid",
                        "--no-progress"], env=env, capture_output=True, text=True, timeout=600, cwd=cluster["base"])
    assert p.returncode == 0, p.stderr[-3000:]
    local, s3 = _tables(str(local_root), None), _lake_tables(cluster)
    assert s3["image_ids"] == local["image_ids"] and s3["seqs"] == local["seqs"]
    assert s3["counts"] == local["counts"]
    assert s3["tags"] == local["tags"] > 0
    assert s3["dup_groups"] == local["dup_groups"]
    print(f"\nlocal run (in process) {time.monotonic() - t0:.1f} s")


def test_every_byte_went_to_the_bucket_and_staging_is_gone(cluster):
    rc, _, err = cluster["first"]
    assert rc == 0, err[-3000:]
    store = cluster["store"]
    keys = [o.key for o in store.list("lake/artifacts")]
    for kind, name in (("tiles", "manifest.json"), ("tiles", "cells.bin"), ("models", "model.onnx"),
                       ("clusters", "manifest.json"), ("index", "manifest.json"), ("suggest", "manifest.json")):
        assert any(k.startswith(f"lake/artifacts/{kind}/") and k.endswith(f"/{name}") for k in keys), (kind, name, keys)
    assert not store.list("lake/_staging"), [o.key for o in store.list("lake/_staging")]
    assert not any(cluster["driver_dir"].iterdir()), sorted(p.name for p in cluster["driver_dir"].iterdir())


def test_tiles_are_served_from_the_bucket(cluster, monkeypatch, tmp_path):
    """The grid's published layout, read back from the s3 lake: metadata, cells and tiles (a
    pre-rendered one and a deep one drawn from the cells' pack, fetched through the artifact cache)."""
    import io

    from jobs.grid.store import LayoutStore
    from lake.catalog import Lake

    for k, v in cluster["opts"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # this node's artifact cache
    monkeypatch.setenv("IMAGELAKE_ARTIFACT_CACHE_DIR", str(tmp_path / "cache" / "artifacts"))
    view = LayoutStore(Lake.at(cluster["root"])).view("latest")
    assert view.width * view.height >= 39
    tiles = view.tiles
    assert Image.open(io.BytesIO(tiles.tile(0, 0, 0))).size == (1, 1)
    assert Image.open(io.BytesIO(tiles.tile(tiles.pyramid.max_level, 0, 0))).format == "JPEG"


def test_janitor_sweeps_the_object_store_lake(cluster):
    store = cluster["store"]
    images = _lake_tables(cluster)["counts"]["images"]
    store.write_bytes("lake/_staging/ingest-killed/images/part-00000.parquet", b"partial")  # a killed run's file
    orphan = "lake/tables/images/part-00000-orphan.parquet"
    store.write_bytes(orphan, b"x")
    p = _cli(cluster, "janitor", "--older-than", "0")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "removed 1 staging folders, 1 orphan data files" in out, out
    assert not store.exists(orphan) and not store.list("lake/_staging")
    assert _lake_tables(cluster)["counts"]["images"] == images


def test_kill_9_of_a_worker_mid_embed_then_rerun_leaves_no_duplicates(cluster, tmp_path):
    rc, _, err = cluster["first"]
    assert rc == 0, err[-3000:]
    more = tmp_path / "more"
    write_photos(more, per_class=1, seed=77)  # 12 new views, one of each photo
    store = cluster["store"]
    n_new = _upload_images(store, more, "images/batch2")
    before = {o.key.split("/")[2] for o in store.list("lake/_staging")}

    def embed_staged() -> bool:
        return any(o.key.split("/")[2].startswith("embed-") and o.key.split("/")[2] not in before
                   and not o.key.split("/")[3].startswith("_") for o in store.list("lake/_staging"))

    proc = _cli(cluster, "run", "--images", cluster["images"], "--steps", "ingest,embed", "--no-progress")
    victim = cluster["daemons"][1]  # worker-1
    t0 = time.monotonic()
    while not embed_staged():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before embed staged a file: {err[-3000:]}")
        assert time.monotonic() - t0 < 300, "embed staged nothing within 300 s"
        time.sleep(0.05)
    killed = _tree(victim)
    for q in killed:
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out, err = proc.communicate(timeout=600)
    assert not _alive(victim)
    from deltalake import DeltaTable
    runs = DeltaTable(f"{cluster['root']}/tables/job_runs", storage_options=cluster["opts"]).to_pyarrow_table(
        columns=["run_id", "job", "state"]).to_pylist()
    if proc.returncode == 0:
        assert "embed" in out
    else:  # a clean failure: exit 1, one line naming the step, the run recorded as failed
        assert proc.returncode == 1, (proc.returncode, err[-3000:])
        assert any(r["state"] == "failed" and r["job"] in ("embed", "pipeline") for r in runs), runs
    _assert_no_duplicates(cluster)
    # the re-run on the worker left: completes the lake exactly, no duplicates
    again = _cli(cluster, "run", "--images", cluster["images"], "--steps", "ingest,embed", "--no-progress")
    out2, err2 = again.communicate(timeout=600)
    assert again.returncode == 0, err2[-3000:]
    _assert_no_duplicates(cluster)
    t = _lake_tables(cluster)
    assert t["counts"]["images"] == 39 + n_new, t["counts"]
    assert t["counts"]["features"] == 39 + n_new
    print(f"\nkilled worker-1 ({len(killed)} processes) {'; run completed' if proc.returncode == 0 else '; run failed'}"
          f" (exit {proc.returncode}); re-run exit 0")
