"""The grid map: layouts, deep-zoom (DZI) tiles, cell ↔ image lookups and overlay cell lists.

``<layout>`` is a layout id or ``latest`` (the newest). Tiles of a layout never change (a new run
makes a new layout), so tiles and the DZI document are served with immutable caching and strong
ETags; ``latest`` resolves first, and its responses name the real id (``X-Layout-Id``), so a
viewer should load ``/grid/latest`` once and then use the id it names.
"""

from __future__ import annotations

from flask import Blueprint, Flask, Response, current_app, jsonify, request

from api.auth import requires
from api.per_process import PerProcess
from api.services import check_image_id
from jobs.grid.store import LayoutStore, LayoutView
from lake.catalog import Lake
from lake.errors import BadInput, NotFound
from lake.sql import jsonable

bp = Blueprint("grid", __name__)

# private: these answers need a token, so a shared cache (a proxy, a CDN) must not keep them and
# hand them to others; the browser's own cache keeps them for good (content-addressed, never rewritten).
_IMMUTABLE = "private, max-age=31536000, immutable"
_MAX_IDS = 100_000


def init_app(app: Flask) -> None:
    settings = app.config["IMAGELAKE_SETTINGS"]
    lake = Lake.at(settings.lake)
    def make() -> LayoutStore:
        from lake.artifact_cache import artifact_cache

        return LayoutStore(lake, refresh_s=settings.refresh_s, tile_cache=settings.grid_tile_cache,
                           artifact_cache=None if lake.is_local else artifact_cache(settings))
    app.extensions["imagelake.grid"] = PerProcess(make)


def layout_store() -> LayoutStore:
    """This process's store for the current app (made on first use: deltalake must not cross a fork)."""
    return current_app.extensions["imagelake.grid"].get()


def _public_meta(meta: dict) -> dict:
    return jsonable({k: v for k, v in meta.items()})


def _view(layout: str) -> LayoutView:
    return layout_store().view(layout)


def _cached(body: bytes | str, mimetype: str, etag: str, layout_id: str) -> Response:
    headers = {"Cache-Control": _IMMUTABLE, "X-Layout-Id": layout_id}
    if request.if_none_match.contains(etag):
        response = Response(status=304, headers=headers)
    else:
        response = Response(body, mimetype=mimetype, headers=headers)
    response.set_etag(etag)
    return response


@bp.get("/grid")
def layouts():
    """Every published layout, newest first."""
    return jsonify({"ok": True, "layouts": [_public_meta(m) for m in layout_store().layouts()]})


@bp.get("/grid/<layout>")
def layout(layout: str):
    meta = layout_store().resolve(layout)
    view = _view(layout)
    p = view.tiles.pyramid
    return jsonify({"ok": True, "layout": _public_meta(meta),
                    "dzi": {"url": f"grid/{meta['layout_id']}.dzi", "width": p.full_size[0],
                            "height": p.full_size[1], "tile_size": p.tile, "overlap": 0,
                            "max_level": p.max_level, "cell_px": p.cell_px,
                            "tiles": f"grid/{meta['layout_id']}/tiles/{{z}}/{{x}}_{{y}}.jpg"}})


@bp.get("/grid/<layout>.dzi")
def dzi(layout: str):
    view = _view(layout)
    lid = view.meta["layout_id"]
    return _cached(view.tiles.pyramid.dzi_xml(), "application/xml", f"{lid}-dzi", lid)


@bp.get("/grid/<layout>/tiles/<int(signed=True):z>/<int(signed=True):x>_<int(signed=True):y>.jpg")
@bp.get("/grid/<layout>_files/<int(signed=True):z>/<int(signed=True):x>_<int(signed=True):y>.jpg")
def tile(layout: str, z: int, x: int, y: int):
    view = _view(layout)
    lid = view.meta["layout_id"]
    data = view.tiles.tile(z, x, y)
    return _cached(data, "image/jpeg", f"{lid}-{z}-{x}-{y}", lid)


