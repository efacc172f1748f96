"""The OpenAPI 3.1 document of the HTTP API, and ``GET /openapi.json`` that serves it.

Each API area (a module with a blueprint ``bp``) describes its own routes in
``openapi_paths(settings) -> {path: {method: operation}}`` and may add component schemas in
``openapi_schemas(settings)``; :func:`build_spec` merges them. A test fails when a route is
missing, so add the path in the same change that adds a route.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Iterable

from flask import Blueprint, current_app, jsonify

from api.auth import public
from lake.settings import Settings

__all__ = ["API_PREFIX", "IMAGE_ID_PARAM", "bp", "build_spec", "errors", "json_response", "ref"]

API_PREFIX = "/api/v1"

bp = Blueprint("openapi", __name__)

IMAGE_ID_PARAM = {
    "name": "image_id", "in": "path", "required": True,
    "description": "sha256 of the image bytes",
    "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
}

_ERROR_TEXT = {
    400: "Bad input: a malformed id, a bad parameter, forbidden or failing SQL",
    401: "No token, or an unknown, revoked or malformed one",
    403: "The token's scope is too small, or a cross-site cookie write or login",
    404: "Unknown route or resource",
    405: "Method not allowed on this route",
    409: "Conflict with the current state",
    413: "Request body larger than upload_max_bytes, too many form parts or pixels (the message names the limit)",
    415: "Unsupported image format, or a body that is not application/json where JSON is required",
    500: "Internal error: the message names only a request id; the server log has the details under it",
    503: "Not available yet (e.g. no index build published)",
}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_response(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def errors(*statuses: int) -> dict[str, Any]:
    """Error responses of a route: its own plus the 405 and 500 every route can answer."""
    return {str(s): {"$ref": f"#/components/responses/Error{s}"} for s in sorted({*statuses, 405, 500})}


def _secured(paths: dict[str, Any]) -> dict[str, Any]:
    """Routes that need a token answer 401/403 too (the auth hook runs before them)."""
    for item in paths.values():
        for op in item.values():
            if op.get("security") != []:
                op.setdefault("security", [{"bearer": []}, {"cookie": []}])
                op["responses"].update(errors(401, 403))
    return paths


def build_spec(settings: Settings, areas: Iterable[ModuleType]) -> dict[str, Any]:
    """The document for ``settings`` from the ``areas`` (modules) the app serves."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object", "required": ["ok", "error", "status"],
            "properties": {"ok": {"const": False}, "error": {"type": "string"},
                           "status": {"type": "integer"}},
        },
    }
    for area in areas:
        if hasattr(area, "openapi_paths"):
            for path, item in area.openapi_paths(settings).items():
                paths.setdefault(path, {}).update(item)
        if hasattr(area, "openapi_schemas"):
            schemas.update(area.openapi_schemas(settings))
    if settings.auth:
        _secured(paths)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imagelake API",
            "version": "1",
            "description": "Image-collection lakehouse. Every error is JSON "
                           '{"ok": false, "error": "...", "status": N} with that HTTP status. '
                           "Reads need a token with the read scope, writes the curate scope.",
        },
        "servers": [{"url": API_PREFIX}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": schemas,
            "responses": {f"Error{s}": json_response(ref("Error"), text) for s, text in _ERROR_TEXT.items()},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "il_... token"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": "imagelake_token"},
            },
        },
    }


def openapi_paths(settings: Settings) -> dict[str, Any]:
    return {"/openapi.json": {"get": {
        "summary": "This document",
        "operationId": "openapi", "security": [],
        "responses": {"200": json_response({"type": "object"}, "OpenAPI 3.1 document"), **errors()},
    }}}


@bp.get("/openapi.json")
@public
def openapi():
    return jsonify(build_spec(current_app.config["IMAGELAKE_SETTINGS"], current_app.config["IMAGELAKE_AREAS"]))
