"""Image metadata and thumbnails. Thumbnails are content-addressed, so they cache forever."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from api.services import check_image_id, lake_reader
from lake.errors import BadInput
from lake.sql import jsonable

bp = Blueprint("images", __name__)

_IMMUTABLE = "public, max-age=31536000, immutable"


@bp.get("/images")
def browse():
    """A page of images in seq order: ``?limit=`` (1..500, default 60), ``?offset=``, ``?collection=``."""
    limit = _int_arg("limit", 60, 1, 500)
    offset = _int_arg("offset", 0, 0, 2**62)
    page = lake_reader().browse(limit=limit, offset=offset, collection=request.args.get("collection") or None)
    return jsonify({"ok": True, **jsonable(page)})


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadInput(f"{name} must be an integer from {lo} to {hi}, got {raw!r}") from None
    if not lo <= value <= hi:
        raise BadInput(f"{name} must be an integer from {lo} to {hi}, got {value}")
    return value


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