def _int_arg(name: str) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        raise BadInput(f"missing ?{name}= (a grid cell coordinate, an integer)")
    try:
        return int(raw)
    except ValueError:
        raise BadInput(f"{name} must be an integer, got {raw!r}") from None


@bp.get("/grid/<layout>/cell")
def cell(layout: str):
    view = _view(layout)
    gx, gy = _int_arg("x"), _int_arg("y")
    return jsonify({"ok": True, "layout_id": view.meta["layout_id"], "gx": gx, "gy": gy,
                    "image_id": view.image_at(gx, gy)})


@bp.get("/grid/<layout>/images/<image_id>")
def image_cell(layout: str, image_id: str):
    check_image_id(image_id)
    view = _view(layout)
    cells, _ = view.cells_of([image_id])
    if not cells:
        raise NotFound(f"image {image_id} is not on layout {view.meta['layout_id']}")
    return jsonify({"ok": True, "layout_id": view.meta["layout_id"], **cells[0]})


@bp.get("/grid/<layout>/overlay")
def overlay(layout: str):
    """Cells of the images carrying ``?tag=`` (for highlighting on the map)."""
    tag = request.args.get("tag")
    if tag is None:
        raise BadInput("missing ?tag= (the overlay shows the cells of the images with that tag)")
    view = _view(layout)
    ids = layout_store().tag_image_ids(tag)
    cells, missing = view.cells_of(ids)
    return jsonify({"ok": True, "layout_id": view.meta["layout_id"], "tag": tag, "cells": cells,
                    "not_on_layout": len(missing)})


@bp.post("/grid/<layout>/cells")
@requires("read")
def cells(layout: str):
    """Cells of the given images: ``{"image_ids": [...]}`` (any overlay: a bucket, search results)."""
    usage = 'send a JSON object like {"image_ids": ["<sha256>", ...]}'
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("image_ids"), list):
        raise BadInput(f"the body must be a JSON object with an \"image_ids\" list; {usage}")
    ids = body["image_ids"]
    if len(ids) > _MAX_IDS:
        raise BadInput(f"at most {_MAX_IDS} image ids per request, got {len(ids)}")
    for i in ids:
        if not isinstance(i, str):
            raise BadInput(f"image_ids must be strings; {usage}")
        check_image_id(i)
    view = _view(layout)
    found, missing = view.cells_of(ids)
    return jsonify({"ok": True, "layout_id": view.meta["layout_id"], "cells": found, "missing": missing})


