"""The OpenAPI 3.1 document of the HTTP API, and ``GET /openapi.json`` that serves it.

Every route under ``/api/v1`` is described here; a test fails when a route is missing. Add the
path here in the same change that adds a route.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify

from lake.settings import Settings

__all__ = ["API_PREFIX", "bp", "build_spec"]

API_PREFIX = "/api/v1"

bp = Blueprint("openapi", __name__)

_IMAGE_ID = {
    "name": "image_id", "in": "path", "required": True,
    "description": "sha256 of the image bytes",
    "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    """Error responses of a route: its own plus the 405 and 500 every route can answer."""
    return {str(s): {"$ref": f"#/components/responses/Error{s}"} for s in sorted({*statuses, 405, 500})}


def build_spec(settings: Settings) -> dict[str, Any]:
    """The document for ``settings`` (thumbnail sizes and row limits are filled in)."""
    sizes = list(settings.thumbnail_sizes)
    default_size = 256 if 256 in sizes else max(sizes)
    error_names = {400: "Bad input: a malformed id, a bad parameter, forbidden or failing SQL",
                   404: "Unknown route or resource", 405: "Method not allowed on this route",
                   413: "Request body larger than upload_max_bytes", 500: "Internal error (logged)"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imagelake API",
            "version": "1",
            "description": "Image-collection lakehouse. Every error is JSON "
                           '{"ok": false, "error": "...", "status": N} with that HTTP status.',
        },
        "servers": [{"url": API_PREFIX}],
        "paths": {
            "/health": {"get": {
                "summary": "Table versions and loaded builds",
                "operationId": "health",
                "responses": {"200": _json(_ref("Health"), "The lake is readable"), **_errors()},
            }},
            "/openapi.json": {"get": {
                "summary": "This document",
                "operationId": "openapi",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1 document"), **_errors()},
            }},
            "/images": {"get": {
                "summary": "A page of images in seq order, the total, and image counts per collection",
                "operationId": "listImages",
                "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 60}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}},
                    {"name": "collection", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": _json({"type": "object", "required": ["ok", "images", "total", "collections"], "properties": {
                        "ok": {"const": True}, "images": {"type": "array", "items": {"type": "object"}},
                        "total": {"type": "integer"}, "collections": {"type": "object"}}}, "One page"),
                    **_errors(400),
                },
            }},
            "/images/{image_id}": {"get": {
                "summary": "Image metadata and every path it was seen at",
                "operationId": "getImage",
                "parameters": [_IMAGE_ID],
                "responses": {
                    "200": _json({"type": "object", "required": ["ok", "image"], "properties": {
                        "ok": {"const": True}, "image": _ref("Image")}}, "The image"),
                    **_errors(400, 404),
                },
            }},
            "/images/{image_id}/thumbnail": {"get": {
                "summary": "JPEG thumbnail; immutable, cacheable forever, strong ETag",
                "operationId": "getThumbnail",
                "parameters": [_IMAGE_ID, {
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
                    **_errors(400, 404),
                },
            }},
            "/sql": {"post": {
                "summary": "Read-only SQL over every lake table",
                "description": f"One SELECT statement; at most {settings.sql_max_rows} rows and "
                               f"{settings.sql_timeout_s} s. A query that runs too long is a 400.",
                "operationId": "sql",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["sql"], "properties": {
                        "sql": {"type": "string", "minLength": 1},
                        "max_rows": {"type": "integer", "minimum": 1, "maximum": settings.sql_max_rows},
                    }}}}},
                "responses": {"200": _json(_ref("QueryResult"), "The result"), **_errors(400, 413)},
            }},
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object", "required": ["ok", "error", "status"],
                    "properties": {"ok": {"const": False}, "error": {"type": "string"},
                                   "status": {"type": "integer"}},
                },
                "Health": {
                    "type": "object", "required": ["ok", "tables", "builds", "lake"],
                    "properties": {
                        "ok": {"const": True},
                        "tables": {"type": "object", "description": "table -> Delta version (null: not created)",
                                   "additionalProperties": {"type": ["integer", "null"]}},
                        "builds": {"type": "object"},
                        "lake": {"type": "string"},
                    },
                },
                "Image": {
                    "type": "object", "required": ["image_id", "seq", "uri", "uris"],
                    "properties": {
                        "image_id": {"type": "string"}, "seq": {"type": "integer"},
                        "uri": {"type": "string"}, "collection": {"type": ["string", "null"]},
                        "format": {"type": ["string", "null"]}, "width": {"type": ["integer", "null"]},
                        "height": {"type": ["integer", "null"]}, "bytes": {"type": ["integer", "null"]},
                        "mtime": {"type": ["string", "null"], "format": "date-time"},
                        "run_id": {"type": ["string", "null"]},
                        "ingested_at": {"type": ["string", "null"], "format": "date-time"},
                        "uris": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "QueryResult": {
                    "type": "object",
                    "required": ["ok", "columns", "types", "rows", "truncated", "elapsed_ms"],
                    "properties": {
                        "ok": {"const": True},
                        "columns": {"type": "array", "items": {"type": "string"}},
                        "types": {"type": "array", "items": {"type": "string"}},
                        "rows": {"type": "array", "items": {"type": "array"}},
                        "truncated": {"type": "boolean"},
                        "elapsed_ms": {"type": "number"},
                    },
                },
            },
            "responses": {f"Error{s}": _json(_ref("Error"), text) for s, text in error_names.items()},
        },
    }


@bp.get("/openapi.json")
def openapi():
    return jsonify(build_spec(current_app.config["IMAGELAKE_SETTINGS"]))
