"""``POST /sql``: read-only SQL over every lake table, through the sandbox in :mod:`lake.sql`."""

from __future__ import annotations

import json

from flask import Blueprint, current_app, request

from api.auth import requires
from api.services import lake_reader
from lake.errors import BadInput

bp = Blueprint("query", __name__)

_USAGE = 'send a JSON object like {"sql": "SELECT count(*) FROM images", "max_rows": 100}'


@bp.post("/sql")
@requires("read")
def sql():
    reader = lake_reader()
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise BadInput(f"the request body is not a JSON object; {_USAGE}")
    text = body.get("sql")
    if not isinstance(text, str) or not text.strip():
        raise BadInput(f"missing \"sql\" (a non-empty string); {_USAGE}")
    limit = reader.settings.sql_max_rows
    max_rows = body.get("max_rows", limit)
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or not 1 <= max_rows <= limit:
        raise BadInput(f"max_rows must be an integer from 1 to {limit}, got {max_rows!r}")
    # the sandbox encodes the rows inside the time limit and sql_max_bytes; only the small
    # envelope is added here
    result = reader.query(text, max_rows=max_rows, as_json=True)
    head = json.dumps({"ok": True, "columns": result.columns, "types": result.types,
                       "truncated": result.truncated, "elapsed_ms": result.elapsed_ms})
    body = head[:-1] + ', "rows": ' + result.rows_json + "}"
    return current_app.response_class(body, mimetype="application/json")


def openapi_paths(settings) -> dict:
    from api.openapi import errors, json_response, ref

    return {"/sql": {"post": {
        "summary": "Read-only SQL over every lake table",
        "description": f"One read-only SELECT statement over every lake table but tokens; at most "
                       f"{settings.sql_max_rows} rows, {settings.sql_max_bytes} bytes and {settings.sql_timeout_s} s "
                       "(encoding included). A query that runs too long is a 400, a result over the byte "
                       "limit a 413. Needs the read scope.",
        "operationId": "sql",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["sql"], "properties": {
                "sql": {"type": "string", "minLength": 1},
                "max_rows": {"type": "integer", "minimum": 1, "maximum": settings.sql_max_rows},
            }}}}},
        "responses": {"200": json_response(ref("QueryResult"), "The result"), **errors(400, 413)},
    }}}


def openapi_schemas(settings) -> dict:
    return {"QueryResult": {
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
    }}
