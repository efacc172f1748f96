"""Uploaded images: tag one without storing it (``POST /tag``), or add one to the lake (``POST /images``).

Both take the multipart field ``image`` under the same limits as ``POST /search/similar``
(:func:`api.uploads.read_upload`: 413 size or pixels, 415 format, 400 not an image) and embed it on
the fly with the runtime the features key names, as the embed job computes it (:func:`api.uploads.upload_embedder`; 503 when that runtime cannot run in this process).

``POST /tag`` (read scope: it stores nothing) answers concept tags — the model's ImageNet classes
cut at ``tag_cum_prob`` cumulative probability, at most ``tag_max_concepts``, as ``imagelake tag``
stores them — and learned tags from the newest tag model (posterior >= ``tag_min_score``), plus
``image_id`` when the same bytes are already in the lake.

``POST /images`` (curate scope) stores, ingests and embeds the image (the steps of
:mod:`jobs.add_image`) and makes it searchable through the recent-uploads overlay
(:mod:`api.upload_overlay`) — no index build in the request: 201 with its ``image_id`` when new,
200 with the same id when these bytes were added (or ingested) before. On a lake whose served key
holds imported embeddings (``imagelake embed --import``: no model here computes them) the client
sends the image's vector as the form field ``embedding`` (a JSON array), checked like an imported
row; without it the answer is a 400 that says so.
"""

from __future__ import annotations

import re

from flask import Blueprint, current_app, jsonify, request

from api.auth import requires
from api.index_service import search_service
from api.services import lake_reader
from api.upload_overlay import MAX_OVERLAY
from api.uploads import is_imported_key, read_embedding, read_upload, upload_embedder
from lake.errors import BadInput, NotFound

__all__ = ["bp", "openapi_paths"]

bp = Blueprint("upload_routes", __name__)

_COLLECTION = re.compile(r"^[\w][\w .@+-]{0,99}$")


def _fallback_model_key(lake) -> str:
    """The lake's most common embedding model, or the registry's default model on an empty lake."""
    from jobs.embed.models import get_model
    from lake.vectors import default_model_key

    try:
        return default_model_key(lake)
    except NotFound:
        return get_model("efficientnet-lite0").key


def _tag_store():
    from api.tags import _store

    return _store()


def _existing_id(sha256: str) -> str | None:
    try:
        return lake_reader().image(sha256)["image_id"]
    except NotFound:
        return None


@bp.post("/tag")
@requires("read")
def tag_upload():
    from jobs.tag.concepts import concept_tags

    settings = current_app.config["IMAGELAKE_SETTINGS"]
    upload = read_upload("image")
    reader = lake_reader()
    model = _tag_store().load()
    model_key = model.features_model if model is not None else _fallback_model_key(reader.lake)
    embedded = upload_embedder().embed(upload.data, model_key)
    ids, probs = embedded.concepts()
    tags = [{"tag": t, "source": "concept", "score": round(p, 6), "model": model_key}
            for t, p in concept_tags(ids.tolist(), probs.tolist(), settings.tag_cum_prob, settings.tag_max_concepts)]
    if model is not None:
        tags += [{"tag": t, "source": "learned", "score": round(p, 6), "model": f"gnb-v{model.version}"}
                 for t, p in model.predict(embedded.vector[None], top=3)[0] if p >= settings.tag_min_score]
    return jsonify({"ok": True, "sha256": upload.sha256, "image_id": _existing_id(upload.sha256),
                    "model": model_key, "model_version": model.version if model else None, "tags": tags})


def _suggestions_see_it() -> None:
    """This worker's suggester re-reads the upload overlay at its next request (no matrix rebuild:
    :mod:`api.suggest_overlay`); other workers within ``suggest_refresh_s``."""
    from api.suggest import suggester

    try:
        suggester().refresh_soon()
    except (KeyError, RuntimeError):   # an app without the suggestion routes, or no app context
        pass


