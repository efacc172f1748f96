"""Buckets: create, rename/recolor, soft delete; add, move, copy, remove images; the discard pile;
undo; a bucket's history by Delta time travel.

Every write is acknowledged only after its event is committed to ``bucket_events`` (one group-commit
writer per node, elected among the workers, see :mod:`lake.bucket_writer` and
:mod:`lake.bucket_store`); send ``client_event_id`` (or an
``Idempotency-Key`` header) to make a retried request safe: the same token and key return the
original event and write nothing.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, request

from api.auth import current_principal
from api.request_limits import int_arg
from api.per_process import PerProcess
from api.services import check_image_id, lake_reader
from lake.bucket_store import Action, BucketStore
from lake.buckets import DISCARD, bucket_history, check_bucket_id
from lake.catalog import Lake
from lake.errors import BadInput, NotFound, TooLarge
from lake.sql import jsonable

__all__ = ["bp", "action_response", "bucket_store", "event_json", "image_ids_arg", "init_app", "json_body", "submit"]

bp = Blueprint("buckets", __name__)


# -- per-process state --------------------------------------------------------------------------

def init_app(app: Flask) -> None:
    settings = app.config["IMAGELAKE_SETTINGS"]
    lake = Lake.at(settings.lake)
    app.extensions["imagelake.buckets"] = PerProcess(
        lambda: BucketStore(lake, node_writer=True, refresh_s=settings.refresh_s,
                            writer_hung_s=settings.bucket_writer_hung_s))
    app.extensions["imagelake.known_images"] = PerProcess(lambda: KnownIds())


class KnownIds:
    """Image ids this process has seen in ``images`` (rows are never deleted), so a curation write
    skips the DuckDB lookup for images it has checked before; bounded, cleared when full."""

    def __init__(self, limit: int = 100_000):
        self.limit, self._ids, self._lock = limit, set(), threading.Lock()

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._ids

    def add_all(self, ids) -> None:
        with self._lock:
            if len(self._ids) + len(ids) > self.limit:
                self._ids = set()
            self._ids.update(ids)


def bucket_store() -> BucketStore:
    return current_app.extensions["imagelake.buckets"].get()


# -- request helpers (shared with api.suggest) ---------------------------------------------------

def json_body(required: bool = True) -> dict[str, Any]:
    """The JSON object body. Raises BadInput for malformed JSON, a non-object, or a missing body."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        if required:
            raise BadInput("send a JSON object body (content-type: application/json)")
        return {}
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise BadInput("the body must be a JSON object")
    return body


def image_ids_arg(body: dict[str, Any], key: str, *, required: bool = True) -> list[str]:
    """``body[key]`` as a list of known image ids (400 malformed, 413 too many, 404 unknown)."""
    value = body.get(key, [] if not required else None)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadInput(f'"{key}" must be a list of image ids (sha256 hex)')
    limit = current_app.config["IMAGELAKE_SETTINGS"].bucket_max_images
    if len(value) > limit:
        raise TooLarge(f'"{key}" has {len(value)} image ids; at most {limit} per request (bucket_max_images)')
    if required and not value:
        raise BadInput(f'"{key}" is empty; send at least one image id')
    ids = list(dict.fromkeys(check_image_id(v) for v in value))
    seen = current_app.extensions["imagelake.known_images"].get()
    unsure = [i for i in ids if i not in seen]
    known = lake_reader().existing_image_ids(unsure) if unsure else set()
    seen.add_all(known)
    missing = [i for i in unsure if i not in known]
    if missing:
        raise NotFound(f"{len(missing)} image id(s) are not in the lake (first: {missing[0]})")
    return ids


def _client_event_id(body: dict[str, Any]) -> str | None:
    value = body.get("client_event_id", request.headers.get("Idempotency-Key"))
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 128:
        raise BadInput("client_event_id must be a string of 1 to 128 characters")
    return value


