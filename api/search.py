"""Similarity search: ``GET /search/similar?image_id=&k=`` and ``POST /search/similar`` (an upload).

Both answer ``{"ok": true, "build_id", "results": [{"image_id", "score", "thumbnail_url"}]}``, best
first, ``score`` the cosine similarity, the query image itself never among the results. ``k`` is
1..``search_max_k`` (default 20). 503 while no index build is published. Both need only the
``read`` scope (the POST writes nothing).
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from api.auth import requires
from api.index_service import Hit, search_service
from api.openapi import API_PREFIX
from api.services import check_image_id, lake_reader
from api.uploads import read_upload, upload_embedder
from lake.errors import BadInput

bp = Blueprint("search", __name__)

DEFAULT_K = 20


def _k() -> int:
    settings = current_app.config["IMAGELAKE_SETTINGS"]
    raw = request.args.get("k")
    if raw is None and request.method == "POST" and request.mimetype == "multipart/form-data":
        raw = request.form.get("k")
    if raw is None or raw == "":
        return min(DEFAULT_K, settings.search_max_k)
    try:
        k = int(raw)
    except ValueError:
        raise BadInput(f"k must be an integer from 1 to {settings.search_max_k}, got {raw!r}") from None
    if not 1 <= k <= settings.search_max_k:
        raise BadInput(f"k must be an integer from 1 to {settings.search_max_k} (search_max_k), got {k}")
    return k


def _field(name: str) -> str | None:
    raw = request.args.get(name)
    if raw is None and request.method == "POST" and request.mimetype == "multipart/form-data":
        raw = request.form.get(name)
    return raw or None


def _allowed():
    """The seqs the ``where`` metadata filter selects, or None (no filter); a bad filter is a 400."""
    where = _field("where")
    return None if where is None else lake_reader().matching_seqs(where)


def _results(hits: list[Hit], build_id: str) -> dict:
    sizes = tuple(current_app.config["IMAGELAKE_SETTINGS"].thumbnail_sizes)
    size = 256 if 256 in sizes else max(sizes)
    return {"ok": True, "build_id": build_id, "results": [
        {"image_id": h.image_id, "score": round(h.score, 6),
         "thumbnail_url": f"{API_PREFIX}/images/{h.image_id}/thumbnail?size={size}"} for h in hits]}


@bp.get("/search/similar")
def similar_by_id():
    image_id = request.args.get("image_id")
    if not image_id:
        raise BadInput("pass ?image_id=<sha256 of the image> (or POST an image as multipart field 'image')")
    check_image_id(image_id)
    k, model, allowed = _k(), _field("model"), _allowed()
    service = search_service()
    build = service.require_build(model)
    if service.seq_of(image_id, model) is None:
        lake_reader().image(image_id)  # 404 if the lake does not know it at all
    hits = service.similar_to_image(image_id, k, model=model, allowed=allowed)
    return jsonify(_results(hits, build.build_id))


@bp.post("/search/similar")
@requires("read")  # a search writes nothing: the read scope is enough, even for a POST
def similar_by_upload():
    k, model, allowed = _k(), _field("model"), _allowed()
    upload = read_upload("image")
    service = search_service()
    build = service.require_build(model)
    embedded = upload_embedder().embed(upload.data, build.model)
    own = service.seq_of(upload.sha256, model)
    hits = service.similar_to_vector(embedded.vector, k, exclude_seqs=[] if own is None else [own],
                                     model=model, allowed=allowed)
    return jsonify(_results(hits, build.build_id))


def openapi_paths(settings) -> dict:
    from api.openapi import errors, json_response, ref

    k_param = {"name": "k", "in": "query", "required": False, "description": "how many results",
               "schema": {"type": "integer", "minimum": 1, "maximum": settings.search_max_k,
                          "default": min(DEFAULT_K, settings.search_max_k)}}
    model_param = {"name": "model", "in": "query", "required": False,
                   "description": "a features key (name@version[+bf16]) or a registry name; default: the indexed "
                                  "model whose build holds most images. Each model's newest published build "
                                  "answers for it; an unknown model is a 404",
                   "schema": {"type": "string", "maxLength": 200}}
    where_param = {"name": "where", "in": "query", "required": False,
                   "description": "metadata filter language (JSON, as in GET /images?where=): only images it "
                                  "selects are returned; still k hits when that many match",
                   "schema": {"type": "string"}}
    ok = json_response(ref("SimilarResults"), "The most similar images, best first (the query image excluded)")
    return {"/search/similar": {
        "get": {
            "summary": "Images most similar to an image of the lake",
            "operationId": "similarToImage",
            "parameters": [{"name": "image_id", "in": "query", "required": True,
                            "description": "sha256 of the query image's bytes",
                            "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}, k_param, model_param, where_param],
            "responses": {"200": ok, **errors(400, 404, 503)},
        },
        "post": {
            "summary": "Images most similar to an uploaded image (embedded with the index's model)",
            "operationId": "similarToUpload",
            "parameters": [k_param, model_param, where_param],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {"image": {"type": "string", "contentMediaType": "application/octet-stream",
                                         "description": "JPEG, PNG, WebP, GIF, BMP or TIFF; at most "
                                                        f"{settings.upload_max_bytes} bytes and "
                                                        f"{settings.upload_max_pixels} pixels"},
                               "k": {"type": "integer"}, "model": {"type": "string"},
                               "where": {"type": "string", "description": "as the where query parameter"}}}}}},
            "responses": {"200": ok, **errors(400, 409, 413, 415, 503)},
        },
    }}


def openapi_schemas(settings) -> dict:
    return {"SimilarResults": {
        "type": "object", "required": ["ok", "build_id", "results"],
        "properties": {
            "ok": {"const": True},
            "build_id": {"type": "string", "description": "the index build that answered"},
            "results": {"type": "array", "items": {
                "type": "object", "required": ["image_id", "score", "thumbnail_url"],
                "properties": {"image_id": {"type": "string"},
                               "score": {"type": "number", "description": "cosine similarity"},
                               "thumbnail_url": {"type": "string"}}}},
        },
    }}
