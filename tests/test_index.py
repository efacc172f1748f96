"""The index job on real features: plan rule, recall, manifests, incremental shards, crashes, Spark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable

from api.index_service import SearchService
from photo_lake import copy_lake, photo_template
from jobs.index.build import file_sha256, read_manifest, verify_build
from jobs.index.driver import latest_build, published_builds, run_index
from jobs.index.plan import choose_plan
from jobs.runner import LocalRunner, SparkRunner
from lake.catalog import Lake
from lake.commit import commit_rows, open_table
from lake.errors import BadInput, LockHeld, NotFound
from lake.lock import LakeLock
from lake.settings import Settings
from lake.vectors import load_embeddings


N_IMAGES = 2000
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Lake:
    return photo_template(tmp_path_factory.getbasetemp(), N_IMAGES)[0]


@pytest.fixture
def lake(template, tmp_path) -> Lake:
    return copy_lake(template, tmp_path / "lake")


def settings_for(lake: Lake, **kw) -> Settings:
    return Settings(lake=lake.root, runner="local", refresh_s=0.0).replace(**kw)


def build(lake: Lake, **kw) -> dict:
    kw.setdefault("flat_below", 0)     # a few thousand vectors: exercise IVF-PQ, not the Flat fallback
    kw.setdefault("shard_size", 700)
    return run_index(lake, settings_for(lake), runner=LocalRunner(), **kw)


def recall_at_10(lake: Lake, service: SearchService, queries: int = 150) -> float:
    emb = load_embeddings(lake)
    x = emb.normalized()
    rng = np.random.default_rng(7)
    hits = []
    for qi in rng.choice(len(x), queries, replace=False):
        sims = x @ x[qi]
        sims[qi] = -np.inf
        exact = set(emb.seqs[np.argsort(-sims)[:10]].tolist())
        found = {h.seq for h in service.similar_to_image(emb.image_ids[qi], 10)}
        hits.append(len(exact & found) / 10)
    return float(np.mean(hits))


def remove_features(lake: Lake, seqs: list[int]) -> list[dict]:
    """Delete the features rows of images with these seqs (as if not embedded yet); return them."""
    images = open_table(lake, "images").to_pyarrow_table(columns=["image_id", "seq"]).to_pylist()
    ids = {r["image_id"] for r in images if r["seq"] in set(seqs)}
    table = DeltaTable(lake.table_uri("features"))
    rows = [r for r in table.to_pyarrow_table().to_pylist() if r["image_id"] in ids]
    table.delete("image_id IN (" + ", ".join(f"'{i}'" for i in sorted(ids)) + ")")
    return rows


# -- the plan rule --------------------------------------------------------------------------------

def test_plan_rule_flat_for_small_ivfpq_for_large_and_budget_limits():
    small = choose_plan(300, 1280, 2**30)
    assert small.kind == "flat" and small.factory == "IDMap2,Flat"
    big = choose_plan(1_000_000, 1280, 4096 * 2**20)
    assert big.factory == "IVF1024,PQ64" and big.nprobe == 32 and big.bytes_per_vector == 72
    assert big.train_n <= 256_000
    tight = choose_plan(1_000_000, 1280, 30 * 2**20)      # 31 bytes a vector: 16-byte codes
    assert tight.m == 16 and tight.bytes_per_vector <= 31
    few = choose_plan(2000, 1280, 2**30, flat_below=0)    # too few points for 256 PQ centroids
    assert few.nbits < 8 and few.nlist * 39 <= 2000
    assert choose_plan(10**6, 1280, 2**30, opq=True).factory.startswith("OPQ64,IVF")
    with pytest.raises(BadInput, match="too small"):
        choose_plan(10**6, 1280, 2**20)


# -- builds ---------------------------------------------------------------------------------------

def test_cpu_training_and_encoding_equal_faiss_own():
    """jobs/index/cputrain.py trains IVF-PQ per sub-quantizer in threads and encodes chunks in
    threads: FAISS's coarse centroids, FAISS's PQ training of the same residuals, the same lists,
    codes and ids as add_with_ids, and the recall of FAISS's own index.train."""
    import faiss

    from jobs.index import cputrain

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3000, 64)) + 3 * rng.standard_normal((12, 64))[rng.integers(0, 12, 3000)])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)
    ids = np.arange(3000, dtype=np.int64) * 7

    def fresh():
        index = faiss.index_factory(64, "IVF16,PQ8x4", faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(index).cp.niter = 6
        return index

    faiss.omp_set_num_threads(2)
    theirs = fresh()
    theirs.train(x)
    ours = cputrain.train(fresh(), x, threads=2)
    a, b = (faiss.downcast_index(faiss.extract_index_ivf(i)) for i in (theirs, ours))
    assert np.array_equal(a.quantizer.reconstruct_n(0, 16), b.quantizer.reconstruct_n(0, 16))
    assign = b.quantizer.assign(x, 1).ravel()
    residuals = np.empty_like(x)
    b.quantizer.compute_residual_n(len(x), faiss.swig_ptr(x), faiss.swig_ptr(residuals), faiss.swig_ptr(assign))
    pq = faiss.ProductQuantizer(64, 8, 4)
    pq.train(residuals)
    assert np.array_equal(faiss.vector_to_array(pq.centroids), faiss.vector_to_array(b.pq.centroids))

    reference = faiss.clone_index(ours)
    reference.add_with_ids(x, ids)
    cputrain.add_with_ids(ours, x.astype(np.float16), ids, threads=2, chunk=250)   # float16 rows, as stored
    c = faiss.extract_index_ivf(reference)
    for lst in range(16):
        size = c.invlists.list_size(lst)
        assert size == b.invlists.list_size(lst)
        assert np.array_equal(faiss.rev_swig_ptr(c.invlists.get_ids(lst), size),
                              faiss.rev_swig_ptr(b.invlists.get_ids(lst), size))
        assert np.array_equal(faiss.rev_swig_ptr(c.invlists.get_codes(lst), size * c.code_size),
                              faiss.rev_swig_ptr(b.invlists.get_codes(lst), size * b.code_size))

    theirs.add_with_ids(x, ids)
    exact = x[:200] @ x.T
    truth = ids[np.argsort(-exact, axis=1)[:, :10]]
    recall = []
    for index in (theirs, ours):
        index.nprobe = 4
        _, found = index.search(x[:200], 50)
        recall.append(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))
    assert recall[1] >= recall[0] - 0.02, recall


