"""Tags of an image (concept, learned, user), user edits that teach the learned model, and the
vocabulary. Learned tags are predicted live with the newest model version, so a correction made
through any worker shows in the next answer of every worker (each re-reads the model's CURRENT)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from api.auth import current_principal
from api.request_limits import int_arg
from api.services import check_image_id, lake_reader
from jobs.tag.state import CURRENT_TAGS_SQL
from lake.errors import BadInput
from lake.vectors import load_embeddings

bp = Blueprint("tags", __name__)


def _store():
    """This process's model store (scikit-learn and FAISS are imported on first use, not at start)."""
    from jobs.tag.model import ModelStore

    store = current_app.extensions.get("imagelake.tag_model")
    if store is None:
        store = current_app.extensions["imagelake.tag_model"] = ModelStore(lake_reader().lake)
    return store


def image_tags(image_id: str) -> dict:
    reader = lake_reader()
    reader.image(image_id)  # 400 / 404
    rows = reader.query(f"SELECT tag, source, score, model FROM ({CURRENT_TAGS_SQL}) WHERE image_id = '{image_id}' "
                        "ORDER BY source, score DESC, tag", max_rows=1000).rows
    hidden = {r[0] for r in reader.query(
        f"SELECT tag FROM tags WHERE image_id = '{image_id}' AND source = 'user' GROUP BY tag "
        "HAVING arg_max(coalesce(action, 'add'), created_at) = 'remove'", max_rows=1000).rows}
    tags = [{"tag": r[0], "source": r[1], "score": r[2], "model": r[3]} for r in rows]
    model = _store().load()
    version = model.version if model else None
    if model is not None:
        emb = load_embeddings(reader.lake, model.features_model, where=f"i.image_id = '{image_id}'")
        if len(emb):
            threshold = reader.settings.tag_min_score
            live = [{"tag": t, "source": "learned", "score": p, "model": f"gnb-v{model.version}"}
                    for t, p in model.predict(emb.vectors, top=3)[0] if p >= threshold and t not in hidden]
            tags = [t for t in tags if t["source"] != "learned"] + live
    return {"ok": True, "image_id": image_id, "model_version": version, "tags": tags}


@bp.get("/images/<image_id>/tags")
def get_tags(image_id: str):
    check_image_id(image_id)
    _store()
    return jsonify(image_tags(image_id))


@bp.post("/images/<image_id>/tags")
def edit_tags(image_id: str):
    """Body ``{"add": [...], "remove": [...], "correct": [{"from": a, "to": b}]}`` (curate scope)."""
    from jobs.tag.edits import apply_edit, parse_edit

    check_image_id(image_id)
    edit = parse_edit(request.get_json(force=True, silent=True))
    reader = lake_reader()
    reader.image(image_id)  # 404 before anything is written
    principal = current_principal()
    actor = (principal.name or principal.token_id) if principal else None
    change = apply_edit(reader.lake, reader.settings, image_id, edit, actor, store=_store())
    reader.refresh_sql()  # read-your-writes in this answer
    body = image_tags(image_id)
    body.update({"added": change["added"], "removed": change["removed"], "learned": change["learned"]})
    return jsonify(body)


@bp.get("/tags")
def vocabulary():
    """``?source=user|concept|learned``, ``?limit=`` (1..1000, 100), ``?offset=``: tags with image counts."""
    source = request.args.get("source")
    if source not in (None, "", "user", "concept", "learned"):
        raise BadInput(f"source must be user, concept or learned, got {source!r}")
    limit, offset = int_arg("limit", 100, 1, 1000), int_arg("offset", 0, 0, 2**62)
    where = f"WHERE source = '{source}'" if source else ""
    rows = lake_reader().query(
        f"SELECT tag, source, count(DISTINCT image_id) AS images, count(*) OVER () AS total FROM ({CURRENT_TAGS_SQL}) "
        f"{where} GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT {limit} OFFSET {offset}", max_rows=limit).rows
    return jsonify({"ok": True, "total": rows[0][3] if rows else 0,
                    "tags": [{"tag": r[0], "source": r[1], "images": r[2]} for r in rows]})


def openapi_paths(settings) -> dict:
    from api.openapi import IMAGE_ID_PARAM, errors, json_response, ref

    tag_list = {"type": "object", "required": ["ok", "image_id", "tags"], "properties": {
        "ok": {"const": True}, "image_id": {"type": "string"}, "model_version": {"type": ["integer", "null"]},
        "tags": {"type": "array", "items": ref("Tag")}}}
    return {
        "/images/{image_id}/tags": {
            "get": {"summary": "Current tags of an image: concept, user, and learned (predicted now by the newest model)",
                    "operationId": "getImageTags", "parameters": [IMAGE_ID_PARAM],
                    "responses": {"200": json_response(tag_list, "The tags"), **errors(400, 404)}},
            "post": {"summary": "Add, remove or correct tags (curate scope); the learned model updates online",
                     "operationId": "editImageTags", "parameters": [IMAGE_ID_PARAM],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {
                         "type": "object", "additionalProperties": False, "properties": {
                             "add": {"type": "array", "items": {"type": "string"}, "maxItems": 100},
                             "remove": {"type": "array", "items": {"type": "string"}, "maxItems": 100},
                             "correct": {"type": "array", "maxItems": 100, "items": {"type": "object", "required": ["from", "to"],
                                         "properties": {"from": {"type": "string"}, "to": {"type": "string"}}}}}}}}},
                     "responses": {"200": json_response(tag_list, "The tags after the edit, plus added/removed/learned"),
                                   **errors(400, 404)}},
        },
        "/tags": {"get": {
            "summary": "The tag vocabulary: each tag and source with its number of images, most used first",
            "operationId": "listTags",
            "parameters": [{"name": "source", "in": "query", "schema": {"type": "string", "enum": ["user", "concept", "learned"]}},
                           {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
                           {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}}],
            "responses": {"200": json_response({"type": "object", "required": ["ok", "tags", "total"], "properties": {
                "ok": {"const": True}, "total": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "object", "properties": {
                    "tag": {"type": "string"}, "source": {"type": "string"}, "images": {"type": "integer"}}}}}}, "Tags"),
                **errors(400)},
        }},
    }


def openapi_schemas(settings) -> dict:
    return {"Tag": {"type": "object", "required": ["tag", "source"], "properties": {
        "tag": {"type": "string"}, "source": {"type": "string", "enum": ["concept", "learned", "user"]},
        "score": {"type": ["number", "null"]}, "model": {"type": ["string", "null"]}}}}
