"""``GET /facets``: how many images have each value of a metadata (or images) column.

List columns count each element (an image with subjects [fish, cod] counts once for each). The
column name is checked against the tables' current schemas and the optional ``where`` filter is
compiled with bound parameters (:mod:`lake.metadata_filter`), so nothing from the request is
interpolated into SQL.

Counts are maintained, not recomputed per request: each process keeps the answers of the last
:data:`_CACHE_SIZE` distinct requests (column, limit, filter) with the ``images`` and ``metadata``
table versions they were counted at; a request is answered from there until one of those tables
gets a new version, when the next request counts again (one scan per new version and question).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from flask import Blueprint, jsonify, request

from api.request_limits import int_arg
from api.services import lake_reader
from lake.errors import BadInput
from lake.metadata_filter import parse_filter
from lake.sql import jsonable

bp = Blueprint("facets", __name__)

_MAX_LIMIT = 10_000
_CACHE_SIZE = 256
_cache: OrderedDict[tuple, dict] = OrderedDict()
_cache_lock = threading.Lock()


def _counted(column: str, limit: int, raw_where: str | None) -> dict:
    reader = lake_reader()
    versions = reader.refresh()
    key = (reader.lake.root, column, limit, raw_where or "", versions.get("images"), versions.get("metadata"))
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    out = jsonable(reader.facets(column, limit=limit, where=parse_filter(raw_where)))
    with _cache_lock:
        _cache[key] = out
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return out


@bp.get("/facets")
def facets():
    column = request.args.get("column", "")
    if not column:
        raise BadInput("missing ?column=: name a metadata or images column, e.g. /facets?column=subjects")
    limit = int_arg("limit", 50, 1, _MAX_LIMIT)
    raw_where = request.args.get("where")
    parse_filter(raw_where)  # a bad filter is a 400 before anything is counted
    return jsonify({"ok": True, **_counted(column, limit, raw_where)})


def openapi_paths(settings) -> dict:
    from api.openapi import errors, json_response

    return {"/facets": {"get": {
        "summary": "Image counts per value of a metadata or images column (list columns: per element)",
        "description": "Values are ordered by count, then value. `images` is how many images matched "
                       "`where`, `missing` how many of them have no value, `distinct` how many values exist "
                       "(`truncated` when more than `limit`). An unknown column is a 404.",
        "operationId": "facets",
        "parameters": [
            {"name": "column", "in": "query", "required": True, "schema": {"type": "string"},
             "description": "A metadata column (see `imagelake metadata columns`) or an images column; "
                            "`images.X` / `metadata.X` pick one explicitly"},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                          "maximum": _MAX_LIMIT, "default": 50}},
            {"name": "where", "in": "query", "schema": {"type": "string"},
             "description": 'A metadata filter as JSON, e.g. {"year": {">=": 1900}} (README: the filter language)'},
        ],
        "responses": {
            "200": json_response({"type": "object", "required": ["ok", "column", "type", "values", "images",
                                                                  "missing", "distinct", "truncated"],
                                  "properties": {
                                      "ok": {"const": True}, "column": {"type": "string"}, "type": {"type": "string"},
                                      "values": {"type": "array", "items": {
                                          "type": "object", "required": ["value", "count"],
                                          "properties": {"value": {}, "count": {"type": "integer"}}}},
                                      "images": {"type": "integer"}, "missing": {"type": "integer"},
                                      "distinct": {"type": "integer"}, "truncated": {"type": "boolean"}}},
                                 "Counts per value"),
            **errors(400, 404),
        },
    }}}
