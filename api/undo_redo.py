"""What undo and redo would do now, and redo itself, for the caller (this token).

``POST /undo`` (:mod:`api.buckets`) cancels the caller's latest action that is not undone. This
module adds what a person needs to trust it: ``GET /undo`` names the action the next undo would
cancel and the one the next redo would re-apply, before the button is pressed, and ``POST /redo``
re-applies the action the caller's latest undo cancelled.

A redo is a new action in the log (the undone event's kind, bucket, images and payload, committed
again), marked with ``client_event_id = "redo:<undo event id>"``; the log itself is unchanged in
form (:mod:`lake.buckets`). Walking the caller's events newest first: a redo consumes its undo; an
undo not consumed yet is what redo re-applies; any other action of the caller ends the walk (a
new action clears the redo stack, as in every editor). A retried redo is safe: the same
``client_event_id`` returns the first redo's event. A redo the log refuses now (the images left
the source bucket meanwhile, the bucket was deleted) answers the store's 409/404 and writes nothing.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, jsonify

from api.auth import current_principal
from api.buckets import action_response, bucket_store, event_json, json_body
from lake.bucket_store import Action
from lake.buckets import BucketState
from lake.errors import Conflict

__all__ = ["bp", "named_event", "redo_target", "REDO_PREFIX"]

bp = Blueprint("undo_redo", __name__)

REDO_PREFIX = "redo:"


def _actor() -> tuple[str, str]:
    principal = current_principal()
    return (principal.token_id, principal.name) if principal else ("", "anonymous")


def redo_target(state: BucketState, actor: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(the undo a redo would reverse, the event it cancelled), or None when there is nothing to redo."""
    consumed: set[str] = set()
    for event in reversed(state.events):
        if event.get("actor") != actor:
            continue
        client = event.get("client_event_id") or ""
        if event["action"] == "undo":
            if event["event_id"] in consumed:
                continue
            target = state.by_id.get(event.get("undo_of") or "")
            return (event, target) if target is not None else None
        if client.startswith(REDO_PREFIX):
            consumed.add(client[len(REDO_PREFIX):])
            continue
        return None  # a new action: nothing older can be redone
    return None


def named_event(state: BucketState, event: dict[str, Any] | None) -> dict[str, Any] | None:
    """The event as JSON plus the names of its buckets (a bucket whose create was undone is named
    from the create's payload), so a control can say "Undo: add 3 to Cats"."""
    if event is None:
        return None

    def name(bucket_id: str | None) -> str | None:
        if not bucket_id:
            return None
        row = state.buckets.get(bucket_id)
        if row is not None:
            return row.get("name")
        for e in state.events:  # an undone create: its bucket is not in the fold
            if e["action"] == "create" and e["bucket_id"] == bucket_id:
                return json.loads(e.get("payload") or "{}").get("name")
        return None

    out = event_json(event)
    out["bucket_name"] = name(event.get("bucket_id"))
    if event.get("from_bucket"):
        out["from_bucket_name"] = name(event["from_bucket"])
    if event["action"] == "update":
        payload = json.loads(event.get("payload") or "{}")
        out["changes"] = sorted(payload)
    return out


@bp.get("/undo")
def undo_state():
    """``{"undo": event|null, "redo": event|null}``: what the next undo and redo would act on."""
    actor, _ = _actor()
    with bucket_store().reading() as state:
        target = state.last_undoable(actor)
        redo = redo_target(state, actor)
        return jsonify({"ok": True, "undo": named_event(state, target),
                        "redo": named_event(state, redo[1]) if redo else None})


@bp.post("/redo")
def redo():
    """Re-apply the action the caller's latest (not yet redone) undo cancelled."""
    json_body(required=False)  # a malformed body is still a 400
    actor, actor_name = _actor()
    store = bucket_store()
    with store.reading() as state:
        found = redo_target(state, actor)
        if found is None:
            raise Conflict("nothing to redo: this token has no undo left to reverse (a new action clears redo)")
        undo_event, target = found
        redone = named_event(state, target)
    payload = json.loads(target.get("payload") or "{}") if target.get("payload") else {}
    action = Action(target["action"], target.get("bucket_id"), image_ids=tuple(target.get("image_ids") or ()),
                    rejected_ids=tuple(target.get("rejected_ids") or ()), from_bucket=target.get("from_bucket"),
                    payload=payload, actor=actor, actor_name=actor_name,
                    client_event_id=REDO_PREFIX + undo_event["event_id"])
    response = action_response(store.submit(action))
    data = response.get_json()
    data["redone"] = redone
    response.set_data(json.dumps(data))
    return response


def openapi_paths(settings) -> dict:
    from api.openapi import errors, json_response, ref

    named = {"oneOf": [{"type": "null"}, {"allOf": [ref("BucketEvent"), {"type": "object", "properties": {
        "bucket_name": {"type": ["string", "null"]}, "from_bucket_name": {"type": ["string", "null"]},
        "changes": {"type": "array", "items": {"type": "string"}}}}]}]}
    return {
        "/undo": {"get": {
            "summary": "What the caller's next undo would cancel and next redo would re-apply (with bucket names)",
            "operationId": "undoState",
            "responses": {"200": json_response({"type": "object", "required": ["ok", "undo", "redo"], "properties": {
                "ok": {"const": True}, "undo": named, "redo": named}}, "The undo and redo targets"), **errors()}}},
        "/redo": {"post": {
            "summary": "Re-apply the action the caller's latest undo cancelled (a new event, client_event_id redo:<undo id>)",
            "operationId": "redo",
            "requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {"200": json_response({"allOf": [ref("BucketAction"), {"type": "object", "properties": {
                "redone": named}}]}, "The new event; redone names what was re-applied"),
                **errors(404, 409)}}},
    }
