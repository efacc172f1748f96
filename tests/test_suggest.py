"""Suggestions on real features: the session's photo lake (tests/photo_lake.py: 2,000 labelled views
of scikit-image photos, digits and generated scenes, ingested and embedded once by the real jobs),
served by the Flask app. A bucket's class is one photo: its members are different views of it."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from api import API_PREFIX
from api.suggester import explore_fraction, fit_logistic
from lake.catalog import Lake
from lake.commit import open_table
from lake.compact import compact_dir, ensure_compact, load_compact
from lake.errors import CorruptArtifact
from photo_lake import label_of, photo_template

B = f"{API_PREFIX}/buckets"
N = 2000
CAT, ROCKET, ASTRONAUT, COFFEE = "chelsea", "rocket", "astronaut", "coffee"


@pytest.fixture(scope="module")
def photo_lake(tmp_path_factory) -> Lake:
    return photo_template(tmp_path_factory.getbasetemp(), N)[0]


@pytest.fixture
def lake(photo_lake, tmp_path) -> Lake:
    """A copy per test: an empty bucket log; the suggestion matrix is rebuilt in the copy."""
    shutil.copytree(photo_lake.root, tmp_path / "lake", ignore=shutil.ignore_patterns("artifacts"))
    return Lake.at(tmp_path / "lake")


@pytest.fixture(scope="module")
def labels(photo_lake) -> dict[str, str]:
    rows = open_table(photo_lake, "images").to_pyarrow_table(columns=["image_id", "uri"]).to_pylist()
    return {r["image_id"]: label_of(r["uri"]) for r in rows}


def ok(response, status=200) -> dict:
    body = response.get_json()
    assert response.status_code == status, body
    return body


def of_class(labels, cls, n, skip=0) -> list[str]:
    return sorted(i for i, c in labels.items() if c == cls)[skip:skip + n]


def test_suggestions_learn_from_feedback_and_never_repeat_labeled_images(client, labels):
    bucket = ok(client.post(B, json={"name": "cats"}), 201)["bucket"]["bucket_id"]
    ok(client.post(f"{B}/{bucket}/images", json={"image_ids": of_class(labels, CAT, 5)}))
    labeled = set(of_class(labels, CAT, 5))
    precisions, pages = [], []
    for _ in range(4):
        out = ok(client.get(f"{B}/{bucket}/suggestions?n=20"))
        got = [s["image_id"] for s in out["suggestions"]]
        pages.append(got)
        assert len(got) == 20 == len(set(got)) and not labeled & set(got)
        accepted = [i for i in got if labels[i] == CAT]
        rejected = [i for i in got if labels[i] != CAT]
        precisions.append(len(accepted) / len(got))
        ok(client.post(f"{B}/{bucket}/feedback", json={"accepted": accepted, "rejected": rejected}))
        labeled |= set(got)
    # chance is 0.0625 (125 of the 2,000 images are views of the cat photo)
    assert min(precisions) >= 0.5 and np.mean(precisions[1:]) >= 0.8, precisions
    members = ok(client.get(f"{B}/{bucket}"))["members"]
    assert len(members) == 5 + sum(round(p * 20) for p in precisions)
    # repeatable: undo it all (4 feedbacks, the add, the create), then the same actions on a new
    # bucket (a new id, later in the log) answer the same pages, random negatives included
    for _ in range(6):
        ok(client.post(f"{API_PREFIX}/undo"))
    again = ok(client.post(B, json={"name": "cats"}), 201)["bucket"]["bucket_id"]
    assert again != bucket
    ok(client.post(f"{B}/{again}/images", json={"image_ids": of_class(labels, CAT, 5)}))
    for page in pages[:2]:
        got = [s["image_id"] for s in ok(client.get(f"{B}/{again}/suggestions?n=20"))["suggestions"]]
        assert got == page
        ok(client.post(f"{B}/{again}/feedback", json={"accepted": [i for i in got if labels[i] == CAT],
                                                         "rejected": [i for i in got if labels[i] != CAT]}))


def test_exploration_grows_when_suggestions_are_rejected(client, labels):
    bucket = ok(client.post(B, json={"name": "rockets"}), 201)["bucket"]["bucket_id"]
    ok(client.post(f"{B}/{bucket}/images", json={"image_ids": of_class(labels, ROCKET, 3)}))
    first = ok(client.get(f"{B}/{bucket}/suggestions?n=20"))
    # the first page, before any feedback, is all the model's (exploring it cost hits: see api.suggester)
    assert first["acceptance"] is None and first["explore_fraction"] == explore_fraction(None) == 0.0
    assert {s["source"] for s in first["suggestions"]} == {"model"}
    ok(client.post(f"{B}/{bucket}/feedback", json={"rejected": [s["image_id"] for s in first["suggestions"]]}))
    after = ok(client.get(f"{B}/{bucket}/suggestions?n=20"))
    assert after["acceptance"] == 0.0 and after["explore_fraction"] == 0.5
    assert sum(s["source"] != "model" for s in after["suggestions"]) == 10
    exploit = ok(client.get(f"{B}/{bucket}/suggestions?n=20&explore=false"))
    assert {s["source"] for s in exploit["suggestions"]} == {"model"}
    scores = [s["score"] for s in exploit["suggestions"]]
    assert scores == sorted(scores, reverse=True)


def test_cold_bucket_gets_diverse_random_picks(client):
    bucket = ok(client.post(B, json={"name": "empty"}), 201)["bucket"]["bucket_id"]
    out = ok(client.get(f"{B}/{bucket}/suggestions?n=12"))
    assert out["positives"] == 0 and len(out["suggestions"]) == 12
    assert {s["source"] for s in out["suggestions"]} == {"explore"}


def test_fast_forward_then_commit_keeps_and_rejects(client, labels):
    bucket = ok(client.post(B, json={"name": "astronauts"}), 201)["bucket"]["bucket_id"]
    ok(client.post(f"{B}/{bucket}/images", json={"image_ids": of_class(labels, ASTRONAUT, 5)}))
    ff = ok(client.post(f"{B}/{bucket}/fast-forward", json={"n": 15}))
    pending = ff["event"]["image_ids"]
    assert len(pending) == 15 and ff["bucket"]["pending"] == 15 and ff["bucket"]["count"] == 5
    view = ok(client.get(f"{B}/{bucket}"))
    assert sorted(view["pending"]) == sorted(pending) and len(view["members"]) == 5
    again = ok(client.get(f"{B}/{bucket}/suggestions?n=20"))  # pending images are not suggested again
    assert not set(pending) & {s["image_id"] for s in again["suggestions"]}
    keep = [i for i in pending if labels[i] == ASTRONAUT]
    remove = [i for i in pending if labels[i] != ASTRONAUT]
    done = ok(client.post(f"{B}/{bucket}/fast-forward/commit", json={"keep": keep, "remove": remove}))
    assert done["bucket"]["pending"] == 0 and done["bucket"]["count"] == 5 + len(keep)
    assert ok(client.post(f"{B}/{bucket}/fast-forward/commit", json={"keep": keep[:1]}), 409)["ok"] is False


def test_tetris_returns_an_image_and_its_bucket(client, labels):
    assert ok(client.get(f"{API_PREFIX}/tetris/next"))["image_id"] is None
    buckets = {}
    for cls in (ASTRONAUT, COFFEE, "coins"):
        b = ok(client.post(B, json={"name": cls}), 201)["bucket"]["bucket_id"]
        ok(client.post(f"{B}/{b}/images", json={"image_ids": of_class(labels, cls, 5)}))
        buckets[b] = cls
    right = 0
    for _ in range(6):
        nxt = ok(client.get(f"{API_PREFIX}/tetris/next"))
        assert nxt["bucket"]["bucket_id"] in buckets and len(nxt["image_id"]) == 64
        correct = labels[nxt["image_id"]] == buckets[nxt["bucket"]["bucket_id"]]
        right += correct
        key = "accepted" if correct else "rejected"
        ok(client.post(f"{B}/{nxt['bucket']['bucket_id']}/feedback", json={key: [nxt["image_id"]]}))
    assert right >= 5


def test_bucket_previews_are_the_most_typical_members(client, labels):
    bucket = ok(client.post(B, json={"name": "coffee"}), 201)["bucket"]["bucket_id"]
    empty = ok(client.post(B, json={"name": "empty"}), 201)["bucket"]["bucket_id"]
    cups, outlier = of_class(labels, COFFEE, 12), of_class(labels, "digit_3", 1)
    ok(client.post(f"{B}/{bucket}/images", json={"image_ids": outlier + cups}))
    body = ok(client.get(f"{API_PREFIX}/bucket-previews?n=5"))
    assert body["n"] == 5 and body["previews"][empty] == []
    shown = body["previews"][bucket]
    assert len(shown) == 5 and set(shown) <= set(cups)  # the handwritten digit is the least typical member
    assert ok(client.get(f"{API_PREFIX}/bucket-previews"))["n"] == 4
    for bad in ("0", "13", "x"):
        assert client.get(f"{API_PREFIX}/bucket-previews?n={bad}").status_code == 400


def test_bad_suggestion_requests(client, labels):
    bucket = ok(client.post(B, json={"name": "x"}), 201)["bucket"]["bucket_id"]
    assert ok(client.get(f"{B}/{bucket}/suggestions?n=0"), 400)["status"] == 400
    assert ok(client.get(f"{B}/{bucket}/suggestions?n=100000"), 400)["status"] == 400
    assert ok(client.get(f"{B}/discard/suggestions"), 400)["status"] == 400
    assert ok(client.get(f"{B}/{'0' * 16}/suggestions"), 404)["status"] == 404
    one = of_class(labels, CAT, 1)
    assert ok(client.post(f"{B}/{bucket}/feedback", json={"accepted": one, "rejected": one}), 400)["status"] == 400
    assert ok(client.post(f"{B}/{bucket}/feedback", json={}), 400)["status"] == 400
    assert ok(client.post(f"{B}/{bucket}/fast-forward", json={"n": 5}), 409)["status"] == 409  # no members yet
    ok(client.delete(f"{B}/{bucket}"))
    assert ok(client.get(f"{B}/{bucket}/suggestions"), 409)["status"] == 409


def test_no_features_is_503(lake_factory, tmp_path):
    from api import create_app
    from lake.settings import Settings

    app = create_app(Settings(lake=lake_factory("bare").root, auth=False), {"TESTING": True})
    try:
        c = app.test_client()
        bucket = ok(c.post(B, json={"name": "x"}), 201)["bucket"]["bucket_id"]
        assert ok(c.get(f"{B}/{bucket}/suggestions"), 503)["status"] == 503
    finally:
        app.extensions["imagelake"].close()


def test_previews_without_features_are_the_latest_members(lake_factory, tmp_path):
    from api import create_app
    from conftest import write_images
    from jobs.ingest.driver import run_ingest
    from lake.settings import Settings

    bare = lake_factory("ingested-only")
    settings = Settings(lake=bare.root, auth=False, runner="local")
    write_images(tmp_path / "imgs", 6)
    run_ingest(bare, settings, str(tmp_path / "imgs"))  # images, but no embed run: no features
    ids = [r["image_id"] for r in open_table(bare, "images").to_pyarrow_table(columns=["image_id"]).to_pylist()]
    app = create_app(settings, {"TESTING": True})
    try:
        c = app.test_client()
        bucket = ok(c.post(B, json={"name": "x"}), 201)["bucket"]["bucket_id"]
        for image_id in ids:  # one at a time: join order is the order here
            ok(c.post(f"{B}/{bucket}/images", json={"image_ids": [image_id]}))
        assert ok(c.get(f"{B}/{bucket}/suggestions"), 503)["status"] == 503
        assert ok(c.get(f"{API_PREFIX}/bucket-previews?n=4"))["previews"] == {bucket: ids[::-1][:4]}
    finally:
        app.extensions["imagelake"].close()


def test_compact_matrix_is_a_verified_artifact(lake):
    m = ensure_compact(lake, k=32)
    folder = compact_dir(lake, m.model, m.features_version, 32)
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert manifest["rows"] == len(m) == N and manifest["k"] == 32
    assert os.path.getsize(os.path.join(folder, "index.faiss")) < N * 32 + 4096  # ~k bytes per image
    # PCA-32 codes keep the geometry: cosine neighbours in full space are close in compact space
    from lake.vectors import load_embeddings
    emb = load_embeddings(lake)
    x = emb.normalized()
    rows = np.array([m.ids.rows_of([i])[0] for i in emb.image_ids])
    approx = m.vectors(rows)
    # (the views of one photo are a tight cluster whose order inside 32 dims cannot keep exactly, so
    # the check is that the compact top 10 stay among the full-space top 30; chance is 1.5%)
    queries = np.random.default_rng(0).choice(len(x), 50, replace=False)
    full_nn = np.argsort(-(x[queries] @ x.T), axis=1)[:, 1:31]
    compact_nn = np.argsort(-(approx[queries] @ approx.T), axis=1)[:, 1:11]
    kept = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(full_nn, compact_nn)])
    assert kept >= 0.7, kept
    with open(os.path.join(folder, "image_ids.bin"), "r+b") as f:
        f.write(b"\xff")
    with pytest.raises(CorruptArtifact):
        load_compact(folder)


def test_pipeline_suggest_step_builds_the_matrix_once_and_the_server_maps_it(lake):
    from jobs.pipeline import PipelineRequest, run_pipeline
    from lake.settings import Settings

    settings = Settings(lake=lake.root, runner="local", suggest_dims=32)
    first = run_pipeline(lake, settings, PipelineRequest(steps=("suggest",)))
    assert [(s["step"], s["rows_in"], s["rows_out"]) for s in first.steps] == [("suggest", N, N)]
    again = run_pipeline(lake, settings, PipelineRequest(steps=("suggest",)))
    assert [s["rows_out"] for s in again.steps] == [0]  # incremental: the build for this features version exists
    runs = open_table(lake, "job_runs").to_pyarrow_table().to_pylist()
    ended = [json.loads(r["metrics"]) for r in sorted(runs, key=lambda r: r["started_at"])
             if r["job"] == "suggest" and r["state"] == "succeeded"]
    assert [m["built"] for m in ended] == [True, False] and ended[0]["dims"] == 32
    folder = compact_dir(lake, ended[0]["model"], ended[0]["features_version"], 32)
    stamp = os.stat(os.path.join(folder, "index.faiss")).st_mtime_ns
    assert len(ensure_compact(lake, k=32)) == N  # what a server process calls: maps, does not rebuild
    assert os.stat(os.path.join(folder, "index.faiss")).st_mtime_ns == stamp


def test_warm_up_loads_the_thumbnail_index_and_the_matrix_before_any_request(lake):
    from api import create_app, warm_up
    from lake.settings import Settings

    app = create_app(Settings(lake=lake.root), {"TESTING": True})
    try:
        warm_up(app).join(120)
        reader = app.extensions["imagelake"]
        assert len(reader._thumb_index) == N * len(reader.settings.thumbnail_sizes)
        assert len(app.extensions["imagelake.suggest"].get()._matrix) == N
    finally:
        app.extensions["imagelake"].close()


def test_janitor_prunes_superseded_matrices_and_tag_models_but_keeps_what_is_in_use(lake):
    from lake.janitor import clean

    m = ensure_compact(lake, k=16)
    ensure_compact(lake, k=32)
    first = compact_dir(lake, m.model, m.features_version, 16)
    # later embed runs' builds, as a scheduled lake accumulates them (copies of the real one)
    later = [compact_dir(lake, m.model, m.features_version + d, 16) for d in (1, 2, 3)]
    for folder in later:
        shutil.copytree(first, folder)
    tags = lake.artifacts_dir("tags", "gnb")
    for v in range(1, 5):
        os.makedirs(os.path.join(tags, f"v{v:06d}"))
    with open(os.path.join(tags, "CURRENT"), "w") as f:
        f.write("4")
    assert clean(lake, older_than_h=24).old_artifacts == 0  # all young: a server may map them
    for folder in [first] + later + [os.path.join(tags, f"v{v:06d}") for v in range(1, 5)]:
        os.utime(folder, (1e9, 1e9))
    report = clean(lake, older_than_h=1)
    assert report.old_artifacts == 4 and "4 superseded artifacts" in report.line()
    assert not os.path.exists(first) and not os.path.exists(later[0])
    assert os.path.isdir(later[1]) and os.path.isdir(later[2])        # the newest (in use) and the one before
    assert os.path.isdir(compact_dir(lake, m.model, m.features_version, 32))  # another width: its own newest
    assert sorted(os.listdir(tags)) == ["CURRENT", "v000003", "v000004"]
    assert len(load_compact(later[2])) == N


def test_logistic_fit_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.5, 1, (20, 8)), rng.normal(-0.5, 1, (200, 8))
    w, b = fit_logistic(pos, neg)
    ref = LogisticRegression(C=1.0, class_weight="balanced", tol=1e-8, max_iter=1000).fit(
        np.vstack([pos, neg]), np.r_[np.ones(20), np.zeros(200)])
    assert np.allclose(w, ref.coef_.ravel(), atol=1e-3) and abs(b - ref.intercept_[0]) < 1e-3


def test_image_id_table_maps_rows_both_ways_even_when_keys_collide(tmp_path):
    from lake.compact import ImageIdTable

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (1000, 32), dtype=np.uint8)
    raw[7] = np.concatenate([raw[5][8:16], raw[5][:8], raw[5][16:]])  # same xor of the four words
    raw.tofile(tmp_path / "ids.bin")
    table = ImageIdTable(str(tmp_path / "ids.bin"))
    ids = [raw[i].tobytes().hex() for i in (7, 5, 999, 0)]
    assert table.rows_of(ids).tolist() == [0, 5, 7, 999]
    assert table.rows_of(["f" * 64, "bad"]).tolist() == []
    assert [table.image_id(r) for r in (5, 7)] == [ids[1], ids[0]]