def add_image_fast(lake, settings, upload, model_key: str, embedded, service, collection: str | None):
    """Store, ingest and embed one upload (the steps of :func:`jobs.add_image.add_image`, reused),
    then make it searchable through the upload overlay (:mod:`api.upload_overlay`) instead of an
    index build: no ``run_index`` (so no drift-triggered rebuild, no delta build, no re-hashing of
    the build's shards) in the request. Idempotent per bytes, under the lake lock ``upload``."""
    import time

    from jobs import add_image as steps
    from lake.commit import now_utc
    from lake.lock import LakeLock

    collection = collection or steps.DEFAULT_COLLECTION
    # no ensure_tables (6 creates "if absent", 0.34 s a request here): open_table creates a missing table
    seconds: dict[str, float] = {}
    with LakeLock(lake, "upload", timeout=steps.UPLOAD_LOCK_S, holder="api upload"), \
            steps.UploadRuns(lake, {"source": "upload", "image_id": upload.sha256, "model": model_key}) as runs:
        t0 = time.perf_counter()
        existing = steps._image_row(lake, upload.sha256)
        created = existing is None
        if created:   # stored in the lake (a local file, or an object in the store) and ingested in-process
            existing = steps.ingest_upload(lake, settings, upload.sha256, upload.format, upload.data, collection,
                                           runs)
        seconds["ingest"] = round(time.perf_counter() - t0, 3)
        result = steps.AddResult(upload.sha256, created, existing["uri"], existing.get("collection"), False, False,
                                 None, None)
        t0 = time.perf_counter()
        if not steps._has_features(lake, upload.sha256, model_key):
            runs.add(steps._embed(lake, upload.sha256, model_key, embedded.vector, embedded.logits), now_utc())
            result.embedded = True
        seconds["embed"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        build = service.build(model_key)
        if build is None:
            result.note = "no index build of this model is published yet; `imagelake index` makes one"
        elif service._seq_of(build, upload.sha256) is not None:
            result.indexed, result.build_id = True, build.build_id
        elif service.overlay.pending(model_key) >= MAX_OVERLAY:
            result.build_id = build.build_id
            result.note = (f"{MAX_OVERLAY} uploads are waiting for an index build; the image is stored and "
                           "embedded and the next `imagelake index` makes it searchable")
        else:
            service.overlay.add(model_key, int(existing["seq"]), upload.sha256, embedded.vector, build)
            result.indexed, result.build_id, result.index_action = True, build.build_id, "overlay"
            _suggestions_see_it()
        seconds["index"] = round(time.perf_counter() - t0, 3)
    result.seconds = dict(seconds, runs=runs.seconds)
    return result


def _upload_vector(lake, upload, model_key: str, build):
    """The upload's vector: computed here by the key's runtime, or, for a key of imported embeddings
    (no runtime here computes them), the client's own, sent as the form field ``embedding``."""
    if not is_imported_key(model_key):
        if request.form.get("embedding") is not None:
            raise BadInput(f"this lake's vectors ({model_key}) are computed by the server; send the image "
                           "without the form field `embedding`")
        return upload_embedder().embed(upload.data, model_key)
    dim = build.d if build is not None else _stored_dim(lake, model_key)
    embedded = read_embedding("embedding", model_key, dim)
    if embedded is None:
        raise BadInput(f"this lake's vectors are embeddings imported under {model_key} (`imagelake embed --import`), "
                       "which no model in this server computes: send the image's vector, computed where the "
                       f"others were, as the form field `embedding` (a JSON array of {dim} floats)")
    return embedded


def _stored_dim(lake, model_key: str) -> int:
    import pyarrow.compute as pc

    from lake.commit import open_table

    rows = open_table(lake, "features").to_pyarrow_dataset().head(
        1, columns=["embedding"], filter=pc.field("model") == model_key).column(0).to_pylist()
    if not rows:
        raise NotFound(f"no features of {model_key} in this lake")
    return len(rows[0])


@bp.post("/images")
def add_upload():
    settings = current_app.config["IMAGELAKE_SETTINGS"]
    upload = read_upload("image")
    collection = request.form.get("collection") or None
    if collection is not None and not _COLLECTION.match(collection):
        raise BadInput("collection must be 1-100 letters, digits, spaces or . _ @ + - (starting with a letter or digit)")
    service = search_service()
    build = service.build()
    reader = lake_reader()
    model_key = build.model if build is not None else _fallback_model_key(reader.lake)
    embedded = _upload_vector(reader.lake, upload, model_key, build)
    result = add_image_fast(reader.lake, settings, upload, model_key, embedded, service, collection)
    reader.refresh(force=True)          # read-your-writes: GET /images/<id> in this worker sees it
    body = {"ok": True, **result.as_dict(), "model": model_key}
    return jsonify(body), 201 if result.created else 200


def openapi_paths(settings) -> dict:
    from api.openapi import errors, json_response

    limits = (f"JPEG, PNG, WebP, GIF, BMP or TIFF; at most {settings.upload_max_bytes} bytes and "
              f"{settings.upload_max_pixels} pixels")
    image_field = {"type": "string", "contentMediaType": "application/octet-stream", "description": limits}
    tag = {"type": "object", "required": ["tag", "source", "score", "model"], "properties": {
        "tag": {"type": "string"}, "source": {"type": "string", "enum": ["concept", "learned"]},
        "score": {"type": "number"}, "model": {"type": "string"}}}
    tagged = {"type": "object", "required": ["ok", "sha256", "image_id", "model", "tags"], "properties": {
        "ok": {"const": True}, "sha256": {"type": "string"},
        "image_id": {"type": ["string", "null"], "description": "set when these bytes are already in the lake"},
        "model": {"type": "string", "description": "the embedding model (name@version)"},
        "model_version": {"type": ["integer", "null"], "description": "the learned-tag model version"},
        "tags": {"type": "array", "items": tag}}}
    added = {"type": "object", "required": ["ok", "image_id", "created", "indexed"], "properties": {
        "ok": {"const": True}, "image_id": {"type": "string"},
        "created": {"type": "boolean", "description": "false: these bytes were in the lake already"},
        "uri": {"type": "string"}, "collection": {"type": ["string", "null"]},
        "embedded": {"type": "boolean"}, "indexed": {"type": "boolean", "description": "searchable now"},
        "build_id": {"type": ["string", "null"]}, "index_action": {"type": ["string", "null"]},
        "note": {"type": ["string", "null"]}, "model": {"type": "string"},
        "seconds": {"type": "object", "additionalProperties": {"type": "number"}}}}
    return {
        "/tag": {"post": {
            "summary": "Concept and learned tags of an uploaded image, without storing it (read scope)",
            "operationId": "tagUpload",
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["image"], "properties": {"image": image_field}}}}},
            "responses": {"200": json_response(tagged, "The tags"), **errors(400, 409, 413, 415)},
        }},
        "/images": {"post": {
            "summary": "Add an uploaded image to the lake: stored, ingested, embedded, searchable at once (curate scope)",
            "operationId": "addImage",
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["image"], "properties": {
                    "image": image_field,
                    "collection": {"type": "string", "default": "uploads", "maxLength": 100},
                    "embedding": {"type": "string", "description": "a JSON array of floats: the image's vector, "
                                  "required (and only accepted) when the served key holds imported embeddings"}}}}}},
            "responses": {"201": json_response(added, "Added"),
                          "200": json_response(added, "These bytes were in the lake already: the same id"),
                          **errors(400, 409, 413, 415, 503)},
        }},
    }
