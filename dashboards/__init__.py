"""The web dashboard: server-rendered pages plus small JS modules, on top of the API app.

``create_app`` is what ``imagelake serve`` runs: the API blueprints under ``/api/v1`` and the
dashboard pages under ``/``.
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from api import create_app as create_api_app
from dashboards import pages
from lake.settings import Settings

__all__ = ["create_app"]


def create_app(settings: Settings | None = None, test_config: dict[str, Any] | None = None) -> Flask:
    app = create_api_app(settings, test_config)
    app.register_blueprint(pages.bp)
    return app
