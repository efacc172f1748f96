"""``POST /tags/bulk``: add or remove user tags on a selection of images in one request.

The same edit as ``POST /images/<id>/tags`` (:mod:`jobs.tag.edits`) applied to many images at once:
one commit of user rows to ``tags`` (one run id ``edit-<uuid>`` for the whole selection), then one
update of the learned model under its lock (each added tag learned from every image that got it;
a removed user tag unlearned from the images that had it). Body::

    {"image_ids": [...], "add": ["beach"], "remove": ["dog"]}

At most ``bucket_max_images`` ids (413 above); unknown ids are a 404 before anything is written;
``correct`` is not taken here (send add and remove).
"""

from __future__ import annotations

import uuid

from flask import Blueprint, jsonify

from api.auth import current_principal
from api.buckets import image_ids_arg, json_body
from api.services import lake_reader
from lake.errors import BadInput

__all__ = ["bp", "bulk_edit"]

bp = Blueprint("bulk_tags", __name__)


def bulk_edit(lake, settings, image_ids: list[str], add: tuple[str, ...], remove: tuple[str, ...],
              actor: str | None, store) -> dict:
    """Commit the rows and update the model; returns per-tag image counts of what changed."""
    from jobs.tag.edits import _features_model, current_or_new_model
    from jobs.tag.state import current_tags
    from lake.commit import commit_rows, ensure_tables, now_utc
    from lake.migrate import upgrade_table
    from lake.vectors import load_embeddings

    ensure_tables(lake, ["tags", "images", "features"])
    upgrade_table(lake, "tags")
    wanted = set(image_ids)
    now: dict[str, set[str]] = {}
    table = current_tags(lake)
    for image_id, tag, source in zip(table.column("image_id").to_pylist(), table.column("tag").to_pylist(),
                                     table.column("source").to_pylist()):
        if source == "user" and image_id in wanted:
            now.setdefault(image_id, set()).add(tag)
    run_id, at = f"edit-{uuid.uuid4().hex}", now_utc()
    rows, learn, unlearn = [], [], []
    for image_id in image_ids:
        have = now.get(image_id, set())
        for tag in add:
            if tag not in have:
                rows.append(dict(image_id=image_id, tag=tag, source="user", score=1.0, run_id=run_id, created_at=at,
                                 action="add", actor=actor))
                learn.append((image_id, tag))
        for tag in remove:
            rows.append(dict(image_id=image_id, tag=tag, source="user", score=None, run_id=run_id, created_at=at,
                             action="remove", actor=actor))
            if tag in have:
                unlearn.append((image_id, tag))
    if rows:
        commit_rows(lake, "tags", rows, run_id=run_id)
    learned = False
    model_key = _features_model(lake)
    if model_key and (learn or unlearn):
        listed = ", ".join(f"'{i}'" for i in sorted({i for i, _ in learn + unlearn}))  # validated hex ids
        emb = load_embeddings(lake, model_key, where=f"i.image_id IN ({listed})")
        row_of = {image_id: k for k, image_id in enumerate(emb.image_ids)}
        learn = [(i, t) for i, t in learn if i in row_of]
        unlearn = [(i, t) for i, t in unlearn if i in row_of]
        if learn or unlearn:
            with store.locked():
                model = current_or_new_model(store, lake, emb.model, settings)
                if unlearn:
                    model.unlearn(emb.vectors[[row_of[i] for i, _ in unlearn]], [t for _, t in unlearn])
                if learn:
                    model.learn(emb.vectors[[row_of[i] for i, _ in learn]], [t for _, t in learn])
                store.save(model)
                learned = True
    added = {t: sum(1 for r in rows if r["tag"] == t and r["action"] == "add") for t in add}
    return {"added": added, "removed": {t: len(image_ids) for t in remove}, "learned": learned}


@bp.post("/tags/bulk")
def bulk():
    from api.tags import _store
    from jobs.tag.edits import parse_edit

    body = json_body()
    ids = image_ids_arg(body, "image_ids")
    unknown = set(body) - {"image_ids", "add", "remove", "client_event_id"}
    if unknown:
        raise BadInput(f"unknown keys {sorted(unknown)}; send image_ids, add and remove")
    edit = parse_edit({k: body[k] for k in ("add", "remove") if k in body})
    principal = current_principal()
    actor = (principal.name or principal.token_id) if principal else None
    reader = lake_reader()
    change = bulk_edit(reader.lake, reader.settings, ids, edit.add, edit.remove, actor, _store())
    reader.refresh_sql()  # read-your-writes: SQL and a Browse filter by the tag see it at once (this worker)
    reader.refresh(force=True)
    return jsonify({"ok": True, "images": len(ids), **change})


def openapi_paths(settings) -> dict:
    from api.openapi import errors, json_response

    tags = {"type": "array", "items": {"type": "string"}, "maxItems": 100}
    counts = {"type": "object", "additionalProperties": {"type": "integer"}}
    return {"/tags/bulk": {"post": {
        "summary": "Add and/or remove user tags on many images at once (one commit, one model update)",
        "operationId": "bulkTags",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["image_ids"], "properties": {
                "image_ids": {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                              "maxItems": settings.bucket_max_images},
                "add": tags, "remove": tags}}}}},
        "responses": {"200": json_response({"type": "object", "required": ["ok", "images"], "properties": {
            "ok": {"const": True}, "images": {"type": "integer"}, "added": counts, "removed": counts,
            "learned": {"type": "boolean"}}}, "How many images each tag was added to / removed from"),
            **errors(400, 404, 413)}}}}
