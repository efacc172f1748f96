"""Tags on real embeddings: concept tags with the cumulative cut, user edits through the API that
change later predictions (seen by a second app, as another worker would), the vocabulary, errors."""

from __future__ import annotations

import os

import duckdb
import pytest

from api import create_app
from jobs.tag import concept_tags, run_tag
from jobs.tag.edits import parse_edit
from lake.catalog import Lake
from lake.commit import open_table
from lake.errors import BadInput
from lake.tokens import create_token


@pytest.fixture
def lake(planted_copy) -> Lake:
    return planted_copy


@pytest.fixture
def ids(lake) -> dict[str, str]:
    con = duckdb.connect()
    con.register("images", open_table(lake, "images").to_pyarrow_dataset())
    return {os.path.basename(u): i for i, u in con.sql("SELECT image_id, uri FROM images").fetchall()}


def test_concept_cut_is_cumulative():
    assert concept_tags([967, 1, 2], [0.95, 0.03, 0.02]) == [("espresso", 0.95)]
    tags = concept_tags([281, 285, 282, 5], [0.5, 0.3, 0.15, 0.05], cum_prob=0.9)
    assert [t for t, _ in tags] == ["tabby", "egyptian cat", "tiger cat"]
    assert len(concept_tags(list(range(50)), [0.02] * 50, max_tags=5)) == 5
    assert concept_tags(None, None) == []


def test_run_tag_writes_concept_tags_once(lake, local_settings):
    first = run_tag(lake, local_settings)
    assert first["concept_images"] == 180 and first["concept_tags"] >= 180 and first["learned_model"] is None
    again = run_tag(lake, local_settings)
    assert again["concept_images"] == 0 and again["concept_tags"] == 0


def _learned(body) -> list[str]:
    return [t["tag"] for t in body["tags"] if t["source"] == "learned"]


def test_correction_changes_later_predictions(lake, ids, planted, client, settings):
    pairs = planted[2]
    (a, a_variant, _), (b, b_variant, _), (c, c_variant, _) = pairs[:3]
    for name, tag in ((a, "alpha"), (b, "beta"), (c, "delta")):
        r = client.post(f"/api/v1/images/{ids[name]}/tags", json={"add": [tag]})
        assert r.status_code == 200 and r.get_json()["learned"], r.get_json()
    before = client.get(f"/api/v1/images/{ids[a_variant]}/tags").get_json()
    assert _learned(before)[0] == "alpha"
    # the curator corrects image a: not alpha but gamma; a's variant is now predicted gamma
    r = client.post(f"/api/v1/images/{ids[a]}/tags", json={"correct": [{"from": "alpha", "to": "gamma"}]})
    body = r.get_json()
    assert r.status_code == 200 and body["added"] == ["gamma"] and body["removed"] == ["alpha"]
    assert body["model_version"] == before["model_version"] + 1
    assert {t["tag"] for t in body["tags"] if t["source"] == "user"} == {"gamma"}
    after = client.get(f"/api/v1/images/{ids[a_variant]}/tags").get_json()
    assert _learned(after)[0] == "gamma" and "alpha" not in _learned(after)
    # another worker (a second app on the same lake) sees the new model version
    other = create_app(settings, {"TESTING": True}).test_client()
    other.environ_base["HTTP_AUTHORIZATION"] = client.environ_base["HTTP_AUTHORIZATION"]
    seen = other.get(f"/api/v1/images/{ids[a_variant]}/tags").get_json()
    assert seen["model_version"] == body["model_version"] and _learned(seen)[0] == "gamma"
    # the log is append-only: add alpha, remove alpha, add gamma, with the actor
    con = duckdb.connect()
    con.register("tags", open_table(lake, "tags").to_pyarrow_dataset())
    log = con.sql(f"SELECT tag, action, actor FROM tags WHERE image_id = '{ids[a]}' AND source = 'user' "
                  "ORDER BY created_at, action").fetchall()
    assert log[0][:2] == ("alpha", "add") and {r[:2] for r in log[1:]} == {("alpha", "remove"), ("gamma", "add")}
    assert all(actor == "test admin" for *_, actor in log)
    # the batch job retrains from the user rows and writes learned tags; the vocabulary counts them
    summary = run_tag(lake, settings.replace(runner="local"))
    assert summary["learned_classes"] == 3 and summary["learned_tags"] > 0
    vocab = client.get("/api/v1/tags?source=user").get_json()
    assert {(t["tag"], t["images"]) for t in vocab["tags"]} == {("gamma", 1), ("beta", 1), ("delta", 1)}
    everything = client.get("/api/v1/tags?limit=3").get_json()
    assert everything["total"] > 3 and len(everything["tags"]) == 3


