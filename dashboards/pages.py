"""Dashboard pages. Data comes from the same reader the API uses; pages never write."""

from __future__ import annotations

from flask import Blueprint, render_template, request

from api.services import lake_reader
from lake.errors import BadInput

bp = Blueprint("dashboard", __name__, template_folder="templates", static_folder="static",
               static_url_path="/static")

PAGE = 60


@bp.get("/")
def index():
    reader = lake_reader()
    try:
        page = max(0, int(request.args.get("page", "0")))
    except ValueError:
        raise BadInput("page must be a non-negative integer") from None
    collection = request.args.get("collection") or None
    browse = reader.browse(limit=PAGE, offset=page * PAGE, collection=collection)
    return render_template("index.html", browse=browse, versions=reader.versions(), page=page,
                           page_size=PAGE, collection=collection,
                           thumb_size=min((s for s in reader.settings.thumbnail_sizes if s >= 96),
                                          default=max(reader.settings.thumbnail_sizes)))
