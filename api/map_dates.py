"""The map's overlay by capture date: ``GET /grid/<layout>/dates``, the cells of the images taken
in a date range (``capture.taken_at``, UTC days), with the layout's year histogram and the count
(or, with ``undated=true``, the cells) of the images that have no date.

One read of ``capture`` per layout and ``capture`` version (kept for the next request); a range is
then a mask over arrays, so moving the dashboard's year slider costs a few milliseconds.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import numpy as np
from flask import Blueprint, jsonify, request

from api.auth import requires
from api.grid import layout_store
from api.request_limits import int_arg
from api.services import lake_reader
from jobs.grid.store import LayoutView
from lake.errors import BadInput

__all__ = ["bp", "dated_cells", "openapi_paths"]

bp = Blueprint("map_dates", __name__)

DEFAULT_LIMIT = 20_000
MAX_LIMIT = 100_000
_EPOCH = dt.date(1970, 1, 1)
_USAGE = "from= and to= are dates (YYYY-MM-DD) or years (YYYY), to exclusive; e.g. ?from=2018&to=2022"
_cache: dict[tuple[str, int | None], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
_cache_lock = threading.Lock()


def dated_cells(view: LayoutView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cells of the dated images on the layout, their UTC day numbers since 1970-01-01, a mask of
    the non-empty cells without a date), cached per layout and ``capture`` version."""
    reader = lake_reader()
    key = (str(view.meta["layout_id"]), reader.refresh().get("capture"))
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    cur = reader.cursor()
    try:
        table = cur.sql("SELECT image_id, CAST(floor(epoch(taken_at) / 86400) AS INTEGER) AS day FROM capture "
                            "WHERE taken_at IS NOT NULL").to_arrow_table()
    finally:
        cur.close()
    occupied = np.array([i is not None for i in view.cell_ids], bool)
    if table.num_rows and len(view.sorted_ids):
        ids = np.asarray(table.column("image_id").to_pylist(), dtype=view.sorted_ids.dtype)
        days = table.column("day").to_numpy(zero_copy_only=False).astype(np.int32)
        pos = np.minimum(np.searchsorted(view.sorted_ids, ids), len(view.sorted_ids) - 1)
        on = view.sorted_ids[pos] == ids
        cells, days = view.sorted_cells[pos[on]].astype(np.int64), days[on]
        order = np.argsort(cells, kind="stable")  # row order, top left first
        cells, days = cells[order], days[order]
    else:
        cells, days = np.zeros(0, np.int64), np.zeros(0, np.int32)
    undated = occupied.copy()
    undated[cells] = False
    value = (cells, days, undated)
    with _cache_lock:
        for old in [k for k in _cache if k[0] == key[0]]:
            del _cache[old]
        if len(_cache) >= 8:
            _cache.pop(next(iter(_cache)))
        _cache[key] = value
    return value


def _day(name: str) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        day = dt.date(int(raw), 1, 1) if raw.isdigit() and len(raw) == 4 else dt.date.fromisoformat(raw)
    except ValueError:
        raise BadInput(f"{name} {raw[:40]!r} is not a date; {_USAGE}") from None
    return (day - _EPOCH).days


def _iso(day: int) -> str:
    return (_EPOCH + dt.timedelta(days=int(day))).isoformat()


@bp.get("/grid/<layout>/dates")
@requires("read")
def dates(layout: str):
    """Cells of the images taken in ``[from, to)`` (row order; ``day``: UTC days since 1970-01-01)."""
    first, last, limit = _day("from"), _day("to"), int_arg("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    undated_wanted = request.args.get("undated", "false")
    if undated_wanted not in ("true", "false", "1", "0"):
        raise BadInput(f"undated must be true or false, got {undated_wanted[:40]!r}")
    if first is not None and last is not None and first >= last:
        raise BadInput(f"from must be before to (to is exclusive); {_USAGE}")
    view = layout_store().view(layout)
    cells, days, undated = dated_cells(view)
    years = (days.astype("datetime64[D]").astype("datetime64[Y]").astype(np.int64) + 1970) if len(days) else days
    ys, counts = np.unique(years, return_counts=True)
    body: dict[str, Any] = {
        "ok": True, "layout_id": view.meta["layout_id"], "on_layout": int(len(view.sorted_ids)),
        "dated": int(len(cells)), "undated": int(undated.sum()),
        "taken_from": _iso(days.min()) if len(days) else None, "taken_to": _iso(days.max()) if len(days) else None,
        "years": [{"year": int(y), "images": int(n)} for y, n in zip(ys, counts)],
        "from": None if first is None else _iso(first), "to": None if last is None else _iso(last)}
    w = view.width
    if undated_wanted in ("true", "1"):
        chosen = np.flatnonzero(undated)
        body["count"] = int(len(chosen))
        body["cells"] = [{"gx": int(c % w), "gy": int(c // w)} for c in chosen[:limit]]
    else:
        keep = np.ones(len(cells), bool)
        if first is not None:
            keep &= days >= first
        if last is not None:
            keep &= days < last
        chosen, chosen_days = cells[keep], days[keep]
        body["count"] = int(len(chosen))
        body["cells"] = [{"gx": int(c % w), "gy": int(c // w), "day": int(d)}
                         for c, d in zip(chosen[:limit], chosen_days[:limit])]
    body["truncated"] = body["count"] > limit
    return jsonify(body)


def openapi_paths(settings) -> dict:
    from api.openapi import errors, json_response

    def q(name: str, description: str, schema: dict) -> dict:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}

    return {"/grid/{layout}/dates": {"get": {
        "summary": "Map overlay by capture date: cells of the images taken in a date range, the layout's years and undated count",
        "operationId": "gridDates",
        "parameters": [{"name": "layout", "in": "path", "required": True, "schema": {"type": "string"},
                        "description": "a layout id or `latest`"},
                       q("from", "first day (YYYY-MM-DD, or a year YYYY), UTC, inclusive", {"type": "string"}),
                       q("to", "last day, exclusive (YYYY-MM-DD or YYYY)", {"type": "string"}),
                       q("undated", "answer the cells of the images without a date instead", {"type": "boolean"}),
                       q("limit", f"at most this many cells (default {DEFAULT_LIMIT})",
                         {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT})],
        "responses": {"200": json_response({"type": "object", "properties": {
            "ok": {"const": True}, "layout_id": {"type": "string"}, "on_layout": {"type": "integer"},
            "dated": {"type": "integer"}, "undated": {"type": "integer"},
            "taken_from": {"type": ["string", "null"]}, "taken_to": {"type": ["string", "null"]},
            "years": {"type": "array", "items": {"type": "object", "properties": {
                "year": {"type": "integer"}, "images": {"type": "integer"}}}},
            "from": {"type": ["string", "null"]}, "to": {"type": ["string", "null"]},
            "count": {"type": "integer"}, "truncated": {"type": "boolean"},
            "cells": {"type": "array", "items": {"type": "object", "properties": {
                "gx": {"type": "integer"}, "gy": {"type": "integer"}, "day": {"type": "integer"}}}}}},
            "The cells in the range (or the undated ones), in row order"),
            **errors(400, 404)}}}}
