"""``GET /health``: is the lake readable, and at which table versions."""

from __future__ import annotations

from flask import Blueprint, jsonify

from api.services import lake_reader

bp = Blueprint("health", __name__)


@bp.get("/health")
def health():
    reader = lake_reader()
    return jsonify({"ok": True, "tables": reader.versions(), "builds": {}, "lake": reader.lake.root})
