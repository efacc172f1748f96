"""Uploads: tag an image without storing it (POST /tag), add one to the lake (POST /images)."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from api import API_PREFIX, create_app
from photo_lake import copy_lake, photo_template
from jobs.index.driver import latest_build, run_index
from jobs.runner import LocalRunner
from lake.catalog import Lake
from lake.commit import open_table
from lake.lock import LakeLock
from lake.settings import Settings
from lake.tokens import create_token


TAG, ADD, SIMILAR = f"{API_PREFIX}/tag", f"{API_PREFIX}/images", f"{API_PREFIX}/search/similar"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> tuple[Lake, Path, dict]:
    """A copy of the shared photo lake (tests/photo_lake.py, real features) with a published IVF build."""
    template, images = photo_template(tmp_path_factory.getbasetemp(), 2000)
    lake = copy_lake(template, tmp_path_factory.mktemp("upload") / "lake")
    build = run_index(lake, Settings(lake=lake.root, runner="local"), runner=LocalRunner(), flat_below=0,
                      shard_size=1000)
    return lake, images, build


@pytest.fixture
def lake(indexed) -> Lake:
    return indexed[0]


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "JPEG", quality=quality)
    return out.getvalue()


def variant(images: Path, index: int, seed: int) -> tuple[bytes, str]:
    """An image of the lake with one pixel nudged (new bytes, same picture); and the original's id."""
    path = sorted(images.rglob("*.png"))[index]
    original = path.read_bytes()
    arr = np.array(Image.open(io.BytesIO(original)))
    flat = arr.reshape(-1)
    flat[seed % flat.size] = (int(flat[seed % flat.size]) + 1 + seed) % 256
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "PNG")
    return out.getvalue(), hashlib.sha256(original).hexdigest()


def versions(lake: Lake) -> dict[str, int]:
    return {t: open_table(lake, t).version() for t in ("images", "sources", "features", "index_builds", "job_runs")}


def assert_error(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"ok", "error", "status"} and body["ok"] is False and body["status"] == status
    return body


# -- POST /tag --------------------------------------------------------------------------------------

def test_tag_coffee_says_espresso_and_stores_nothing(client, lake):
    from skimage import data as skdata

    before = versions(lake)
    response = client.post(TAG, data={"image": (io.BytesIO(jpeg(skdata.coffee())), "coffee.jpg")})
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    concepts = [t for t in body["tags"] if t["source"] == "concept"]
    assert "espresso" in {t["tag"] for t in concepts}
    assert concepts[0]["tag"] == "espresso" and 0 < concepts[0]["score"] <= 1
    assert body["image_id"] is None and len(body["sha256"]) == 64
    assert versions(lake) == before


def test_tag_names_an_image_already_in_the_lake(client, lake, indexed):
    path = sorted(indexed[1].rglob("*.png"))[5]
    body = client.post(TAG, data={"image": (io.BytesIO(path.read_bytes()), path.name)}).get_json()
    assert body["image_id"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert body["tags"] and all(t["source"] in ("concept", "learned") for t in body["tags"])


def test_tag_gives_learned_tags_of_the_current_model(client, lake, indexed):
    ids = sorted(open_table(lake, "images").to_pyarrow_table(columns=["image_id"]).column("image_id").to_pylist())
    for image_id in ids[:3]:
        r = client.post(f"{API_PREFIX}/images/{image_id}/tags", json={"add": ["wardrobe"]})
        assert r.status_code == 200, r.get_data(as_text=True)
    path = sorted(indexed[1].rglob("*.png"))[7]
    body = client.post(TAG, data={"image": (io.BytesIO(path.read_bytes()), path.name)}).get_json()
    assert body["model_version"] >= 1
    assert {"tag": "wardrobe", "source": "learned"} in [{"tag": t["tag"], "source": t["source"]} for t in body["tags"]]


# -- limits and scopes (both routes) ------------------------------------------------------------------

@pytest.mark.parametrize("url", [TAG, ADD])
def test_upload_limits_on_both_routes(lake, url):
    app = create_app(Settings(lake=lake.root, refresh_s=0.0, auth=False, upload_max_bytes=200_000), {"TESTING": True})
    client = app.test_client()
    before = versions(lake)
    noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), np.uint8)
    big = io.BytesIO()
    Image.fromarray(noise).save(big, "PNG")
    assert "200000 bytes" in assert_error(client.post(url, data={"image": (io.BytesIO(big.getvalue()), "b.png")}), 413)["error"]
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, "PNG")
    assert "pixels" in assert_error(client.post(url, data={"image": (io.BytesIO(bomb.getvalue()), "bomb.png")}), 413)["error"]
    ppm = io.BytesIO()
    Image.new("RGB", (20, 20)).save(ppm, "PPM")
    assert "PPM" in assert_error(client.post(url, data={"image": (io.BytesIO(ppm.getvalue()), "a.ppm")}), 415)["error"]
    assert "not an image" in assert_error(client.post(url, data={"image": (io.BytesIO(b"hello"), "a.txt")}), 400)["error"]
    assert_error(client.post(url, data={"image": (io.BytesIO(jpeg(noise)[:3000]), "cut.jpg")}), 400)
    assert_error(client.post(url, json={"image": "x"}), 400)
    app.extensions["imagelake"].close()
    assert versions(lake) == before
    assert not any(Path(lake.root, "uploads").rglob("*.png")) if Path(lake.root, "uploads").exists() else True


