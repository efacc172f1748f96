"""Suggestions: the next most likely members of a bucket, feedback, fast-forward, Tetris mode.

The engine is :class:`api.suggester.Suggester` (one per server process, built on first use). The
model is refitted from the log on every request, so feedback committed by any server process
shapes the very next suggestion.
"""

from __future__ import annotations

from flask import Blueprint, Flask, current_app, jsonify, request

from api.buckets import (BUCKET_ID_PARAM, _body, _IDS, action_response, bucket_store,
                         image_ids_arg, json_body, submit)
from api.per_process import PerProcess
from api.request_limits import int_arg
from api.suggester import Suggester, labels_of
from lake.buckets import check_bucket_id
from lake.catalog import Lake
from lake.errors import BadInput, Conflict
from lake.sql import jsonable

__all__ = ["bp", "init_app", "suggester"]

bp = Blueprint("suggest", __name__)


def init_app(app: Flask) -> None:
    settings = app.config["IMAGELAKE_SETTINGS"]
    lake = Lake.at(settings.lake)
    def make() -> Suggester:
        from lake.artifact_cache import artifact_cache

        return Suggester(lake, dims=settings.suggest_dims, refresh_s=settings.suggest_refresh_s,
                         cache=None if lake.is_local else artifact_cache(settings))
    app.extensions["imagelake.suggest"] = PerProcess(make)


def suggester() -> Suggester:
    return current_app.extensions["imagelake.suggest"].get()


def _bucket(bucket_id: str) -> str:
    if bucket_id == "discard":
        raise BadInput("the discard pile has no suggestions; it is a negative for every bucket")
    return check_bucket_id(bucket_id)


def _n(default: int = 28) -> int:
    return int_arg("n", default, 1, current_app.config["IMAGELAKE_SETTINGS"].suggest_max_n)


@bp.get("/buckets/<bucket_id>/suggestions")
def suggestions(bucket_id: str):
    """``?n=`` (default 28) unlabeled images for the bucket; ``?explore=false`` for pure exploitation."""
    _bucket(bucket_id)
    n = _n()
    explore = request.args.get("explore", "true").lower() not in ("0", "false", "no")
    with bucket_store().reading() as state:
        state.live_bucket(bucket_id)
        labels = labels_of(state, bucket_id)
    out = suggester().suggest(labels, n, explore=explore)
    return jsonify({"ok": True, "bucket_id": bucket_id, **jsonable(out)})


@bp.post("/buckets/<bucket_id>/feedback")
def feedback(bucket_id: str):
    """``{"accepted": [...], "rejected": [...]}``: accepted join the bucket, rejected become its negatives."""
    _bucket(bucket_id)
    body = json_body()
    accepted = image_ids_arg(body, "accepted", required=False)
    rejected = image_ids_arg(body, "rejected", required=False)
    want = body.get("suggest")  # the next page in the same round trip, after the feedback is folded
    limit = current_app.config["IMAGELAKE_SETTINGS"].suggest_max_n
    if want is not None and (isinstance(want, bool) or not isinstance(want, int) or not 1 <= want <= limit):
        raise BadInput(f"suggest must be an integer from 1 to {limit}")
    response = action_response(submit("feedback", bucket_id, body, image_ids=tuple(accepted),
                                      rejected_ids=tuple(rejected)))
    if want is None:
        return response
    with bucket_store().reading(fresh=False) as state:  # this process's fold holds the commit just made
        labels = labels_of(state, bucket_id)
    out = suggester().suggest(labels, want)
    return jsonify({**response.get_json(), "suggestions": {"bucket_id": bucket_id, **jsonable(out)}})


@bp.post("/buckets/<bucket_id>/fast-forward")
def fast_forward(bucket_id: str):
    """``{"n": 50}``: the model's top n unlabeled images join the bucket pending review."""
    _bucket(bucket_id)
    body = json_body(required=False)
    n = body.get("n", 50)
    limit = current_app.config["IMAGELAKE_SETTINGS"].suggest_max_n
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= limit:
        raise BadInput(f"n must be an integer from 1 to {limit}, got {n!r}")
    with bucket_store().reading() as state:
        state.live_bucket(bucket_id)
        labels = labels_of(state, bucket_id)
    out = suggester().suggest(labels, n, explore=False)
    if out["positives"] == 0:
        raise Conflict("fast-forward needs a model: add at least one image with features to the bucket first")
    ids = tuple(s["image_id"] for s in out["suggestions"])
    if not ids:
        raise Conflict("no unlabeled image is left to fast-forward")
    return action_response(submit("pending", bucket_id, body, image_ids=ids))


@bp.post("/buckets/<bucket_id>/fast-forward/commit")
def fast_forward_commit(bucket_id: str):
    """``{"keep": [...], "remove": [...]}`` of the pending images: kept ones become members (positive
    feedback), removed ones leave the bucket as rejected (negative feedback)."""
    _bucket(bucket_id)
    body = json_body()
    keep = image_ids_arg(body, "keep", required=False)
    remove = image_ids_arg(body, "remove", required=False)
    with bucket_store().reading() as state:
        pending = set(state.member_ids(bucket_id, pending=True))
    stray = [i for i in keep + remove if i not in pending]
    if stray:
        raise Conflict(f"{len(stray)} image(s) are not pending in bucket {bucket_id} (first: {stray[0]})")
    return action_response(submit("feedback", bucket_id, body, image_ids=tuple(keep), rejected_ids=tuple(remove)))


