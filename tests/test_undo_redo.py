"""GET /undo (what undo and redo would act on, named) and POST /redo, through the Flask client."""

from __future__ import annotations

import pytest

from api import API_PREFIX
from conftest import write_images
from jobs.ingest.driver import run_ingest
from jobs.runner import LocalRunner
from lake.buckets import bucket_members, read_events
from lake.commit import open_table
from lake.settings import Settings
from lake.tokens import create_token

B = f"{API_PREFIX}/buckets"


@pytest.fixture
def ids(lake, tmp_path) -> list[str]:
    write_images(tmp_path / "imgs", 8)
    run_ingest(lake, Settings(lake=lake.root, runner="local"), str(tmp_path / "imgs"), runner=LocalRunner())
    rows = open_table(lake, "images").to_pyarrow_table(columns=["image_id", "seq"]).to_pylist()
    return [r["image_id"] for r in sorted(rows, key=lambda r: r["seq"])]


def ok(response, status=200) -> dict:
    body = response.get_json()
    assert response.status_code == status, body
    return body


def state(client) -> tuple:
    body = ok(client.get(f"{API_PREFIX}/undo"))
    return tuple(None if e is None else (e["action"], e.get("bucket_name"), len(e.get("image_ids") or []))
                 for e in (body["undo"], body["redo"]))


def test_undo_state_names_the_targets_and_redo_reapplies_in_order(app, client, ids, lake):
    assert state(client) == (None, None)
    assert "nothing to redo" in ok(client.post(f"{API_PREFIX}/redo"), 409)["error"]
    cats = ok(client.post(B, json={"name": "Cats"}), 201)["bucket"]["bucket_id"]
    dogs = ok(client.post(B, json={"name": "Dogs"}), 201)["bucket"]["bucket_id"]
    ok(client.post(f"{B}/{cats}/images", json={"image_ids": ids[:3]}))
    ok(client.post(f"{B}/{dogs}/images", json={"image_ids": ids[:1], "from": cats, "mode": "move"}))
    assert state(client) == (("move", "Dogs", 1), None)
    body = ok(client.get(f"{API_PREFIX}/undo"))
    assert body["undo"]["from_bucket_name"] == "Cats"
    ok(client.post(f"{API_PREFIX}/undo"))
    ok(client.post(f"{API_PREFIX}/undo"))
    assert state(client) == (("create", "Dogs", 0), ("add", "Cats", 3))
    assert bucket_members(lake, cats) == []
    redone = ok(client.post(f"{API_PREFIX}/redo"))
    assert redone["redone"]["action"] == "add" and redone["event"]["action"] == "add"
    assert sorted(bucket_members(lake, cats)) == sorted(ids[:3])
    assert state(client) == (("add", "Cats", 3), ("move", "Dogs", 1))
    ok(client.post(f"{API_PREFIX}/redo"))
    assert bucket_members(lake, dogs) == ids[:1] and state(client)[1] is None
    # undo a redo, then redo it again; a new action clears what is left to redo
    ok(client.post(f"{API_PREFIX}/undo"))
    assert state(client)[1] == ("move", "Dogs", 1)
    ok(client.post(f"{API_PREFIX}/redo"))
    assert bucket_members(lake, dogs) == ids[:1]
    ok(client.post(f"{API_PREFIX}/undo"))
    ok(client.delete(f"{B}/{cats}/images/{ids[1]}"))
    assert state(client) == (("remove", "Cats", 1), None)
    assert "nothing to redo" in ok(client.post(f"{API_PREFIX}/redo"), 409)["error"]
    # each redo is an ordinary event marked with the undo it reverses
    redos = [e for e in read_events(lake)[0] if (e.get("client_event_id") or "").startswith("redo:")]
    assert len(redos) == 3 and all(e["action"] in ("add", "move") for e in redos)


def test_redo_is_per_token_and_an_undone_create_is_named_from_its_payload(app, client, ids, lake):
    other = app.test_client()
    other.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {create_token(lake, 'curate', 'other')[1]}"
    ok(client.post(B, json={"name": "Birds"}), 201)
    ok(client.post(f"{API_PREFIX}/undo"))
    assert state(client) == (None, ("create", "Birds", 0))
    assert state(other) == (None, None)
    assert ok(other.post(f"{API_PREFIX}/redo"), 409)["ok"] is False
    ok(client.post(f"{API_PREFIX}/redo"))
    assert [b["name"] for b in ok(client.get(B))["buckets"] if not b.get("system")] == ["Birds"]
    assert ok(client.post(f"{API_PREFIX}/redo", data="[1]", content_type="application/json"), 400)["ok"] is False