def test_scopes(app, lake, indexed):
    client = app.test_client()
    small = (sorted(indexed[1].rglob("*.png"))[9]).read_bytes()
    assert_error(client.post(TAG, data={"image": (io.BytesIO(small), "a.png")}), 401)
    assert_error(client.post(ADD, data={"image": (io.BytesIO(small), "a.png")}), 401)
    read = create_token(lake, "read", "reader")[1]
    headers = {"Authorization": f"Bearer {read}"}
    assert client.post(TAG, data={"image": (io.BytesIO(small), "a.png")}, headers=headers).status_code == 200
    assert_error(client.post(ADD, data={"image": (io.BytesIO(small), "a.png")}, headers=headers), 403)
    curate = create_token(lake, "curate", "curator")[1]
    ok = client.post(ADD, data={"image": (io.BytesIO(small), "a.png")}, headers={"Authorization": f"Bearer {curate}"})
    assert ok.status_code == 200 and ok.get_json()["created"] is False   # a lake image: nothing to add


def test_bad_collection_is_refused(client, lake, indexed):
    data, _ = variant(indexed[1], 11, 1)
    assert_error(client.post(ADD, data={"image": (io.BytesIO(data), "a.png"), "collection": "../x;"}), 400)


# -- POST /images -----------------------------------------------------------------------------------

def test_added_image_is_searchable_and_a_second_upload_adds_nothing(client, lake, indexed):
    data, original = variant(indexed[1], 21, 2)
    r = client.post(ADD, data={"image": (io.BytesIO(data), "new.png"), "collection": "mine"})
    assert r.status_code == 201, r.get_data(as_text=True)
    body = r.get_json()
    new_id = hashlib.sha256(data).hexdigest()
    assert body["image_id"] == new_id and body["created"] and body["embedded"] and body["indexed"]
    assert body["collection"] == "mine" and body["index_action"] == "overlay"  # no index build in the request
    stored = Path(body["uri"])
    assert stored.read_bytes() == data and stored.parent == Path(lake.root, "uploads", new_id[:2])
    assert latest_build(lake)["build_id"] == body["build_id"]

    # the image is in the lake and searchable both ways
    assert client.get(f"{API_PREFIX}/images/{new_id}").get_json()["image"]["collection"] == "mine"
    by_id = client.get(SIMILAR, query_string={"image_id": new_id, "k": 5}).get_json()
    assert by_id["ok"] and original in {h["image_id"] for h in by_id["results"]}
    from_other = client.get(SIMILAR, query_string={"image_id": original, "k": 5}).get_json()
    assert from_other["results"][0]["image_id"] == new_id

    # the features row looks like the embed job's (same model key, 50 concepts, job run recorded)
    feats = open_table(lake, "features").to_pyarrow_table().to_pylist()
    mine = [f for f in feats if f["image_id"] == new_id]
    twin = next(f for f in feats if f["image_id"] == original)
    assert len(mine) == 1 and mine[0]["model"] == twin["model"]
    assert len(mine[0]["embedding"]) == len(twin["embedding"]) and len(mine[0]["concept_ids"]) == 50
    cos = np.dot(mine[0]["embedding"], twin["embedding"]) / (
        np.linalg.norm(mine[0]["embedding"]) * np.linalg.norm(twin["embedding"]))
    assert cos > 0.98

    before = versions(lake)
    again = client.post(ADD, data={"image": (io.BytesIO(data), "again.png")})
    assert again.status_code == 200 and again.get_json()["image_id"] == new_id
    assert again.get_json()["created"] is False and again.get_json()["indexed"] is True
    assert versions(lake) == before