def test_removing_a_model_tag_hides_it(lake, ids, planted, client, local_settings):
    run_tag(lake, local_settings)
    image = ids[planted[2][0][0]]
    concept = [t for t in client.get(f"/api/v1/images/{image}/tags").get_json()["tags"] if t["source"] == "concept"]
    gone = concept[0]["tag"]
    r = client.post(f"/api/v1/images/{image}/tags", json={"remove": [gone]})
    assert r.status_code == 200 and gone not in {t["tag"] for t in r.get_json()["tags"]}


def test_tag_edit_errors(lake, ids, client, app):
    image = next(iter(ids.values()))
    cases = [("/api/v1/images/xyz/tags", {"add": ["a"]}, 400),
             (f"/api/v1/images/{'0' * 64}/tags", {"add": ["a"]}, 404),
             (f"/api/v1/images/{image}/tags", {"add": "a"}, 400),
             (f"/api/v1/images/{image}/tags", {"add": [""]}, 400),
             (f"/api/v1/images/{image}/tags", {"add": ["x" * 65]}, 400),
             (f"/api/v1/images/{image}/tags", {"add": ["a"], "remove": ["a"]}, 400),
             (f"/api/v1/images/{image}/tags", {"correct": [{"from": "a"}]}, 400),
             (f"/api/v1/images/{image}/tags", {"rename": ["a"]}, 400),
             (f"/api/v1/images/{image}/tags", {}, 400)]
    for url, body, status in cases:
        r = client.post(url, json=body)
        assert r.status_code == status and r.get_json()["ok"] is False, (url, body, r.get_json())
    r = client.post(f"/api/v1/images/{image}/tags", data="{not json", content_type="application/json")
    assert r.status_code == 400
    assert client.get(f"/api/v1/images/{'0' * 64}/tags").status_code == 404
    assert client.get("/api/v1/tags?source=bad").status_code == 400
    reader = app.test_client()
    reader.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {create_token(lake, 'read', 'viewer')[1]}"
    assert reader.post(f"/api/v1/images/{image}/tags", json={"add": ["a"]}).status_code == 403
    assert reader.get(f"/api/v1/images/{image}/tags").status_code == 200
    with pytest.raises(BadInput):
        parse_edit([])


def test_bucket_members_train_learned_tags(lake, ids, planted, client, local_settings):
    (a, a_variant, _), (b, b_variant, _) = planted[2][:2]
    for name, member in (("sunsets", a), ("harbours", b)):
        bucket = client.post("/api/v1/buckets", json={"name": name}).get_json()["bucket"]["bucket_id"]
        assert client.post(f"/api/v1/buckets/{bucket}/images", json={"image_ids": [ids[member]]}).status_code == 200
    from imagelake.cli import main

    assert main(["--lake", lake.root, "export", "--bucket", bucket, "--to", str(lake.root + "-export")]) == 0
    exported = os.listdir(lake.root + "-export")
    assert len(exported) == 1 and os.path.realpath(os.path.join(lake.root + "-export", exported[0])).endswith(b)
    summary = run_tag(lake, local_settings)
    assert summary["learned_model"] is not None
    con = duckdb.connect()
    con.register("tags", open_table(lake, "tags").to_pyarrow_dataset())
    learned = dict(con.sql("SELECT image_id, tag FROM tags WHERE source = 'learned' AND image_id IN (?, ?) "
                           "QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY score DESC) = 1",
                           params=[ids[a_variant], ids[b_variant]]).fetchall())
    assert learned == {ids[a_variant]: "sunsets", ids[b_variant]: "harbours"}