def submit(kind: str, bucket_id: str | None, body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Commit one action for the caller and return its event (raises the action's 4xx)."""
    principal = current_principal()
    action = Action(kind, bucket_id, actor=principal.token_id if principal else "",
                    actor_name=principal.name if principal else "anonymous",
                    client_event_id=_client_event_id(body), **fields)
    return bucket_store().submit(action)


def event_json(event: dict[str, Any]) -> dict[str, Any]:
    return jsonable({k: v for k, v in event.items() if v is not None or k in ("bucket_id",)})


def action_response(event: dict[str, Any], status: int = 200):
    store = bucket_store()
    with store.reading(fresh=False) as state:
        bucket = state.bucket_row(event["bucket_id"]) if event.get("bucket_id") else None
        undone = state.by_id.get(event["undo_of"]) if event.get("undo_of") else None
    body = {"ok": True, "event": event_json(event), "bucket": jsonable(bucket)}
    if event.get("action") == "undo":
        from api.undo_redo import named_event  # what the undo cancelled, with its bucket names, for the UI

        with store.reading(fresh=False) as state:
            body["undone"] = named_event(state, undone) if undone else None
    response = jsonify(body)
    response.status_code = status
    return response


def _path_bucket(bucket_id: str, allow_discard: bool = True, what: str = "") -> str:
    if bucket_id == DISCARD and not allow_discard:
        raise BadInput(f"the discard pile cannot be {what or 'used here'}")
    return check_bucket_id(bucket_id)


# -- routes ---------------------------------------------------------------------------------------

@bp.get("/buckets")
def list_buckets():
    """Live buckets (``?deleted=true`` adds deleted ones) with member and pending counts."""
    deleted = request.args.get("deleted", "false").lower() in ("1", "true", "yes")
    store = bucket_store()
    with store.reading() as state:
        return jsonify({"ok": True, "buckets": jsonable(state.listing(include_deleted=deleted)),
                        "version": store.version})


@bp.post("/buckets")
def create_bucket():
    body = json_body()
    event = submit("create", None, body, payload={"name": body.get("name"), "color": body.get("color")})
    return action_response(event, 201)


@bp.get("/buckets/<bucket_id>")
def get_bucket(bucket_id: str):
    """The bucket, a page of its members (``?limit=``, ``?offset=``) and its pending images."""
    _path_bucket(bucket_id)
    limit, offset = int_arg("limit", 500, 1, 10_000), int_arg("offset", 0, 0, 2**62)
    store = bucket_store()
    with store.reading() as state:
        bucket = state.buckets.get(bucket_id)
        if bucket is None:
            raise NotFound(f"no bucket {bucket_id}; GET /api/v1/buckets lists them")
        members = state.member_ids(bucket_id, pending=False)
        pending = state.member_ids(bucket_id, pending=True)
        row = state.bucket_row(bucket_id)
    return jsonify({"ok": True, "bucket": jsonable(row), "members": members[offset:offset + limit],
                    "total": len(members), "pending": pending, "version": store.version})


@bp.patch("/buckets/<bucket_id>")
def update_bucket(bucket_id: str):
    _path_bucket(bucket_id, allow_discard=False, what="renamed or recolored")
    body = json_body()
    return action_response(submit("update", bucket_id, body,
                                  payload={"name": body.get("name"), "color": body.get("color")}))


@bp.delete("/buckets/<bucket_id>")
def delete_bucket(bucket_id: str):
    _path_bucket(bucket_id, allow_discard=False, what="deleted")
    return action_response(submit("delete", bucket_id, json_body(required=False)))


@bp.post("/buckets/<bucket_id>/images")
def add_images(bucket_id: str):
    """``{"image_ids": [...]}`` adds; with ``"from": bucket`` and ``"mode": "move"|"copy"`` moves or copies."""
    _path_bucket(bucket_id)
    body = json_body()
    ids = image_ids_arg(body, "image_ids")
    source = body.get("from")
    mode = body.get("mode", "move" if source else "add")
    if mode not in ("add", "move", "copy"):
        raise BadInput(f'mode must be "add", "move" or "copy", got {mode!r}')
    if mode != "add" and not isinstance(source, str):
        raise BadInput(f'mode "{mode}" needs "from": the source bucket id')
    if mode == "add" and source is not None:
        raise BadInput('"from" needs mode "move" or "copy"')
    if bucket_id == DISCARD:
        kind = "discard"
    else:
        kind = mode
    if source is not None:
        check_bucket_id(source)
    return action_response(submit(kind, bucket_id, body, image_ids=tuple(ids), from_bucket=source))


@bp.delete("/buckets/<bucket_id>/images/<image_id>")
def remove_image(bucket_id: str, image_id: str):
    _path_bucket(bucket_id)
    check_image_id(image_id)
    return action_response(submit("remove", bucket_id, json_body(required=False), image_ids=(image_id,)))


@bp.post("/discard")
def discard():
    """``{"image_ids": [...], "from": bucket?}``: onto the discard pile (out of ``from`` if given)."""
    body = json_body()
    ids = image_ids_arg(body, "image_ids")
    source = body.get("from")
    if source is not None and not isinstance(source, str):
        raise BadInput('"from" must be a bucket id')
    if source is not None:
        check_bucket_id(source, allow_discard=False)
    return action_response(submit("discard", DISCARD, body, image_ids=tuple(ids), from_bucket=source))


@bp.post("/undo")
def undo():
    """Cancel the caller's (this token's) latest action that is not undone yet."""
    return action_response(submit("undo", None, json_body(required=False)))


@bp.get("/buckets/<bucket_id>/history")
def history(bucket_id: str):
    """The bucket as of a version of the log (``?version=N`` or ``?as_of=ISO-8601``; default latest)."""
    _path_bucket(bucket_id)
    version = request.args.get("version")
    as_of = request.args.get("as_of")
    if version is not None and as_of is not None:
        raise BadInput("give version or as_of, not both")
    when = None
    if as_of is not None:
        try:
            when = dt.datetime.fromisoformat(as_of)
        except ValueError:
            raise BadInput(f"as_of must be an ISO 8601 time like 2026-01-31T12:00:00+00:00, got {as_of!r}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
    number = int_arg("version", 0, 0, 2**62) if version is not None else None
    store = bucket_store()
    store.sync()
    out = bucket_history(store.lake, bucket_id, version=number, as_of=when)
    out["events"] = [event_json(e) for e in out["events"]]
    return jsonify({"ok": True, **jsonable(out)})


# -- OpenAPI --------------------------------------------------------------------------------------

BUCKET_ID_PARAM = {"name": "bucket_id", "in": "path", "required": True,
                   "description": "16 lowercase hex characters, or `discard` for the discard pile",
                   "schema": {"type": "string", "pattern": "^([0-9a-f]{16}|discard)$"}}
_IDS = {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}
_CLIENT = {"client_event_id": {"type": "string", "maxLength": 128,
                               "description": "makes a retry safe: the same token and id return the first event"}}


def _body(props: dict, required: list[str] | None = None, optional_body: bool = False) -> dict:
    return {"required": not optional_body, "content": {"application/json": {"schema": {
        "type": "object", "required": required or [], "properties": {**props, **_CLIENT}}}}}


def openapi_paths(settings) -> dict:
    from api.openapi import errors, json_response, ref, IMAGE_ID_PARAM

    action = json_response(ref("BucketAction"), "The committed event and the bucket after it")
    return {
        "/buckets": {
            "get": {"summary": "Live buckets with member and pending counts", "operationId": "listBuckets",
                    "parameters": [{"name": "deleted", "in": "query", "schema": {"type": "boolean", "default": False}}],
                    "responses": {"200": json_response({"type": "object", "properties": {
                        "ok": {"const": True}, "buckets": {"type": "array", "items": ref("Bucket")},
                        "version": {"type": ["integer", "null"]}}}, "The buckets"), **errors()}},
            "post": {"summary": "Create a bucket", "operationId": "createBucket",
                     "requestBody": _body({"name": {"type": "string", "maxLength": 200},
                                           "color": {"type": "string", "pattern": "^#[0-9a-fA-F]{6}$"}}, ["name"]),
                     "responses": {"201": action, **errors(400, 409)}},
        },
        "/buckets/{bucket_id}": {
            "get": {"summary": "A bucket, a page of its members and its pending images", "operationId": "getBucket",
                    "parameters": [BUCKET_ID_PARAM,
                                   {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 500}},
                                   {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}}],
                    "responses": {"200": json_response({"type": "object", "properties": {
                        "ok": {"const": True}, "bucket": ref("Bucket"), "members": _IDS, "total": {"type": "integer"},
                        "pending": _IDS}}, "The bucket"), **errors(400, 404)}},
            "patch": {"summary": "Rename and/or recolor a bucket", "operationId": "updateBucket",
                      "parameters": [BUCKET_ID_PARAM],
                      "requestBody": _body({"name": {"type": "string"}, "color": {"type": "string"}}),
                      "responses": {"200": action, **errors(400, 404, 409)}},
            "delete": {"summary": "Delete a bucket (soft: its log and history stay; undo brings it back)",
                       "operationId": "deleteBucket", "parameters": [BUCKET_ID_PARAM],
                       "responses": {"200": action, **errors(400, 404, 409)}},
        },
        "/buckets/{bucket_id}/images": {"post": {
            "summary": "Add images; or move/copy them from another bucket", "operationId": "addBucketImages",
            "parameters": [BUCKET_ID_PARAM],
            "requestBody": _body({"image_ids": _IDS, "from": {"type": "string"},
                                  "mode": {"enum": ["add", "move", "copy"]}}, ["image_ids"]),
            "responses": {"200": action, **errors(400, 404, 409, 413)}}},
        "/buckets/{bucket_id}/images/{image_id}": {"delete": {
            "summary": "Remove an image from a bucket (or take it back from the discard pile)",
            "operationId": "removeBucketImage", "parameters": [BUCKET_ID_PARAM, IMAGE_ID_PARAM],
            "responses": {"200": action, **errors(400, 404, 409)}}},
        "/discard": {"post": {
            "summary": "Put images on the discard pile (negatives for every bucket)", "operationId": "discardImages",
            "requestBody": _body({"image_ids": _IDS, "from": {"type": "string"}}, ["image_ids"]),
            "responses": {"200": action, **errors(400, 404, 409, 413)}}},
        "/undo": {"post": {
            "summary": "Undo the caller's latest action that is not undone yet", "operationId": "undo",
            "requestBody": _body({}, optional_body=True),
            "responses": {"200": action, **errors(400, 409)}}},
        "/buckets/{bucket_id}/history": {"get": {
            "summary": "The bucket and its events as of a version of the log (Delta time travel)",
            "operationId": "bucketHistory",
            "parameters": [BUCKET_ID_PARAM,
                           {"name": "version", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                           {"name": "as_of", "in": "query", "schema": {"type": "string", "format": "date-time"}}],
            "responses": {"200": json_response({"type": "object", "properties": {
                "ok": {"const": True}, "version": {"type": "integer"}, "bucket": ref("Bucket"), "members": _IDS,
                "pending": _IDS, "events": {"type": "array", "items": ref("BucketEvent")}}}, "The bucket then"),
                **errors(400, 404)}}},
    }


def openapi_schemas(settings) -> dict:
    return {
        "Bucket": {"type": "object", "required": ["bucket_id", "name", "deleted"], "properties": {
            "bucket_id": {"type": "string"}, "name": {"type": "string"}, "color": {"type": ["string", "null"]},
            "deleted": {"type": "boolean"}, "system": {"type": "boolean"}, "count": {"type": "integer"},
            "pending": {"type": "integer"}, "created_by": {"type": ["string", "null"]},
            "created_at": {"type": ["string", "null"]}, "updated_at": {"type": ["string", "null"]},
            "seq": {"type": "integer"}}},
        "BucketEvent": {"type": "object", "required": ["event_id", "seq", "action"], "properties": {
            "event_id": {"type": "string"}, "seq": {"type": "integer"}, "action": {"type": "string"},
            "bucket_id": {"type": ["string", "null"]}, "image_ids": _IDS, "rejected_ids": _IDS,
            "from_bucket": {"type": "string"}, "undo_of": {"type": "string"}, "payload": {"type": "string"},
            "actor": {"type": "string"}, "actor_name": {"type": "string"}, "at": {"type": "string"},
            "client_event_id": {"type": "string"}, "undone": {"type": "boolean"}, "replayed": {"type": "boolean"}}},
        "BucketAction": {"type": "object", "required": ["ok", "event"], "properties": {
            "ok": {"const": True}, "event": {"$ref": "#/components/schemas/BucketEvent"},
            "bucket": {"oneOf": [{"$ref": "#/components/schemas/Bucket"}, {"type": "null"}]}}},
    }
