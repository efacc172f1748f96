"""Derived signals over HTTP: the most unusual images (``outliers``) and keyword search (``/search/text``).

Routes only translate HTTP: the scores come from the ``outliers`` table (the pipeline's outliers
step) and :mod:`api.text_search`.
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from api.request_limits import int_arg
from api.services import lake_reader
from api.text_search import MAX_QUERY, search_text
from lake.errors import Unavailable

bp = Blueprint("signals", __name__)

MAX_UNUSUAL = 1000


@bp.get("/images/unusual")
def unusual():
    """The ``n`` most unusual images of the newest scored index build, most unusual first."""
    n = int_arg("n", 20, 1, MAX_UNUSUAL)
    reader = lake_reader()
    latest = reader.select("SELECT build_id FROM outliers ORDER BY created_at DESC, build_id DESC LIMIT 1")
    if not latest:
        raise Unavailable("no outlier scores yet; run the pipeline's outliers step "
                          "(imagelake run --steps index,outliers) after an index build")
    build_id = latest[0]["build_id"]
    rows = reader.select("SELECT image_id, score FROM outliers WHERE build_id = ? ORDER BY score DESC, image_id "
                         "LIMIT ?", [build_id, n])
    return jsonify({"ok": True, "build_id": build_id,
                    "results": [{"image_id": r["image_id"], "score": round(float(r["score"]), 6)} for r in rows]})


@bp.get("/search/text")
def text():
    """Images matching words: ImageNet concepts, tags, metadata values (see :mod:`api.text_search`)."""
    max_k = current_app.config["IMAGELAKE_SETTINGS"].search_max_k
    k = int_arg("k", 20, 1, max_k)
    results = search_text(lake_reader(), request.args.get("q", ""), k)
    return jsonify({"ok": True, "results": results})


def openapi_paths(settings) -> dict:
    from api.openapi import errors, json_response

    hit = {"type": "object", "required": ["image_id", "score"], "properties": {
        "image_id": {"type": "string"}, "score": {"type": "number"}}}
    text_hit = {"type": "object", "required": ["image_id", "score", "matched"], "properties": {
        "image_id": {"type": "string"}, "score": {"type": "number"},
        "matched": {"type": "array", "items": {"type": "string"}}}}
    return {
        "/images/unusual": {"get": {
            "summary": "The most unusual images: 1 - mean cosine similarity to their k nearest neighbours",
            "description": "Scores of the newest index build scored by the pipeline's outliers step "
                           "(setting outlier_k); 503 before any.",
            "operationId": "unusualImages",
            "parameters": [{"name": "n", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                     "maximum": MAX_UNUSUAL, "default": 20}}],
            "responses": {
                "200": json_response({"type": "object", "required": ["ok", "results"], "properties": {
                    "ok": {"const": True}, "build_id": {"type": "string"},
                    "results": {"type": "array", "items": hit}}}, "Most unusual first"),
                **errors(400, 503),
            },
        }},
        "/search/text": {"get": {
            "summary": "Keyword search: ImageNet concept names, tags and metadata values, best first",
            "description": "score: the probability of the best matching concept, the tag's score (1 for a user "
                           "tag), or 1 for a metadata value containing the words; matched names what matched.",
            "operationId": "searchText",
            "parameters": [
                {"name": "q", "in": "query", "required": True,
                 "schema": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY}},
                {"name": "k", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                          "maximum": settings.search_max_k, "default": 20}},
            ],
            "responses": {
                "200": json_response({"type": "object", "required": ["ok", "results"], "properties": {
                    "ok": {"const": True}, "results": {"type": "array", "items": text_hit}}}, "Best first"),
                **errors(400),
            },
        }},
    }