def test_full_build_publishes_a_verified_manifest_and_finds_true_neighbours(lake):
    summary = build(lake)
    assert summary["action"] == "full" and summary["ntotal"] == N_IMAGES and summary["shards"] == 3
    assert summary["factory"].startswith("IVF") and ",PQ" in summary["factory"]
    row = latest_build(lake)
    assert row["build_id"] == summary["build_id"] and row["kind"] == "full" and row["state"] == "published"
    manifest = verify_build(os.path.join(lake.artifacts_dir(), row["path"]), expected_manifest_sha256=row["manifest_sha256"])
    import faiss
    assert manifest["d"] == 1280 and manifest["ntotal"] == N_IMAGES and manifest["factory"] == row["factory"]
    assert manifest["faiss_version"] == faiss.__version__ == row["faiss_version"]
    assert manifest["source_version"] == open_table(lake, "features").version() == row["source_version"]
    assert manifest["model"] == row["model"] and "@" in row["model"]
    assert set(manifest["files"]) == {"seqs.npy", "ids.npy", "vectors.npy", "trained.faiss",
                                      "shard-00000.faiss", "shard-00001.faiss", "shard-00002.faiss"}
    for name, meta in manifest["files"].items():
        assert file_sha256(manifest.path(name)) == meta["sha256"]
    assert sorted(s["sha256"] for s in row["shards"]) == sorted(manifest["files"][s]["sha256"] for s in
                                                                 ("shard-00000.faiss", "shard-00001.faiss", "shard-00002.faiss"))
    assert sum(s["ntotal"] for s in row["shards"]) == N_IMAGES

    service = SearchService(settings_for(lake))
    assert recall_at_10(lake, service) >= 0.98
    emb = load_embeddings(lake)
    some = emb.seqs[[0, 5, 1999]]
    assert np.allclose(service.vectors(some), emb.normalized()[[0, 5, 1999]], atol=2e-3)
    assert service.seq_of(emb.image_ids[5]) == emb.seqs[5] and service.image_id_of(int(emb.seqs[5])) == emb.image_ids[5]
    assert service.seq_of("0" * 64) is None
    hits = service.similar_to_image(emb.image_ids[0], 20)
    assert len(hits) == 20 and emb.image_ids[0] not in {h.image_id for h in hits}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    again = build(lake)
    assert again["action"] == "up_to_date" and again["build_id"] == summary["build_id"]


