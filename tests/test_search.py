"""Similarity search over HTTP: results, bounds, uploads and their limits, refused builds, health."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from api import API_PREFIX, create_app
from api.uploads import check_image
from photo_lake import copy_lake, photo_template
from jobs.index.driver import latest_build, run_index
from jobs.runner import LocalRunner
from lake.catalog import Lake
from lake.errors import BadInput, TooLarge, Unsupported
from lake.settings import Settings


URL = f"{API_PREFIX}/search/similar"


def build(lake: Lake, **kw) -> dict:
    return run_index(lake, Settings(lake=lake.root, runner="local"), runner=LocalRunner(), flat_below=0,
                     shard_size=1000, **kw)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> tuple[Lake, Path, dict]:
    template, images = photo_template(tmp_path_factory.getbasetemp(), 2000)
    lake = copy_lake(template, tmp_path_factory.mktemp("search") / "lake")
    return lake, images, build(lake)


@pytest.fixture
def lake(indexed) -> Lake:
    return indexed[0]


def assert_error(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"ok", "error", "status"} and body["ok"] is False and body["status"] == status
    return body


def image_ids(lake: Lake) -> list[str]:
    from lake.vectors import load_embeddings
    return load_embeddings(lake).image_ids


def png(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "PNG")
    return out.getvalue()


# -- GET by id ------------------------------------------------------------------------------------

def test_similar_by_id_returns_k_neighbours_without_the_query(client, lake, indexed):
    ids = image_ids(lake)
    body = client.get(URL, query_string={"image_id": ids[10], "k": 7}).get_json()
    assert body["ok"] is True and body["build_id"] == indexed[2]["build_id"]
    results = body["results"]
    assert len(results) == 7 and ids[10] not in {r["image_id"] for r in results}
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0001 for s in scores)
    from lake.vectors import load_embeddings
    emb = load_embeddings(lake)
    x = emb.normalized()
    sims = x @ x[10]
    sims[10] = -np.inf
    exact = {emb.image_ids[i] for i in np.argsort(-sims)[:7]}
    assert len(exact & {r["image_id"] for r in results}) >= 6
    thumb = client.get(results[0]["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.mimetype == "image/jpeg"
    assert len(client.get(URL, query_string={"image_id": ids[10]}).get_json()["results"]) == 20


@pytest.mark.parametrize("query", [{"k": "5"}, {"image_id": "xyz", "k": 5}, {"image_id": "A" * 64},
                                   {"image_id": "{id}", "k": 0}, {"image_id": "{id}", "k": 101},
                                   {"image_id": "{id}", "k": "ten"}])
def test_bad_parameters_are_400(client, lake, query):
    query = {k: (v.format(id=image_ids(lake)[0]) if isinstance(v, str) else v) for k, v in query.items()}
    assert_error(client.get(URL, query_string=query), 400)


def test_unknown_image_is_404(client):
    assert "0" * 64 in assert_error(client.get(URL, query_string={"image_id": "0" * 64}), 404)["error"]


def test_no_published_build_is_503(lake_factory):
    empty = lake_factory("empty")
    from lake.tokens import create_token
    token = create_token(empty, "admin", "t")[1]
    app = create_app(Settings(lake=empty.root, refresh_s=0.0), {"TESTING": True})
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    body = assert_error(client.get(URL, query_string={"image_id": "0" * 64}), 503)
    assert "imagelake index" in body["error"]
    assert_error(client.post(URL, data={"image": (io.BytesIO(png(np.zeros((8, 8), np.uint8))), "a.png")}), 503)
    assert client.get(f"{API_PREFIX}/health").get_json()["builds"] == {}


# -- POST an image --------------------------------------------------------------------------------

def test_upload_is_embedded_like_the_job_and_excludes_itself(client, lake, indexed):
    images = indexed[1]
    path = sorted(images.rglob("*.png"))[3]
    data = path.read_bytes()
    own = hashlib.sha256(data).hexdigest()
    by_upload = client.post(URL, data={"image": (io.BytesIO(data), path.name), "k": "8"})
    assert by_upload.status_code == 200, by_upload.get_data(as_text=True)
    by_id = client.get(URL, query_string={"image_id": own, "k": 8}).get_json()["results"]
    results = by_upload.get_json()["results"]
    assert own not in {r["image_id"] for r in results}
    # the same pixels through the same decode + model: the same neighbours (ties may swap places)
    assert results[0]["image_id"] == by_id[0]["image_id"]
    assert len({r["image_id"] for r in results} & {r["image_id"] for r in by_id}) >= 7
    assert abs(results[0]["score"] - by_id[0]["score"]) < 2e-3

    from lake.tokens import create_token
    reader = client.application.test_client()
    reader.environ_base["HTTP_AUTHORIZATION"] = "Bearer " + create_token(lake, "read", "reader")[1]
    assert reader.post(URL, data={"image": (io.BytesIO(data), path.name)}).status_code == 200   # read scope suffices

    new = np.asarray(Image.open(path)).copy()
    new[:4, :4] = 255                                     # an image the lake does not have
    body = client.post(f"{URL}?k=3", data={"image": (io.BytesIO(png(new)), "new.png")}).get_json()
    assert body["ok"] and len(body["results"]) == 3


def test_upload_limits(lake, indexed):
    app = create_app(Settings(lake=lake.root, refresh_s=0.0, auth=False, upload_max_bytes=200_000), {"TESTING": True})
    client = app.test_client()
    noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), np.uint8)
    assert "200000 bytes" in assert_error(client.post(URL, data={"image": (io.BytesIO(png(noise)), "big.png")}), 413)["error"]
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, "PNG")    # 100 Mpx in a few kB
    assert len(bomb.getvalue()) < 200_000
    assert "pixels" in assert_error(client.post(URL, data={"image": (io.BytesIO(bomb.getvalue()), "bomb.png")}), 413)["error"]
    ppm = io.BytesIO()
    Image.new("RGB", (20, 20)).save(ppm, "PPM")
    assert "PPM" in assert_error(client.post(URL, data={"image": (io.BytesIO(ppm.getvalue()), "a.ppm")}), 415)["error"]
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 100
    assert "HEIC" in assert_error(client.post(URL, data={"image": (io.BytesIO(heic), "a.heic")}), 415)["error"]
    assert "not an image" in assert_error(client.post(URL, data={"image": (io.BytesIO(b"hello, world"), "a.txt")}), 400)["error"]
    jpeg = io.BytesIO()
    Image.fromarray(noise).save(jpeg, "JPEG")
    assert_error(client.post(URL, data={"image": (io.BytesIO(jpeg.getvalue()[:3000]), "cut.jpg")}), 400)
    assert_error(client.post(URL, data={"other": (io.BytesIO(b"x"), "a.png")}), 400)
    assert_error(client.post(URL, data={"image": (io.BytesIO(b""), "empty.png")}), 400)
    assert_error(client.post(URL, json={"image": "x"}), 400)


def test_check_image_is_reusable_without_a_request():
    assert check_image(png(np.zeros((4, 6), np.uint8)), max_pixels=100) == ("PNG", 6, 4)
    with pytest.raises(TooLarge):
        check_image(png(np.zeros((20, 20), np.uint8)), max_pixels=100)
    with pytest.raises(Unsupported):
        out = io.BytesIO()
        Image.new("RGB", (2, 2)).save(out, "PPM")
        check_image(out.getvalue(), max_pixels=100)
    with pytest.raises(BadInput):
        check_image(b"GIF89a nope", max_pixels=100)


# -- refused builds keep the previous one serving ------------------------------------------------

def _truncate_shard(folder: Path) -> None:
    shard = folder / "shard-00001.faiss"
    shard.write_bytes(shard.read_bytes()[:-1000])


def _flip_one_byte(folder: Path) -> None:
    shard = folder / "shard-00000.faiss"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated shard", "one flipped byte", "newer faiss"])
def test_a_refused_build_keeps_the_previous_one_serving_and_health_says_so(indexed, tmp_path, monkeypatch, damage):
    lake = copy_lake(indexed[0], tmp_path / "lake")
    app = create_app(Settings(lake=lake.root, refresh_s=0.0, auth=False), {"TESTING": True})
    client = app.test_client()
    query = {"image_id": image_ids(lake)[0], "k": 5}
    before = client.get(URL, query_string=query).get_json()
    first = before["build_id"]

    if damage == "newer faiss":
        import jobs.index.driver as driver
        monkeypatch.setattr(driver, "faiss_version", lambda: "99.1.0")
    second = build(lake, rebuild=True)["build_id"]
    monkeypatch.undo()
    folder = Path(lake.artifacts_dir("index", second))
    if damage == "truncated shard":
        _truncate_shard(folder)
    elif damage == "one flipped byte":
        _flip_one_byte(folder)
    assert latest_build(lake)["build_id"] == second

    after = client.get(URL, query_string=query).get_json()
    assert after["build_id"] == first and after["results"] == before["results"]
    index = client.get(f"{API_PREFIX}/health").get_json()["builds"]["index"]
    assert index["state"] == "serving_previous" and index["build_id"] == first
    assert index["published_build_id"] == second
    [refused] = index["refused"]
    assert refused["build_id"] == second
    expected = {"truncated shard": "truncated", "one flipped byte": "sha256", "newer faiss": "newer"}[damage]
    assert expected in refused["error"]

    fresh = create_app(Settings(lake=lake.root, refresh_s=0.0, auth=False), {"TESTING": True}).test_client()
    assert fresh.get(URL, query_string=query).get_json()["build_id"] == first   # a new process falls back too


def test_a_new_build_is_picked_up_without_restart_and_openapi_documents_search(indexed, tmp_path):
    lake = copy_lake(indexed[0], tmp_path / "lake")
    app = create_app(Settings(lake=lake.root, refresh_s=0.0, auth=False), {"TESTING": True})
    client = app.test_client()
    query = {"image_id": image_ids(lake)[1], "k": 5}
    first = client.get(URL, query_string=query).get_json()["build_id"]
    second = build(lake, rebuild=True)["build_id"]
    assert second != first and client.get(URL, query_string=query).get_json()["build_id"] == second
    health = client.get(f"{API_PREFIX}/health").get_json()["builds"]["index"]
    assert health["state"] == "serving" and health["build_id"] == second and health["ntotal"] == 2000
    spec = client.get(f"{API_PREFIX}/openapi.json").get_json()
    ops = spec["paths"]["/search/similar"]
    assert {"get", "post"} <= set(ops) and "503" in ops["get"]["responses"] and "415" in ops["post"]["responses"]
    assert json.dumps(spec)  # serialisable
    assert os.path.isdir(lake.artifacts_dir("index", first))                   # kept for processes still on it
