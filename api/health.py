"""``GET /health``: is the lake readable, and at which table versions.

Public, so it says nothing about where the lake lives: no lake path, and a refused build's reason
with its paths cut to file names (the server log has the full text)."""

from __future__ import annotations

from flask import Blueprint, jsonify

from api.auth import public
from api.errors import without_paths
from api.index_service import search_service
from api.services import lake_reader

bp = Blueprint("health", __name__)


@bp.get("/health")
@public
def health():
    reader = lake_reader()
    builds = {}
    index = search_service().status()
    if index:
        index["refused"] = [{**r, "error": without_paths(r["error"])} for r in index.get("refused", [])]
        builds["index"] = index
    return jsonify({"ok": True, "tables": reader.versions(), "builds": builds})


def openapi_paths(settings) -> dict:
    from api.openapi import errors, json_response, ref

    return {"/health": {"get": {
        "summary": "Table versions and loaded builds",
        "operationId": "health", "security": [],
        "responses": {"200": json_response(ref("Health"), "The lake is readable"), **errors()},
    }}}


def openapi_schemas(settings) -> dict:
    return {"Health": {
        "type": "object", "required": ["ok", "tables", "builds"],
        "properties": {
            "ok": {"const": True},
            "tables": {"type": "object", "description": "table -> Delta version (null: not created)",
                       "additionalProperties": {"type": ["integer", "null"]}},
            "builds": {"type": "object", "description": "loaded artifact builds; 'index': the similarity "
                       "index served (state serving | serving_previous | unavailable, build_id, "
                       "published_build_id, refused: builds that failed verification, with the reason "
                       "(paths cut to file names))"},
        },
    }}