def test_upload_embedding_equals_the_embed_jobs(app, lake, indexed):
    from api.uploads import UploadEmbedder
    from lake.vectors import default_model_key

    path = sorted(indexed[1].rglob("*.png"))[30]
    image_id = hashlib.sha256(path.read_bytes()).hexdigest()
    key = default_model_key(lake)
    vec = UploadEmbedder(Settings(lake=lake.root)).embed(path.read_bytes(), key).vector
    stored = next(f for f in open_table(lake, "features").to_pyarrow_table().to_pylist() if f["image_id"] == image_id)
    np.testing.assert_allclose(vec, np.asarray(stored["embedding"], np.float32), rtol=1e-5, atol=1e-5)


def test_two_uploads_at_once(app, admin_token, lake, indexed):
    payloads = [variant(indexed[1], 40 + i, 3 + i)[0] for i in range(2)]
    answers: list = [None, None]

    def post(i):
        c = app.test_client()
        answers[i] = c.post(ADD, data={"image": (io.BytesIO(payloads[i]), f"{i}.png")},
                            headers={"Authorization": f"Bearer {admin_token}"})

    threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [201, 201], [a.get_data(as_text=True) for a in answers]
    ids = {hashlib.sha256(p).hexdigest() for p in payloads}
    images = open_table(lake, "images").to_pyarrow_table(columns=["image_id", "seq"]).to_pylist()
    assert ids <= {r["image_id"] for r in images}
    assert len({r["image_id"] for r in images}) == len(images) == len({r["seq"] for r in images})
    feats = open_table(lake, "features").to_pyarrow_table(columns=["image_id"]).column("image_id").to_pylist()
    assert len(feats) == len(set(feats))
    c = app.test_client()
    c.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {admin_token}"
    for image_id in ids:
        assert c.get(SIMILAR, query_string={"image_id": image_id, "k": 3}).status_code == 200


def test_upload_while_jobs_run(client, lake, indexed):
    data, _ = variant(indexed[1], 50, 7)
    new_id = hashlib.sha256(data).hexdigest()
    with LakeLock(lake, "ingest", timeout=0, holder="test ingest"):
        assert "ingest" in assert_error(client.post(ADD, data={"image": (io.BytesIO(data), "a.png")}), 409)["error"]
    assert not Path(lake.root, "uploads", new_id[:2], f"{new_id}.png").exists()
    with LakeLock(lake, "index", timeout=0, holder="test index"):  # a running index build does not matter:
        r = client.post(ADD, data={"image": (io.BytesIO(data), "a.png")})  # the request builds nothing
    body = r.get_json()
    assert r.status_code == 201 and body["embedded"] and body["indexed"] and body["index_action"] == "overlay"
    assert client.get(SIMILAR, query_string={"image_id": new_id, "k": 3}).status_code == 200


def test_an_upload_that_dies_between_its_commits_is_completed_by_a_retry(client, lake, indexed, monkeypatch):
    """The in-process ingest commits thumbnails, then images: a failure between them (a crash) leaves
    thumbnails only; the retry adds the rest and duplicates nothing."""
    import jobs.ingest.single as single

    data, _ = variant(indexed[1], 70, 11)
    new_id = hashlib.sha256(data).hexdigest()
    real = single.commit_rows

    def dies_at_images(lake_, table, rows, **kw):
        if table == "images":
            raise OSError("the process died here")
        return real(lake_, table, rows, **kw)

    monkeypatch.setattr(single, "commit_rows", dies_at_images)
    assert_error(client.post(ADD, data={"image": (io.BytesIO(data), "d.png")}), 500)
    monkeypatch.setattr(single, "commit_rows", real)

    def rows(table):
        return [r for r in open_table(lake, table).to_pyarrow_table(columns=["image_id"]).column(0).to_pylist()
                if r == new_id]
    assert len(rows("thumbnails")) == 2 and rows("images") == [] and rows("sources") == []
    r = client.post(ADD, data={"image": (io.BytesIO(data), "d.png")})
    assert r.status_code == 201 and r.get_json()["indexed"], r.get_data(as_text=True)
    assert len(rows("thumbnails")) == 2 and len(rows("images")) == len(rows("sources")) == len(rows("features")) == 1
    runs = open_table(lake, "job_runs").to_pyarrow_table(columns=["run_id", "job", "state"]).to_pylist()
    feats = open_table(lake, "features").to_pyarrow_table(columns=["image_id", "run_id"]).to_pylist()
    run_id = next(f["run_id"] for f in feats if f["image_id"] == new_id)
    assert [(x["job"], x["state"]) for x in runs if x["run_id"] == run_id] == [("embed", "succeeded")]


