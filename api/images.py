"""Image metadata and thumbnails. Thumbnails are content-addressed, so they cache forever."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from api.request_limits import int_arg
from api.services import check_image_id, lake_reader
from lake.errors import BadInput
from lake.sql import jsonable

bp = Blueprint("images", __name__)

# private: these answers need a token, so a shared cache (a proxy, a CDN) must not keep them and
# hand them to others; the browser's own cache keeps them for good (content-addressed, never rewritten).
_IMMUTABLE = "private, max-age=31536000, immutable"


@bp.get("/images")
def browse():
    """A page of images in seq order: ``?limit=`` (1..500, default 60), ``?offset=``, ``?collection=``;
    ``?folder= &tag= &bucket= &cluster= &where=`` filter it (:mod:`api.browse_filters`)."""
    limit = int_arg("limit", 60, 1, 500)
    offset = int_arg("offset", 0, 0, 2**62)
    from api.browse_filters import filtered_page, has_filters  # folder, tag, bucket, cluster, where

    if has_filters(request.args):
        return jsonify({"ok": True, **jsonable(filtered_page(request.args, limit=limit, offset=offset))})
    page = lake_reader().browse(limit=limit, offset=offset, collection=request.args.get("collection") or None)
    return jsonify({"ok": True, **jsonable(page)})


@bp.get("/images/<image_id>")
def image(image_id: str):
    return jsonify({"ok": True, "image": jsonable(lake_reader().image(image_id))})


@bp.get("/images/<image_id>/thumbnail")
def thumbnail(image_id: str):
    reader = lake_reader()
    check_image_id(image_id)
    sizes = tuple(reader.settings.thumbnail_sizes)
    raw = request.args.get("size", str(256 if 256 in sizes else max(sizes)))
    try:
        size = int(raw)
    except ValueError:
        raise BadInput(f"size must be one of {', '.join(map(str, sizes))}, got {raw!r}") from None
    reader.check_thumbnail_size(size)
    # image_id is the sha256 of the original and thumbnails are never rewritten: a strong tag.
    etag = f"{image_id}-{size}"
    headers = {"Cache-Control": _IMMUTABLE}
    if request.if_none_match.contains_weak(etag):
        response = Response(status=304, headers=headers)
    else:
        response = Response(reader.thumbnail(image_id, size), mimetype="image/jpeg", headers=headers)
    response.set_etag(etag)
    return response


def openapi_paths(settings) -> dict:
    from api.openapi import IMAGE_ID_PARAM, errors, json_response, ref

    sizes = list(settings.thumbnail_sizes)
    default_size = 256 if 256 in sizes else max(sizes)
    return {
        "/images": {"get": {
            "summary": "A page of images in seq order, the total, and image counts per collection",
            "operationId": "listImages",
            "parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 60}},
                {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}},
                {"name": "collection", "in": "query", "schema": {"type": "string"}},
                {"name": "folder", "in": "query", "description": "images seen at a path in this folder or below",
                 "schema": {"type": "string", "maxLength": 1000}},
                {"name": "tag", "in": "query", "description": "a current tag (user, concept or learned)",
                 "schema": {"type": "string", "maxLength": 200}},
                {"name": "bucket", "in": "query", "description": "members of this bucket (pending excluded)",
                 "schema": {"type": "string", "pattern": "^([0-9a-f]{16}|discard)$"}},
                {"name": "cluster", "in": "query", "description": "members of this near-duplicate group or topic cluster",
                 "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,200}$"}},
                {"name": "where", "in": "query", "description": "a metadata/capture filter (JSON, the filter language)",
                 "schema": {"type": "string"}},
                {"name": "stack", "in": "query", "description": "dup: each near-duplicate group as one stack",
                 "schema": {"type": "string", "enum": ["dup"]}},
            ],
            "responses": {
                "200": json_response({"type": "object", "required": ["ok", "images", "total", "collections"], "properties": {
                    "ok": {"const": True}, "images": {"type": "array", "items": {"type": "object"}},
                    "total": {"type": "integer"}, "collections": {"type": "object"},
                    "filters": {"type": "object"}}}, "One page"),
                **errors(400, 404),
            },
        }},
        "/images/{image_id}": {"get": {
            "summary": "Image metadata, its imported metadata columns, and every path it was seen at",
            "operationId": "getImage",
            "parameters": [IMAGE_ID_PARAM],
            "responses": {
                "200": json_response({"type": "object", "required": ["ok", "image"], "properties": {
                    "ok": {"const": True}, "image": ref("Image")}}, "The image"),
                **errors(400, 404),
            },
        }},
        "/images/{image_id}/thumbnail": {"get": {
            "summary": "JPEG thumbnail; immutable, cacheable forever, strong ETag",
            "operationId": "getThumbnail",
            "parameters": [IMAGE_ID_PARAM, {
                "name": "size", "in": "query", "required": False,
                "description": "Longest side in px",
                "schema": {"type": "integer", "enum": sizes, "default": default_size},
            }, {
                "name": "If-None-Match", "in": "header", "required": False,
                "schema": {"type": "string"},
            }],
            "responses": {
                "200": {
                    "description": "The JPEG",
                    "headers": {
                        "ETag": {"schema": {"type": "string"}},
                        "Cache-Control": {"schema": {"type": "string"}},
                    },
                    "content": {"image/jpeg": {"schema": {"type": "string", "contentMediaType": "image/jpeg"}}},
                },
                "304": {"description": "Not modified (If-None-Match matched the ETag)"},
                **errors(400, 404),
            },
        }},
    }


def openapi_schemas(settings) -> dict:
    return {"Image": {
        "type": "object", "required": ["image_id", "seq", "uri", "uris", "metadata"],
        "properties": {
            "image_id": {"type": "string"}, "seq": {"type": "integer"},
            "uri": {"type": "string"}, "collection": {"type": ["string", "null"]},
            "format": {"type": ["string", "null"]}, "width": {"type": ["integer", "null"]},
            "height": {"type": ["integer", "null"]}, "bytes": {"type": ["integer", "null"]},
            "mtime": {"type": ["string", "null"], "format": "date-time"},
            "run_id": {"type": ["string", "null"]},
            "ingested_at": {"type": ["string", "null"], "format": "date-time"},
            "uris": {"type": "array", "items": {"type": "string"}},
            "metadata": {"type": "object", "description": "Imported metadata columns with a value "
                         "(imagelake metadata import); empty when none", "additionalProperties": True},
            "capture": {"type": "object", "description": "Capture metadata fields with a value (the capture "
                        "table: taken_at, camera, gps_lat, ...); empty when none", "additionalProperties": True},
            "quality": {"type": ["object", "null"], "description": "The image_quality row (measures and flags); "
                        "null before the quality step ran", "additionalProperties": True},
        },
    }}
