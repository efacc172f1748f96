"""Selection on the map: the images whose cells lie inside a rectangle or a lasso (a polygon in
cell units), ``POST /grid/<layout>/select``. The dashboard draws the lasso; this answers which
images it holds, so a selection of thousands of cells is one request."""

from __future__ import annotations

import math

import numpy as np
from flask import Blueprint, jsonify, request

from api.auth import requires
from api.grid import layout_store
from lake.errors import BadInput

__all__ = ["bp", "cells_in_polygon", "openapi_paths"]

bp = Blueprint("map_select", __name__)

MAX_POINTS = 2000
MAX_SELECTED = 100_000
_USAGE = 'send {"polygon": [[x, y], ...]} in cell units (3 to 2000 points; a rectangle is 4)'


def cells_in_polygon(polygon: np.ndarray, width: int, height: int) -> np.ndarray:
    """Indices (gy * width + gx) of the cells whose centres lie inside ``polygon`` (even-odd rule)."""
    x0, y0 = np.floor(polygon.min(axis=0)).astype(int)
    x1, y1 = np.ceil(polygon.max(axis=0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x0 >= x1 or y0 >= y1:
        return np.zeros(0, np.int64)
    gx, gy = np.meshgrid(np.arange(x0, x1), np.arange(y0, y1))
    px, py = gx.ravel() + 0.5, gy.ravel() + 0.5
    inside = np.zeros(px.shape, bool)
    xs, ys = polygon[:, 0], polygon[:, 1]
    for i in range(len(polygon)):  # ray casting, one edge at a time over every candidate cell
        xa, ya, xb, yb = xs[i - 1], ys[i - 1], xs[i], ys[i]
        if ya == yb:
            continue
        crosses = (ya > py) != (yb > py)
        at = xa + (py - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (px < at)
    return (gy.ravel()[inside].astype(np.int64) * width + gx.ravel()[inside])


def _polygon(body) -> np.ndarray:
    if not isinstance(body, dict) or not isinstance(body.get("polygon"), list):
        raise BadInput(f"the body must be a JSON object with a \"polygon\" list; {_USAGE}")
    points = body["polygon"]
    if not 3 <= len(points) <= MAX_POINTS:
        raise BadInput(f"the polygon has {len(points)} points; {_USAGE}")
    out = []
    for p in points:
        if (not isinstance(p, list) or len(p) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)):
            raise BadInput(f"each point must be [x, y] with two finite numbers, got {p!r}; {_USAGE}")
        out.append(p)
    return np.asarray(out, dtype=np.float64)


@bp.post("/grid/<layout>/select")
@requires("read")
def select(layout: str):
    """Image ids of the non-empty cells inside the polygon, in row order (top left first)."""
    polygon = _polygon(request.get_json(force=True, silent=True))
    view = layout_store().view(layout)
    cells = cells_in_polygon(polygon, view.width, view.height)
    ids = view.cell_ids[cells] if len(cells) else np.zeros(0, object)
    keep = np.array([i is not None for i in ids], bool) if len(ids) else np.zeros(0, bool)
    cells, ids = cells[keep], ids[keep]
    truncated = len(ids) > MAX_SELECTED
    cells, ids = cells[:MAX_SELECTED], ids[:MAX_SELECTED]
    return jsonify({"ok": True, "layout_id": view.meta["layout_id"], "image_ids": [str(i) for i in ids],
                    "cells": [{"gx": int(c % view.width), "gy": int(c // view.width)} for c in cells],
                    "truncated": bool(truncated)})


def openapi_paths(settings) -> dict:
    from api.openapi import errors, json_response

    return {"/grid/{layout}/select": {"post": {
        "summary": "Images whose cells lie inside a rectangle or lasso (a polygon in cell units)",
        "operationId": "selectGridCells",
        "parameters": [{"name": "layout", "in": "path", "required": True, "schema": {"type": "string"},
                        "description": "a layout id or `latest`"}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["polygon"], "properties": {"polygon": {
                "type": "array", "minItems": 3, "maxItems": MAX_POINTS,
                "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "number"}}}}}}}},
        "responses": {"200": json_response({"type": "object", "properties": {
            "ok": {"const": True}, "layout_id": {"type": "string"},
            "image_ids": {"type": "array", "items": {"type": "string"}},
            "cells": {"type": "array", "items": {"type": "object", "properties": {
                "gx": {"type": "integer"}, "gy": {"type": "integer"}}}},
            "truncated": {"type": "boolean"}}}, f"The selected images (at most {MAX_SELECTED})"),
            **errors(400, 404)}}}}