def test_images_embedded_after_a_build_go_to_a_delta_shard_until_the_rebuild_rule(lake):
    held = remove_features(lake, list(range(1400, N_IMAGES)))          # 600 not embedded yet
    first = build(lake)
    assert first["action"] == "full" and first["ntotal"] == 1400
    by_seq = {r["image_id"]: r for r in held}
    images = {r["image_id"]: r["seq"] for r in open_table(lake, "images").to_pyarrow_table().to_pylist()}
    batch1 = [r for r in held if images[r["image_id"]] < 1650]                 # 250 <= 0.2 x 1400
    commit_rows(lake, "features", batch1, run_id="late-embed-1")
    inc = build(lake)
    assert inc["action"] == "incremental" and inc["delta"] == 250 and inc["ntotal"] == 1650
    assert inc["base_build_id"] == first["build_id"]
    row = latest_build(lake)
    assert row["kind"] == "incremental" and len(row["shards"]) == 2 + 1      # 1400 / 700 + the delta
    base_trained = read_manifest(lake.artifacts_dir("index", first["build_id"]))["files"]["trained.faiss"]
    assert not os.path.exists(os.path.join(lake.artifacts_dir(), "index", inc["build_id"], "trained.faiss"))

    service = SearchService(settings_for(lake))
    assert service.build().build_id == inc["build_id"]
    emb = load_embeddings(lake)
    late = [i for i, s in zip(emb.image_ids, emb.seqs) if 1400 <= s < 1650]
    for image_id in late[:40]:                                             # every late image is found
        vec = service.vectors([service.seq_of(image_id)])[0]
        top = service.similar_to_vector(vec, 1)[0]
        assert top.image_id == image_id and top.score == pytest.approx(1.0, abs=2e-3)
    assert recall_at_10(lake, service, 100) >= 0.98
    assert base_trained["sha256"] == file_sha256(os.path.join(lake.artifacts_dir(), "index", first["build_id"], "trained.faiss"))

    commit_rows(lake, "features", [by_seq[i] for i in by_seq if images[i] >= 1650], run_id="late-embed-2")
    full = build(lake)                                                     # 600 new > 0.2 x 1400: retrain
    assert full["action"] == "full" and full["ntotal"] == N_IMAGES and "index_rebuild_fraction" in full["reason"]
    assert service.build().build_id == full["build_id"]


def test_a_few_hundred_vectors_get_an_exact_flat_index(lake):
    remove_features(lake, list(range(300, N_IMAGES)))
    summary = run_index(lake, settings_for(lake), runner=LocalRunner())
    assert summary["factory"] == "IDMap2,Flat" and summary["ntotal"] == 300
    service = SearchService(settings_for(lake))
    assert recall_at_10(lake, service, 50) >= 0.995           # exact up to float16 ties


