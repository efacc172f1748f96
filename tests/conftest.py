"""Shared fixtures: image files made on the fly, lakes in tmp_path, one real Spark session."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
# embed's runtime selection by measurement is tested in tests/test_embed_runtime.py; elsewhere the
# fp32 reference keeps the features key and the vectors the same on every machine
os.environ.setdefault("IMAGELAKE_EMBED_RUNTIME", "ort-fp32")

from api import create_app  # noqa: E402
from lake.catalog import Lake  # noqa: E402
from lake.commit import ensure_tables  # noqa: E402
from lake.settings import Settings  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def make_jpeg(seed: int, size: tuple[int, int] = (64, 48), quality: int = 90, exif: bytes | None = None) -> bytes:
    """A distinct, photo-like JPEG: smooth gradients plus noise, so every seed hashes differently."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * rng.uniform(0.5, 3) + yy * rng.uniform(0, 2)) % 256,
                     (yy * rng.uniform(0.5, 3)) % 256,
                     ((xx + yy) * rng.uniform(0.2, 1.5)) % 256], axis=-1)
    arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    kwargs = {"exif": exif} if exif else {}
    Image.fromarray(arr).save(buf, "JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def write_images(folder: Path, n: int, start: int = 0, size=(64, 48), prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"{prefix}_{i:05d}.jpg"
        p.write_bytes(make_jpeg(i, size))
        paths.append(p)
    return paths


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
    """Override in a test module to serve a lake with data in it."""
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
def admin_token(lake) -> str:
    """A token with the admin scope in ``lake``."""
    from lake.tokens import create_token

    return create_token(lake, "admin", "test admin")[1]


@pytest.fixture
def client(app, admin_token):
    """A Flask test client that sends an admin token with every request."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {admin_token}"
    return client


@pytest.fixture
def local_settings(lake) -> Settings:
    return Settings(lake=lake.root, runner="local", partition_files=8)


@pytest.fixture(scope="session")
def spark():
    """One real Spark session for the whole run: local[2] with up to 3 attempts per task."""
    from jobs.spark import spark_session

    session = spark_session(Settings(master="local[2,3]"))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """The planted near-duplicates lake (tests/planted_images.py), built once per test session:
    (lake root, images folder, planted pairs)."""
    from planted_images import planted_lake

    return planted_lake(tmp_path_factory.getbasetemp() / "planted-template")


@pytest.fixture
def planted_copy(tmp_path, planted) -> Lake:
    """A private copy of the planted lake for one test (tests write clusters, tags, buckets)."""
    import shutil

    shutil.copytree(planted[0], tmp_path / "lake")
    return Lake.at(tmp_path / "lake")