def openapi_paths(settings) -> dict:
    from api.openapi import IMAGE_ID_PARAM, errors, json_response, ref

    lay = {"name": "layout", "in": "path", "required": True,
           "description": "a layout id, or `latest` for the newest", "schema": {"type": "string"}}
    cells_schema = {"type": "array", "items": ref("GridCell")}
    return {
        "/grid": {"get": {
            "summary": "Published grid layouts, newest first, with size and quality",
            "operationId": "listGridLayouts",
            "responses": {"200": json_response({"type": "object", "properties": {
                "ok": {"const": True}, "layouts": {"type": "array", "items": ref("GridLayout")}}},
                "The layouts"), **errors()},
        }},
        "/grid/{layout}": {"get": {
            "summary": "One layout's metadata and its deep-zoom geometry",
            "operationId": "getGridLayout", "parameters": [lay],
            "responses": {"200": json_response({"type": "object", "properties": {
                "ok": {"const": True}, "layout": ref("GridLayout"), "dzi": {"type": "object"}}},
                "The layout"), **errors(404)},
        }},
        "/grid/{layout}.dzi": {"get": {
            "summary": "The Deep Zoom Image descriptor (XML) of a layout's mosaic",
            "operationId": "getGridDzi", "parameters": [lay],
            "responses": {"200": {"description": "DZI XML; immutable, with an ETag",
                                  "content": {"application/xml": {"schema": {"type": "string"}}}},
                          "304": {"description": "Not modified"}, **errors(404)},
        }},
        "/grid/{layout}/tiles/{z}/{x}_{y}.jpg": {"get": {
            "summary": "One 256 px JPEG tile (DZI level numbering: z = 0 is 1x1 px, the top level is full size)",
            "operationId": "getGridTile",
            "parameters": [lay] + [{"name": n, "in": "path", "required": True, "schema": {"type": "integer"}}
                                   for n in ("z", "x", "y")],
            "responses": {"200": {"description": "JPEG; immutable, with an ETag",
                                  "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
                          "304": {"description": "Not modified"}, **errors(404)},
        }},
        "/grid/{layout}_files/{z}/{x}_{y}.jpg": {"get": {
            "summary": "The same tile at the path DZI viewers derive from the .dzi URL (OpenSeadragon)",
            "operationId": "getGridDziTile",
            "parameters": [lay] + [{"name": n, "in": "path", "required": True, "schema": {"type": "integer"}}
                                   for n in ("z", "x", "y")],
            "responses": {"200": {"description": "JPEG; immutable, with an ETag",
                                  "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
                          "304": {"description": "Not modified"}, **errors(404)},
        }},
        "/grid/{layout}/cell": {"get": {
            "summary": "The image in grid cell (x, y)",
            "operationId": "getGridCell",
            "parameters": [lay] + [{"name": n, "in": "query", "required": True, "schema": {"type": "integer"}}
                                   for n in ("x", "y")],
            "responses": {"200": json_response(ref("GridCell"), "The cell and its image"),
                          **errors(400, 404)},
        }},
        "/grid/{layout}/images/{image_id}": {"get": {
            "summary": "The cell of an image on a layout",
            "operationId": "getGridImageCell", "parameters": [lay, IMAGE_ID_PARAM],
            "responses": {"200": json_response(ref("GridCell"), "The cell"), **errors(400, 404)},
        }},
        "/grid/{layout}/overlay": {"get": {
            "summary": "Cells of the images with a tag (any source), for a map overlay",
            "operationId": "getGridTagOverlay",
            "parameters": [lay, {"name": "tag", "in": "query", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": json_response({"type": "object", "properties": {
                "ok": {"const": True}, "layout_id": {"type": "string"}, "tag": {"type": "string"},
                "cells": cells_schema, "not_on_layout": {"type": "integer"}}}, "The cells"),
                **errors(400, 404)},
        }},
        "/grid/{layout}/cells": {"post": {
            "summary": "Cells of the given images (any overlay: a bucket, search results); needs the read scope",
            "operationId": "postGridCells", "parameters": [lay],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["image_ids"], "properties": {
                    "image_ids": {"type": "array", "maxItems": _MAX_IDS,
                                  "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}}}}}},
            "responses": {"200": json_response({"type": "object", "properties": {
                "ok": {"const": True}, "layout_id": {"type": "string"}, "cells": cells_schema,
                "missing": {"type": "array", "items": {"type": "string"}}}}, "The cells"),
                **errors(400, 404, 413)},
        }},
    }


def openapi_schemas(settings) -> dict:
    return {
        "GridCell": {"type": "object", "required": ["image_id", "gx", "gy"], "properties": {
            "image_id": {"type": "string"}, "gx": {"type": "integer"}, "gy": {"type": "integer"}}},
        "GridLayout": {"type": "object", "properties": {
            "layout_id": {"type": "string"}, "model": {"type": "string"},
            "where_sql": {"type": ["string", "null"]}, "seed": {"type": "integer"},
            "n": {"type": "integer"}, "width": {"type": "integer"}, "height": {"type": "integer"},
            "method": {"type": "string"},
            "quality": {"type": ["number", "null"], "description": "neighbourhood preservation: mean share of a cell's 8 grid neighbours among its 50 nearest in feature space"},
            "quality_sample": {"type": "integer"}, "features_version": {"type": "integer"},
            "tiles_path": {"type": "string"}, "params": {"type": "string"}, "run_id": {"type": "string"},
            "created_at": {"type": "string"}}},
    }