def test_bad_requests_are_clear_errors(lake, tmp_path):
    with pytest.raises(NotFound, match="no model"):
        run_index(lake, settings_for(lake), model="no-such-model", runner=LocalRunner())
    with pytest.raises(NotFound, match="embed"):
        run_index(lake, settings_for(lake), model="other@1", runner=LocalRunner())
    with pytest.raises(BadInput, match="memory budget"):
        build(lake, memory_budget_mb=0)
    with LakeLock(lake, "index", timeout=0):
        with pytest.raises(LockHeld):
            build(lake)
    assert published_builds(lake) == []


_BUILD_SCRIPT = """
import sys
from jobs.index.driver import run_index
from jobs.runner import LocalRunner
from lake.catalog import Lake
from lake.settings import Settings
lake = Lake.at(sys.argv[1])
run_index(lake, Settings(lake=lake.root, runner="local"), runner=LocalRunner(), rebuild=True, flat_below=0, shard_size=300)
"""


def test_kill_9_during_a_build_leaves_the_published_build_serving_and_a_rerun_works(lake):
    first = build(lake)
    service = SearchService(settings_for(lake))
    assert service.build().build_id == first["build_id"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, lake.root], env=env, cwd=ROOT,
                            start_new_session=True)
    index_dir = Path(lake.artifacts_dir("index"))
    deadline = time.monotonic() + 120
    killed_in = None
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in index_dir.iterdir() if p.name != first["build_id"]]
        if partial and any(f.name.startswith("shard-") or f.name == "trained.faiss" for f in partial[0].iterdir()):
            os.killpg(proc.pid, signal.SIGKILL)
            killed_in = partial[0]
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed_in is not None, "the build finished before it could be killed"
    assert not (killed_in / "manifest.json").exists() or latest_build(lake)["build_id"] == first["build_id"]
    assert latest_build(lake)["build_id"] == first["build_id"]
    assert service.refresh(force=True).build_id == first["build_id"]
    assert len(service.similar_to_image(load_embeddings(lake).image_ids[3], 5)) == 5

    again = build(lake, rebuild=True)
    assert again["action"] == "full" and latest_build(lake)["build_id"] == again["build_id"]
    assert not killed_in.exists()                     # the unfinished folder was pruned
    assert service.refresh(force=True).build_id == again["build_id"]


@pytest.mark.spark
def test_shards_encoded_on_spark_equal_the_local_ones(lake, spark, tmp_path):
    local = build(lake, shard_size=500)
    local_manifest = read_manifest(os.path.join(lake.artifacts_dir(), "index", local["build_id"]))
    runner = SparkRunner(settings_for(lake), spark=spark)
    on_spark = run_index(lake, settings_for(lake), runner=runner, rebuild=True, flat_below=0, shard_size=500)
    assert on_spark["action"] == "full" and on_spark["shards"] == 4
    spark_manifest = read_manifest(os.path.join(lake.artifacts_dir(), "index", on_spark["build_id"]))
    assert spark_manifest["files"]["trained.faiss"]["sha256"] == local_manifest["files"]["trained.faiss"]["sha256"]
    for shard in ("shard-00000.faiss", "shard-00003.faiss"):
        assert spark_manifest["files"][shard]["sha256"] == local_manifest["files"][shard]["sha256"]
    runs = open_table(lake, "job_runs").to_pyarrow_table().to_pylist()
    assert {json.loads(r["metrics"] or "{}").get("action") for r in runs if r["job"] == "index" and r["state"] == "succeeded"} == {"full"}


def test_cli_index_builds_then_is_up_to_date_and_a_concurrent_run_exits_3(lake):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "imagelake", "--lake", lake.root, "--runner", "local", "index",
                               *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    first = cli("--no-progress")
    assert first.returncode == 0, first.stderr
    assert "full build" in first.stdout and "IDMap2,Flat" in first.stdout and "2000 vectors" in first.stdout
    again = cli()
    assert again.returncode == 0 and "up to date" in again.stdout
    with LakeLock(lake, "index", timeout=0, holder="test"):
        held = cli()
    assert held.returncode == 3 and "lock" in held.stderr
    bad = cli("--memory-budget", "-5")
    assert bad.returncode == 2 and "memory budget" in bad.stderr
