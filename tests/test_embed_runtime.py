"""CPU runtime selection by measurement: the catalog, the quality gate, the per-machine cache, the
int8 QDQ model calibrated on the lake's own images, ``--runtime``, and the model loading once per
worker process. Real ONNX Runtime / torch on 24 real photo crops in a Delta lake in tmp_path; the
export and the int8 calibration happen once per module (module-scoped lake)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

from bench_embed import generate  # noqa: E402  (real photo crops, 640x480 JPEGs)

from jobs.embed import get_model, run_embed  # noqa: E402
from jobs.embed import choose as choose_mod  # noqa: E402
from jobs.embed import runtime as rt  # noqa: E402
from jobs.embed.models import parse_key, split_key  # noqa: E402
from jobs.runner import LocalRunner  # noqa: E402
from lake.catalog import Lake  # noqa: E402
from lake.commit import commit_rows, ensure_tables, open_table  # noqa: E402
from lake.errors import BadInput  # noqa: E402
from lake.settings import Settings  # noqa: E402

LITE0 = get_model("efficientnet-lite0")
SETTINGS = Settings(runner="local")
N = 24


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Lake:
    root = tmp_path_factory.mktemp("runtime")
    os.makedirs(root / "images")
    paths = generate(str(root / "images"), N)
    lake = Lake.at(root / "lake").ensure()
    ensure_tables(lake)
    rows = []
    for seq, p in enumerate(paths):
        blob = open(p, "rb").read()
        rows.append(dict(image_id=hashlib.sha256(blob).hexdigest(), seq=seq, uri=p, collection="t",
                         format="JPEG", width=640, height=480, bytes=len(blob)))
    commit_rows(lake, "images", rows, run_id="test-ingest")
    return lake


def _features(lake: Lake, key: str) -> dict[str, np.ndarray]:
    rows = open_table(lake, "features").to_pyarrow_table().to_pylist()
    return {r["image_id"]: np.asarray(r["embedding"]) for r in rows if r["model"] == key}


def test_features_key_grammar_names_precision_and_engine():
    assert LITE0.key_for("int8", "ort") == f"{LITE0.key}+int8.ort"
    assert LITE0.key_for("bf16", "openvino") == f"{LITE0.key}+bf16.openvino"
    assert LITE0.key_for("bf16") == LITE0.key_for("bf16", "torch") == f"{LITE0.key}+bf16"
    assert LITE0.key_for("fp32", "openvino") == LITE0.key  # fp32 runtimes agree to rounding: one key
    assert parse_key(f"{LITE0.key}+int8.ort") == (LITE0.key, "int8", "ort")
    assert split_key(f"{LITE0.key}+bf16.openvino") == (LITE0.key, "bf16")
    assert parse_key(LITE0.key) == (LITE0.key, "fp32", None)
    for bad, msg in [("m@1+int8", "names its engine"), ("m@1+bf16.tensorrt", "names engine"),
                     ("m@1+int4.ort", "names precision")]:
        with pytest.raises(BadInput, match=msg):
            parse_key(bad)
    with pytest.raises(BadInput, match="not torch"):
        LITE0.key_for("int8")


def test_catalog_availability_follows_cpu_flags_and_installed_packages(monkeypatch):
    desc, mid = rt.machine_id()
    assert len(mid) == 12 and rt.cpu_info()["model"] in desc
    assert rt.runtime_available("ort-fp32") == (True, "")
    monkeypatch.setattr(rt, "cpu_info", lambda: {"model": "old", "flags": ["avx2", "fma"]})
    ok, why = rt.runtime_available("torch-bf16")
    assert not ok and "amx_bf16" in why
    import importlib.util
    if importlib.util.find_spec("openvino") is None:
        assert rt.runtime_available("openvino-fp32") == (False, "the 'openvino' package is not installed")
    with pytest.raises(BadInput, match="unknown runtime 'tensorrt'"):
        rt.runtime_available("tensorrt")


def test_quality_gate_figures():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 32)).astype(np.float32)
    logits = rng.normal(size=(40, 10)).astype(np.float32)
    same = rt.gate((emb, logits), (emb.copy(), logits.copy()))
    assert same == dict(recall10=1.0, top1=1.0, cosine_min=pytest.approx(1.0, abs=1e-6), passed=True)
    noisy = rt.gate((emb, logits), (emb + rng.normal(scale=0.8, size=emb.shape).astype(np.float32), logits))
    assert noisy["recall10"] < 0.98 and noisy["top1"] == 1.0 and not noisy["passed"]
    flipped = logits.copy()
    flipped[:2] = -flipped[:2]  # 2 of 40 = 5 % disagree on the top concept
    assert not rt.gate((emb, logits), (emb, flipped))["passed"]


def test_auto_measures_every_runtime_keeps_the_fastest_that_passes_and_caches_it(lake, monkeypatch):
    monkeypatch.delenv(choose_mod.ENV_PIN, raising=False)
    monkeypatch.setattr(choose_mod, "CALIBRATION_N", N)
    monkeypatch.setattr(choose_mod, "MEASURE_SECONDS", 0.2)
    summary = run_embed(lake, SETTINGS, runner=LocalRunner(), runtime="auto")
    assert summary["runtime_source"] == "measured" and summary["embedded"] == N
    ms = {m["name"]: m for m in summary["runtime_measurements"]}
    assert set(ms) == {n for n, e in rt.CATALOG.items() if e.auto}
    for name, m in ms.items():
        ok, why = rt.runtime_available(name)
        assert (m["error"] == why) if not ok else (m["img_s"] > 0 and 0 <= m["recall10"] <= 1)
        assert m["passed"] == (not m["error"] and m["recall10"] >= 0.98 and m["top1"] >= 0.98)
    assert ms["ort-fp32"]["passed"] and ms["ort-fp32"]["recall10"] == 1.0
    best = max((m for m in ms.values() if m["passed"]), key=lambda m: m["img_s"])
    assert summary["runtime"] == best["name"]
    entry = rt.CATALOG[best["name"]]
    assert summary["model"] == LITE0.key_for(entry.precision, entry.key_engine)
    assert len(_features(lake, summary["model"])) == N
    desc, mid = rt.machine_id()
    cache = json.loads(Path(lake.artifacts_dir("runtimes", LITE0.key, f"{mid}.json")).read_text())
    assert cache["choice"] == best["name"] and cache["machine"] == desc and cache["calibration_images"] == N
    # the second run on this machine does not measure again, and has nothing left to embed
    again = run_embed(lake, SETTINGS, runner=LocalRunner(), runtime="auto")
    assert again["runtime_source"] == "cached" and again["runtime"] == best["name"] and again["embedded"] == 0
    runs = [json.loads(r["args"]) for r in open_table(lake, "job_runs").to_pyarrow_table().to_pylist()
            if r["job"] == "embed"]
    assert all(a.get("runtime") == best["name"] for a in runs)


def test_runtime_override_int8_uses_the_lakes_calibrated_qdq_model(lake, monkeypatch):
    monkeypatch.delenv(choose_mod.ENV_PIN, raising=False)
    fp32 = run_embed(lake, SETTINGS, runner=LocalRunner(), runtime="ort-fp32")
    int8 = run_embed(lake, SETTINGS, runner=LocalRunner(), runtime="ort-int8")
    assert int8["model"] == f"{LITE0.key}+int8.ort" and int8["precision"] == "int8"
    assert int8["embedded"] == N and int8["runtimes"] == ["onnxruntime-int8"]
    a, b = _features(lake, LITE0.key), _features(lake, int8["model"])
    assert set(a) == set(b)
    cos = [float(a[k] @ b[k] / np.linalg.norm(a[k]) / np.linalg.norm(b[k])) for k in a]
    assert min(cos) > 0.7 and max(abs(a[k] - b[k]).max() for k in a) > 1e-3  # int8, not fp32 again
    from jobs.embed.artifact import artifact_dir
    folder = Path(artifact_dir(lake.artifacts_dir(), LITE0))
    manifest = json.loads((folder / "int8-manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256((folder / "int8-qdq.onnx").read_bytes()).hexdigest()
    assert fp32["model"] == LITE0.key


def test_bad_runtime_names_are_refused_with_the_list(lake, monkeypatch):
    from imagelake.cli import main

    with pytest.raises(BadInput, match="unknown runtime 'fastest'; one of auto, ort-fp32"):
        run_embed(lake, SETTINGS, runner=LocalRunner(), runtime="fastest")
    with pytest.raises(BadInput, match="--runtime names a CPU runtime"):
        run_embed(lake, SETTINGS, runner=LocalRunner(), runtime="ort-fp32", precision="bf16")
    monkeypatch.setattr(rt, "cpu_info", lambda: {"model": "old", "flags": ["avx2"]})
    with pytest.raises(BadInput, match="torch-bf16 cannot run on this machine: the CPU has none of"):
        run_embed(lake, SETTINGS, runner=LocalRunner(), runtime="torch-bf16")
    assert main(["--lake", str(lake.root), "embed", "--runtime", "fastest", "--no-progress"]) == 2


def test_the_model_loads_once_per_worker_process_not_per_task(lake, monkeypatch):
    """Three tasks in one worker process (as Spark reuses its Python workers): one model load."""
    import pyarrow as pa

    from jobs.embed.artifact import ensure_onnx
    from jobs.embed.partition import EmbedJob, embed_partition
    from jobs.runner import PartitionContext

    built = []
    real = rt.build_runtime
    monkeypatch.setattr(rt, "build_runtime", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(rt, "_CACHE", {})
    art = ensure_onnx(lake.artifacts_dir(), LITE0)
    images = open_table(lake, "images").to_pyarrow_table().select(["image_id", "uri"])
    job = EmbedJob(spec=LITE0, run_id="once", staging_dir=lake.staging_dir("once"), device="cpu",
                   artifact=art, runtime="ort-fp32", batch_size=4, threads=1, decode_threads=1)
    stats = [list(embed_partition(iter(images.slice(8 * i, 8).to_batches()), PartitionContext(i), job=job))[0]
             for i in range(3)]
    assert [s.column("n_ok")[0].as_py() for s in stats] == [8, 8, 8]
    assert built == ["ort-fp32"]


def test_gpu_decode_path_falls_back_to_the_cpu_decoder_and_its_resize_matches_pil(lake):
    """No GPU here: decode_batch takes the CPU decoder for every file (same pixels as the job's
    decoder), and the device resize (run on CPU tensors) gives the model nearly the same input."""
    import torch

    from jobs.embed.decode import decode_image
    from jobs.embed.gpu_decode import _resize_on_device, decode_batch, gpu_decode_available

    uris = open_table(lake, "images").to_pyarrow_table().column("uri").to_pylist()[:3]
    datas = [open(u, "rb").read() for u in uris] + [b"not an image"]
    assert not gpu_decode_available("cuda")
    out = decode_batch(datas, 224, 0.875, "cpu")
    assert out[3].reason == "decode_error"
    for data, t in zip(datas, out[:3]):
        assert np.array_equal(t.numpy(), decode_image(data, 224, 0.875))
    from PIL import Image
    import io as _io
    full = np.array(Image.open(_io.BytesIO(datas[0])).convert("RGB"))
    dev = _resize_on_device(torch.from_numpy(full).permute(2, 0, 1).contiguous(), 224, 0.875).numpy()
    ref = decode_image(datas[0], 224, 0.875, draft=False)
    assert dev.shape == ref.shape and np.abs(dev.astype(int) - ref).mean() < 4


def test_index_gpu_helpers_are_the_cpu_calls_without_a_gpu():
    import faiss

    from jobs.index import gpu

    assert gpu.gpu_count() == 0
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 16)).astype(np.float32)
    index = gpu.train(faiss.index_factory(16, "IVF8,PQ4x4", faiss.METRIC_INNER_PRODUCT), x)
    assert index.is_trained
    index = gpu.add_with_ids(index, x, np.arange(1000), chunk=300)
    assert index.ntotal == 1000
    _, found = index.search(x[:5], 1)
    assert found.shape == (5, 1) and (found >= 0).all()


def test_shard_encoder_uses_the_gpu_path_when_faiss_sees_one_and_falls_back_to_the_cpu(tmp_path, monkeypatch):
    """No GPU here: the CPU shard equals add_with_ids; then the GPU branch of the shard encoder is
    driven with a CPU stand-in for the GPU clone (``FakeGpuClone``: faiss-cpu has no GPU index), and
    a GPU that fails mid-shard leaves the CPU encoding of a fresh copy of the trained index."""
    import faiss
    import pyarrow as pa

    from jobs.index import gpu
    from jobs.index.build import file_sha256
    from jobs.index.partition import SHARD_ROWS_SCHEMA, EncodeJob, encode_partition
    from jobs.runner import PartitionContext

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 16)).astype(np.float16)
    np.save(tmp_path / "vectors.npy", x)
    np.save(tmp_path / "seqs.npy", np.arange(1000, dtype=np.int64) * 3)
    index = faiss.index_factory(16, "IVF8,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    index.train(x.astype(np.float32))
    faiss.write_index(index, str(tmp_path / "trained.faiss"))
    job = EncodeJob(folder=str(tmp_path), trained_path=str(tmp_path / "trained.faiss"),
                    trained_sha256=file_sha256(str(tmp_path / "trained.faiss")), threads=1)
    rows = pa.table({"shard": pa.array([0], pa.int32()), "start": pa.array([100], pa.int64()),
                     "end": pa.array([900], pa.int64())}, schema=SHARD_ROWS_SCHEMA)

    def encode():
        stats = list(encode_partition(iter(rows.to_batches()), PartitionContext(0), job=job))[0].to_pylist()[0]
        shard = faiss.read_index(str(tmp_path / stats["file"]))  # kept alive while its IVF view is read
        ivf = faiss.extract_index_ivf(shard)
        lists = [(ivf.get_list_size(i), faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.get_list_size(i)).copy())
                 for i in range(ivf.nlist)]  # (size, ids) per inverted list, copied out of the index
        return stats, lists

    cpu_stats, cpu_shard = encode()
    assert cpu_stats["device"] == "cpu" and cpu_stats["ntotal"] == 800
    assert (cpu_stats["seq_min"], cpu_stats["seq_max"]) == (300, 2697)

    class FakeGpuClone:  # stands in for faiss.index_cpu_to_gpu's GPU index (a CPU index underneath)
        clones, fail_after = 0, None

        def __init__(self, index):
            FakeGpuClone.clones += 1
            self.index, self.added = faiss.clone_index(index), 0

        def add_with_ids(self, v, ids):
            if FakeGpuClone.fail_after is not None and self.added >= FakeGpuClone.fail_after:
                raise RuntimeError("CUDA out of memory (stand-in)")
            self.index.add_with_ids(v, ids)
            self.added += len(v)

    monkeypatch.setattr(gpu, "gpu_count", lambda: 1)
    monkeypatch.setattr(gpu, "_to_gpu", lambda index, device=0: FakeGpuClone(index))
    monkeypatch.setattr(gpu, "_to_cpu", lambda clone: clone.index)
    for fail_after, device in [(None, "cuda:0"), (0, "cpu")]:
        FakeGpuClone.fail_after = fail_after
        stats, shard = encode()
        assert stats["device"] == device and stats["ntotal"] == 800
        assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(shard, cpu_shard))  # same lists
    assert FakeGpuClone.clones == 2


def test_embed_tasks_are_a_multiple_of_the_task_slots(lake, tmp_path):
    """24 pending images at 5 a task would be 5 tasks, the fifth alone on one of 2 slots: 6 of 4."""
    import pyarrow.parquet as pq

    from jobs.embed.driver import stage_pending

    staged = stage_pending(lake, "never-embedded@1", str(tmp_path / "staging"), partition_rows=5, min_partitions=2)
    assert staged.num_partitions == 6 and staged.num_rows == N
    assert [pq.read_metadata(f).num_rows for f in staged.files] == [4] * 6
    one_slot = stage_pending(lake, "never-embedded@1", str(tmp_path / "staging1"), partition_rows=5)
    assert one_slot.num_partitions == 5
