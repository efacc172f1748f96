"""Fashion-MNIST as a real lake (ingest + embed with the real jobs), cached under test-artifacts/.

Used by tests/test_suggest.py (a small lake) and tests/bench/bench_suggest.py (up to all 70k).
Each image is written as a PNG whose name carries its class (``fm_<index>_c<label>.png``), so the
label of any image in the lake is recoverable from ``images.uri``. Building embeds on CPU
(≈ 150 img/s on 2 cores); the lake is reused while its ``ready`` marker exists.

    PYTHONPATH=. python tests/fashion.py 70000     # build the benchmark lake once
"""

from __future__ import annotations

import gzip
import os
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
_LABEL = re.compile(r"fm_\d+_c(\d)\.png$")


def available() -> bool:
    return (DATA / "train-images-idx3-ubyte.gz").is_file()


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 70k images (uint8, n x 28 x 28) and labels (train then test)."""
    images, labels = [], []
    for part in ("train", "t10k"):
        with gzip.open(DATA / f"{part}-images-idx3-ubyte.gz") as f:
            images.append(np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28))
        with gzip.open(DATA / f"{part}-labels-idx1-ubyte.gz") as f:
            labels.append(np.frombuffer(f.read(), np.uint8, offset=8))
    return np.concatenate(images), np.concatenate(labels)


def label_of(uri: str) -> int:
    """The class of ``fm_<index>_c<label>.png`` (this module's lakes) or of a file in a class folder
    (``imagelake.demo.write_fashion_mnist``'s layout, the quality benchmark's lakes)."""
    hit = _LABEL.search(uri)
    if hit:
        return int(hit.group(1))
    from imagelake.demo import FASHION_CLASSES

    return FASHION_CLASSES.index(Path(uri).parent.name)


def ingest_sample(n: int, folder: Path, seed: int = 0):
    """Ingest a seeded random sample of ``n`` Fashion-MNIST images (all classes), written as
    ``fm_<index>_c<label>.png`` under ``folder/png``, into a new lake at ``folder/lake``; returns
    ``(lake, settings)`` for the steps that follow."""
    from PIL import Image

    from jobs.ingest.driver import run_ingest
    from jobs.runner import LocalRunner
    from lake.catalog import Lake
    from lake.settings import Settings

    images, labels = load_arrays()
    pick = np.sort(np.random.default_rng(seed).permutation(len(images))[:n])
    png = folder / "png"
    png.mkdir(parents=True, exist_ok=True)
    for i in pick:
        p = png / f"fm_{i:05d}_c{labels[i]}.png"
        if not p.exists():
            Image.fromarray(images[i]).save(p)
    lake = Lake.at(folder / "lake")
    settings = Settings(lake=str(folder / "lake"), runner="local", partition_files=4096)
    run_ingest(lake, settings, str(png), collection="fashion", runner=LocalRunner())
    return lake, settings


def build(n: int, folder: Path | None = None, seed: int = 0) -> Path:
    """A lake of ``n`` Fashion-MNIST images (a seeded random sample, all classes) with features."""
    from jobs.embed import run_embed
    from jobs.runner import LocalRunner

    folder = folder or ROOT / "test-artifacts" / f"fashion-{n}-s{seed}"
    lake_dir = folder / "lake"
    if (folder / "ready").is_file():
        return lake_dir
    lake, settings = ingest_sample(n, folder, seed)
    run_embed(lake, settings, device="cpu", runner=LocalRunner(), partition_rows=4096)
    (folder / "ready").write_text("ok\n")
    return lake_dir


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    print(build(int(sys.argv[1]) if len(sys.argv) > 1 else 70000))