@bp.get("/bucket-previews")
def bucket_previews():
    """``?n=`` (default 4, at most 12) most typical members of every live bucket, for the bucket bar:
    those nearest the bucket's mean direction; the latest members when there are no features yet."""
    n = int_arg("n", 4, 1, 12)
    with bucket_store().reading() as state:
        members = {b["bucket_id"]: state.member_ids(b["bucket_id"], pending=False)
                   for b in state.listing() if not b["system"]}
    engine = suggester()
    previews = {bucket_id: engine.representatives(ids, n) for bucket_id, ids in members.items()}
    return jsonify({"ok": True, "n": n, "previews": previews})


@bp.get("/tetris/next")
def tetris_next():
    """The one unlabeled image some bucket's model is most sure of, with that bucket."""
    with bucket_store().reading() as state:
        views = [(b, labels_of(state, b["bucket_id"])) for b in state.listing() if not b["system"]]
        labeled = state.labeled()
    nxt = suggester().tetris(views, labeled)
    if nxt is None:
        return jsonify({"ok": True, "image_id": None, "bucket": None, "score": None,
                        "reason": "no bucket has a member with features yet"})
    return jsonify({"ok": True, **jsonable(nxt)})


def openapi_paths(settings) -> dict:
    from api.openapi import errors, json_response, ref

    suggestion = {"type": "object", "properties": {
        "image_id": {"type": "string"}, "score": {"type": ["number", "null"]},
        "source": {"enum": ["model", "neighbour", "explore"]}}}
    action = json_response(ref("BucketAction"), "The committed event and the bucket after it")
    return {
        "/buckets/{bucket_id}/suggestions": {"get": {
            "summary": "The next most likely members of the bucket (unlabeled images only)",
            "operationId": "bucketSuggestions",
            "parameters": [BUCKET_ID_PARAM,
                           {"name": "n", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                   "maximum": settings.suggest_max_n, "default": 28}},
                           {"name": "explore", "in": "query", "schema": {"type": "boolean", "default": True}}],
            "responses": {"200": json_response({"type": "object", "properties": {
                "ok": {"const": True}, "bucket_id": {"type": "string"},
                "suggestions": {"type": "array", "items": suggestion},
                "explore_fraction": {"type": "number"}, "acceptance": {"type": ["number", "null"]},
                "positives": {"type": "integer"}, "negatives": {"type": "integer"}, "ms": {"type": "number"}}},
                "Suggestions, best first, then exploration picks"), **errors(400, 404, 409, 503)}}},
        "/bucket-previews": {"get": {
            "summary": "The n most typical members of every live bucket (nearest the bucket's mean direction)",
            "operationId": "bucketPreviews",
            "parameters": [{"name": "n", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 12,
                                                                   "default": 4}}],
            "responses": {"200": json_response({"type": "object", "properties": {
                "ok": {"const": True}, "n": {"type": "integer"},
                "previews": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}}}},
                "Bucket id -> image ids, most typical first"), **errors(400)}}},
        "/buckets/{bucket_id}/feedback": {"post": {
            "summary": "Accept (join the bucket) and reject (negatives for it) suggested images",
            "operationId": "bucketFeedback", "parameters": [BUCKET_ID_PARAM],
            "requestBody": _body({"accepted": _IDS, "rejected": _IDS,
                                  "suggest": {"type": "integer", "minimum": 1, "maximum": settings.suggest_max_n,
                                              "description": "also answer the next n suggestions (as GET .../suggestions "
                                                             "would after this feedback) under \"suggestions\""}}),
            "responses": {"200": action, **errors(400, 404, 409, 413)}}},
        "/buckets/{bucket_id}/fast-forward": {"post": {
            "summary": "Put the model's top n unlabeled images into the bucket, pending review",
            "operationId": "fastForward", "parameters": [BUCKET_ID_PARAM],
            "requestBody": _body({"n": {"type": "integer", "minimum": 1, "maximum": settings.suggest_max_n,
                                        "default": 50}}, optional_body=True),
            "responses": {"200": action, **errors(400, 404, 409, 503)}}},
        "/buckets/{bucket_id}/fast-forward/commit": {"post": {
            "summary": "Review pending images: keep (accept) or remove (reject)",
            "operationId": "fastForwardCommit", "parameters": [BUCKET_ID_PARAM],
            "requestBody": _body({"keep": _IDS, "remove": _IDS}),
            "responses": {"200": action, **errors(400, 404, 409, 413)}}},
        "/tetris/next": {"get": {
            "summary": "Tetris mode: the next single image and the bucket it is suggested for",
            "operationId": "tetrisNext",
            "responses": {"200": json_response({"type": "object", "properties": {
                "ok": {"const": True}, "image_id": {"type": ["string", "null"]},
                "bucket": {"oneOf": [ref("Bucket"), {"type": "null"}]}, "score": {"type": ["number", "null"]}}},
                "The image and bucket (nulls when no bucket has members yet)"), **errors(503)}}},
    }
