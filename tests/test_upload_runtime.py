"""POST /images embeds with the runtime the served index's features key names (``+int8.ort``:
ONNX Runtime on the lake's own calibrated int8 model), and answers 503 naming key and runtime when
that runtime cannot run in this process. Real ONNX Runtime, a real int8 embed run over 24 photo
crops, a real Flat build, real HTTP through Flask's test client; one module-scoped lake."""

from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

from bench_embed import generate  # noqa: E402  (real photo crops, 640x480 JPEGs)

from api import API_PREFIX, create_app  # noqa: E402
from api.uploads import UploadEmbedder  # noqa: E402
from jobs.embed import get_model, run_embed  # noqa: E402
from jobs.index.driver import latest_build, run_index  # noqa: E402
from jobs.runner import LocalRunner  # noqa: E402
from lake.catalog import Lake  # noqa: E402
from lake.commit import commit_rows, ensure_tables, open_table  # noqa: E402
from lake.errors import Unavailable  # noqa: E402
from lake.settings import Settings  # noqa: E402
from lake.tokens import create_token  # noqa: E402

LITE0 = get_model("efficientnet-lite0")
INT8 = f"{LITE0.key}+int8.ort"
N = 24
ADD = f"{API_PREFIX}/images"


@pytest.fixture(scope="module")
def int8_lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("upload-int8")
    os.makedirs(root / "images")
    paths = generate(str(root / "images"), N + 1)
    lake = Lake.at(root / "lake").ensure()
    ensure_tables(lake)
    rows = []
    for seq, p in enumerate(paths[:N]):
        blob = open(p, "rb").read()
        rows.append(dict(image_id=hashlib.sha256(blob).hexdigest(), seq=seq, uri=p, collection="t",
                         format="JPEG", width=640, height=480, bytes=len(blob)))
    commit_rows(lake, "images", rows, run_id="test-ingest")
    settings = Settings(lake=lake.root, runner="local", refresh_s=0.0)
    summary = run_embed(lake, settings, runner=LocalRunner(), runtime="ort-int8")
    assert summary["model"] == INT8
    run_index(lake, settings, INT8, runner=LocalRunner())
    app = create_app(settings, {"TESTING": True})
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {create_token(lake, 'admin', 'test')[1]}"
    yield lake, paths, client
    app.extensions["imagelake"].close()


def _features(lake: Lake, key: str) -> dict[str, np.ndarray]:
    rows = open_table(lake, "features").to_pyarrow_table().to_pylist()
    return {r["image_id"]: np.asarray(r["embedding"], np.float32) for r in rows if r["model"] == key}


def test_upload_embeds_with_the_keys_int8_runtime_and_is_searchable(int8_lake):
    lake, paths, client = int8_lake
    embedder = UploadEmbedder(Settings(lake=lake.root))
    # a lake image through the upload path equals the embed job's stored int8 vector, not fp32's
    blob = open(paths[3], "rb").read()
    stored = _features(lake, INT8)[hashlib.sha256(blob).hexdigest()]
    int8 = embedder.embed(blob, INT8).vector
    fp32 = embedder.embed(blob, LITE0.key).vector
    np.testing.assert_allclose(int8, stored, rtol=1e-5, atol=1e-5)
    assert np.abs(fp32 - stored).max() > 1e-3
    assert embedder._runtime(INT8)[1] is embedder._runtime(INT8)[1]  # built once per process and key

    new = open(paths[N], "rb").read()
    r = client.post(ADD, data={"image": (io.BytesIO(new), "new.jpg")})
    assert r.status_code == 201, r.get_data(as_text=True)
    body = r.get_json()
    new_id = hashlib.sha256(new).hexdigest()
    assert body["model"] == INT8 and body["image_id"] == new_id and body["indexed"]
    np.testing.assert_allclose(_features(lake, INT8)[new_id], embedder.embed(new, INT8).vector, rtol=1e-5, atol=1e-5)
    hits = client.get(f"{API_PREFIX}/search/similar", query_string={"image_id": new_id, "k": 3})
    assert hits.status_code == 200, hits.get_data(as_text=True)


def test_a_key_whose_runtime_is_missing_is_a_503_and_stores_nothing(int8_lake, tmp_path):
    lake, paths, client = int8_lake
    embedder = UploadEmbedder(Settings(lake=lake.root))
    blob = open(paths[5], "rb").read()
    with pytest.raises(Unavailable, match=r"\+fp16.*GPU"):
        embedder.embed(blob, f"{LITE0.key}+fp16")
    # the int8 model of another lake is not recalibrated in a request
    other = Lake.at(tmp_path / "other").ensure()
    with pytest.raises(Unavailable, match=r"int8 model .* missing"):
        UploadEmbedder(Settings(lake=other.root)).embed(blob, INT8)

    from jobs.embed.runtime import runtime_available

    if runtime_available("openvino-bf16")[0]:
        pytest.skip("OpenVINO bf16 runs here; the missing-runtime route case needs a machine without it")
    # serve a +bf16.openvino build (the int8 vectors copied under that key) as the default model
    key = f"{LITE0.key}+bf16.openvino"
    feats = open_table(lake, "features").to_pyarrow_table()
    mask = pa.compute.equal(feats.column("model"), INT8)
    copy = feats.filter(mask).set_column(feats.schema.get_field_index("model"), "model",
                                         pa.array([key] * int(mask.to_numpy().sum()), pa.string()))
    commit_rows(lake, "features", copy, run_id="test-copy")
    run_index(lake, Settings(lake=lake.root, runner="local"), key, runner=LocalRunner())
    assert latest_build(lake, key) is not None
    before = {t: open_table(lake, t).version() for t in ("images", "features")}
    new = open(generate(str(tmp_path), 1, seed=5)[0], "rb").read()
    r = client.post(ADD, data={"image": (io.BytesIO(new), "x.jpg")})
    assert r.status_code == 503, r.get_data(as_text=True)
    body = r.get_json()
    assert body["ok"] is False and key in body["error"] and "openvino-bf16" in body["error"]
    assert {t: open_table(lake, t).version() for t in ("images", "features")} == before
