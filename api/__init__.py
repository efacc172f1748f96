"""The HTTP API: a Flask app factory, one blueprint per area, one error funnel.

``create_app()`` builds the app; it opens nothing: each server process opens its own DuckDB
connection and Delta handles on its first request (see :mod:`api.services`), or, under
``imagelake serve``, in :func:`warm_up` right after the worker starts.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from flask import Flask

from api import (auth, bucket_export, buckets, clusters, doubts, errors, facets, grid, health, images, index_service,
                 map_select, openapi, query, request_limits, search, services, signals, suggest, tags, upload_routes,
                 uploads)
from api import browse_filters, bulk_tags, map_dates, undo_redo
from api.openapi import API_PREFIX
from lake.settings import Settings, load_settings

__all__ = ["API_PREFIX", "AREAS", "create_app", "warm_up"]

log = logging.getLogger("imagelake.api")

# One module per API area: a blueprint ``bp`` plus ``openapi_paths(settings)`` describing its routes.
AREAS = (health, auth, signals, images, query, search, buckets, bucket_export, doubts, suggest, facets, clusters, tags, grid,
         map_select, map_dates, upload_routes, undo_redo, browse_filters, bulk_tags, openapi)


def create_app(settings: Settings | None = None, test_config: dict[str, Any] | None = None) -> Flask:
    """Build the Flask app.

    Args:
        settings: the lake and serving settings; :func:`lake.settings.load_settings` by default.
        test_config: Flask config overrides (``TESTING`` and the like), applied last.
    """
    settings = settings if settings is not None else load_settings()
    from lake.remote import configure

    configure(settings.storage_options, settings.lake)  # how this process reaches an object-store lake
    app = Flask(__name__, static_folder=None)  # the dashboard serves its own static files
    app.config.update(MAX_CONTENT_LENGTH=settings.upload_max_bytes)
    request_limits.init_app(app)  # bounded JSON nesting, form limits that name themselves
    if test_config:
        app.config.update(test_config)
    app.config["IMAGELAKE_SETTINGS"] = settings

    app.config["IMAGELAKE_AREAS"] = AREAS

    errors.init_app(app)
    auth.init_app(app)
    services.init_app(app, settings)
    index_service.init_app(app, settings)
    uploads.init_app(app, settings)
    buckets.init_app(app)
    suggest.init_app(app)
    grid.init_app(app)
    for area in AREAS:
        app.register_blueprint(area.bp, url_prefix=API_PREFIX)
    return app


def warm_up(app: Flask) -> threading.Thread:
    """Load what a worker's first requests would otherwise wait for — the lake's views, the
    thumbnail index, the suggestion matrix, the similarity index — in a background thread.
    ``imagelake serve`` calls it in each worker after the fork; never call it before forking (it
    starts deltalake). Requests are served meanwhile; whatever is not loaded yet loads on demand."""
    def run() -> None:
        with app.app_context():
            steps = (("lake views", lambda: services.lake_reader().refresh(force=True)),
                     ("thumbnail index", lambda: services.lake_reader().thumbnail_index()),
                     ("suggestion matrix", lambda: suggest.suggester().matrix()),
                     ("similarity index", lambda: index_service.search_service().refresh()))
            for name, step in steps:
                try:
                    step()
                except Exception as e:  # an empty lake, no features yet: the routes say so themselves
                    log.info("warm-up: %s not loaded: %s", name, e)

    thread = threading.Thread(target=run, name="imagelake-warm-up", daemon=True)
    thread.start()
    return thread