def test_upload_is_searchable_in_other_workers_and_folded_in_by_the_index_step(app, settings, admin_token,
                                                                                 lake, indexed):
    from api.upload_overlay import overlay_dir

    other = create_app(settings, {"TESTING": True})   # another worker process's app: its own search service
    try:
        c2 = other.test_client()
        c2.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {admin_token}"
        c1 = app.test_client()
        c1.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {admin_token}"
        assert c2.get(f"{API_PREFIX}/health").status_code == 200
        data, original = variant(indexed[1], 60, 9)
        new_id = hashlib.sha256(data).hexdigest()
        builds = open_table(lake, "index_builds").version()
        r = c1.post(ADD, data={"image": (io.BytesIO(data), "w.png")})
        assert r.status_code == 201 and r.get_json()["index_action"] == "overlay"
        assert open_table(lake, "index_builds").version() == builds      # nothing was built
        hits = c2.get(SIMILAR, query_string={"image_id": original, "k": 3}).get_json()["results"]
        assert hits[0]["image_id"] == new_id                              # the other worker finds it

        summary = run_index(lake, Settings(lake=lake.root, runner="local"), runner=LocalRunner())
        assert summary["action"] in ("incremental", "full") and summary["ntotal"] >= 1
        hits = c2.get(SIMILAR, query_string={"image_id": new_id, "k": 3}).get_json()
        assert hits["ok"] and original in {h["image_id"] for h in hits["results"]}
        folder = Path(overlay_dir(lake, r.get_json()["model"]))
        assert any(new_id in n for n in os.listdir(folder))
        data2, _ = variant(indexed[1], 61, 10)
        assert c1.post(ADD, data={"image": (io.BytesIO(data2), "w2.png")}).status_code == 201
        assert not any(new_id in n for n in os.listdir(folder))           # pruned: the build holds it
    finally:
        other.extensions["imagelake"].close()


def test_first_suggestions_after_an_upload_use_the_matrix_and_the_overlay_without_a_rebuild(app, client, lake,
                                                                                             indexed, settings):
    """POST /images bumps the features version; the suggestions map the existing matrix plus the
    upload overlay (api.suggest_overlay) and build nothing: no folder for the new version appears."""
    from api.suggest import suggester
    from lake.compact import compact_dir, ensure_compact

    base = ensure_compact(lake, settings.suggest_dims)      # what the pipeline's suggest step leaves
    data, original = variant(indexed[1], 33, 5)
    r = client.post(ADD, data={"image": (io.BytesIO(data), "sugg.png")})
    assert r.status_code == 201 and r.get_json()["index_action"] == "overlay", r.get_data(as_text=True)
    new_id, version = r.get_json()["image_id"], open_table(lake, "features").version()
    assert version > base.features_version

    bucket = client.post(f"{API_PREFIX}/buckets", json={"name": "twins"}).get_json()["bucket"]["bucket_id"]
    assert client.post(f"{API_PREFIX}/buckets/{bucket}/images", json={"image_ids": [original]}).status_code == 200
    out = client.get(f"{API_PREFIX}/buckets/{bucket}/suggestions?n=10").get_json()
    assert out["ok"] and new_id in [s["image_id"] for s in out["suggestions"] if s["source"] == "model"]
    assert not os.path.exists(compact_dir(lake, base.model, version, settings.suggest_dims))  # nothing rebuilt
    with app.app_context():
        m = suggester().matrix()
    assert m.features_version == base.features_version and len(m) > len(base)
    row = m.ids.rows_of([new_id])
    assert len(row) == 1 and len(base) <= row[0] < len(m)                   # an overlay row, after the build's
    assert m.ids.image_id(int(row[0])) == new_id and m.vectors(row).shape == (1, base.k)
    # the overlay row scores like the image it copies
    twin = m.vectors(m.ids.rows_of([original]))[0]
    assert float(m.vectors(row)[0] @ twin) > 0.9 * float(twin @ twin)
