"""Fixtures shared by every test file: real lakes in tmp_path, the Flask app and its client.

Override ``lake`` in a test module to serve a lake with data in it.
"""

from __future__ import annotations

import pytest

from api import create_app
from lake.catalog import Lake
from lake.commit import ensure_tables
from lake.settings import Settings


@pytest.fixture
def lake_factory(tmp_path):
    """``make(name="lake") -> Lake``: a new lake under tmp_path with every catalog table created, empty."""
    def make(name: str = "lake") -> Lake:
        lake = Lake.at(tmp_path / name)
        ensure_tables(lake)
        return lake
    return make


@pytest.fixture
def lake(lake_factory) -> Lake:
    return lake_factory()


@pytest.fixture
def settings(lake) -> Settings:
    """Defaults, pointed at ``lake``, re-checking table versions on every request."""
    return Settings().replace(lake=lake.root, refresh_s=0.0)


@pytest.fixture
def app(settings):
    app = create_app(settings, {"TESTING": True})
    yield app
    app.extensions["imagelake"].close()


@pytest.fixture
def client(app):
    return app.test_client()
