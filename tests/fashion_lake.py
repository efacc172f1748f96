"""Real features for the index and search tests: Fashion-MNIST images ingested and embedded once.

Embedding a few thousand 28x28 images with the ONNX runtime takes 20-40 s on two cores, so the
lake is built once per test session (a template under pytest's base temp folder, shared by every
test module through the file system) and each test gets its own copy. Set
``IMAGELAKE_TEST_CACHE=/some/dir`` to keep the template between sessions while developing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from lake.catalog import Lake
from lake.settings import Settings

__all__ = ["FASHION_AVAILABLE", "fashion_template", "copy_lake"]

FASHION_AVAILABLE = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()


def fashion_template(base: Path, n: int = 2500) -> tuple[Lake, Path]:
    """A lake with ``n`` Fashion-MNIST images ingested and embedded (LocalRunner); built on first call.

    Returns the lake and the folder of the PNGs it was built from (``<class>/fmnist_NNNNN.png``).
    """
    from imagelake.demo import write_fashion_mnist
    from jobs.embed.driver import run_embed
    from jobs.ingest.driver import run_ingest

    base = Path(os.environ.get("IMAGELAKE_TEST_CACHE") or base)
    root = base / f"fashion-template-{n}"
    root.mkdir(parents=True, exist_ok=True)
    lake, images = Lake.at(root / "lake"), root / "images"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            shutil.rmtree(lake.root, ignore_errors=True)
            write_fashion_mnist(images, n)
            settings = Settings(lake=lake.root, runner="local", partition_files=1024)
            run_ingest(lake, settings, str(images), collection="fashion-mnist")
            run_embed(lake, settings, partition_rows=1024)
            (root / "done").write_text("ok")
    return lake, images


def copy_lake(template: Lake, target: Path) -> Lake:
    shutil.copytree(template.root, target)
    return Lake.at(target)
