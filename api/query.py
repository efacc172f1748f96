"""``POST /sql``: read-only SQL over every lake table, through the sandbox in :mod:`lake.sql`."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from api.services import lake_reader
from lake.errors import BadInput
from lake.sql import jsonable

bp = Blueprint("query", __name__)

_USAGE = 'send a JSON object like {"sql": "SELECT count(*) FROM images", "max_rows": 100}'


@bp.post("/sql")
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
    result = reader.query(text, max_rows=max_rows)
    return jsonify({
        "ok": True,
        "columns": result.columns,
        "types": result.types,
        "rows": [jsonable(list(row)) for row in result.rows],
        "truncated": result.truncated,
        "elapsed_ms": result.elapsed_ms,
    })
