"""``imagelake demo``: a demo lake from images that ship with installed packages.

scikit-image's sample photos (plus a few crops and flips of them, so near-duplicates exist) and,
when Debian's ``dataset-fashion-mnist`` is installed, Fashion-MNIST images written out as PNGs
in class folders. Nothing is downloaded. Safe to run again: files already written are kept and
the incremental ingest adds nothing new.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lake.catalog import Lake
from lake.settings import Settings

__all__ = ["build_demo", "write_skimage_photos", "write_fashion_mnist", "FASHION_MNIST_DIR", "FASHION_CLASSES"]

log = logging.getLogger("imagelake.demo")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")
_SKIMAGE_PHOTOS = ("astronaut", "camera", "cat", "chelsea", "coffee", "coins", "horse", "hubble_deep_field",
                   "immunohistochemistry", "moon", "motorcycle_left", "page", "retina", "rocket", "text")


def write_skimage_photos(out: Path, variants: bool = True) -> int:
    """Write scikit-image's sample photos as JPEGs (and a few variants of each); returns files written."""
    from skimage import data as skdata

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in _SKIMAGE_PHOTOS:
        loader = getattr(skdata, name, None)
        if loader is None:
            continue
        target = out / f"{name}.jpg"
        if target.exists():
            continue
        try:
            arr = loader()
        except Exception as e:  # a sample missing from this scikit-image build
            log.warning("skipping scikit-image sample %s: %s", name, e)
            continue
        if isinstance(arr, tuple):
            arr = arr[0]
        arr = np.asarray(arr)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype != np.uint8:
            arr = (255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-9)).astype(np.uint8)
        im = Image.fromarray(arr).convert("RGB")
        im.save(target, quality=92)
        n += 1
        if variants:
            w, h = im.size
            im.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save(out / f"{name}_crop.jpg", quality=90)
            ImageOps.mirror(im).save(out / f"{name}_flip.jpg", quality=90)
            im.resize((w // 2, h // 2)).save(out / f"{name}_small.jpg", quality=70)
            n += 3
    return n


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images (uint8, 28x28) and labels, train then test."""
    images = np.concatenate([_idx(root / "train-images-idx3-ubyte.gz"), _idx(root / "t10k-images-idx3-ubyte.gz")])
    labels = np.concatenate([_idx(root / "train-labels-idx1-ubyte.gz"), _idx(root / "t10k-labels-idx1-ubyte.gz")])
    return images, labels


def write_fashion_mnist(out: Path, limit: int, root: Path = FASHION_MNIST_DIR) -> int:
    """Write the first ``limit`` Fashion-MNIST images as PNGs under ``out/<class>/``; 0 if not installed."""
    if limit <= 0 or not (root / "train-images-idx3-ubyte.gz").exists():
        return 0
    images, labels = load_fashion_mnist(root)
    n = 0
    for i in range(min(limit, len(images))):
        folder = out / FASHION_CLASSES[labels[i]]
        target = folder / f"fmnist_{i:05d}.png"
        if target.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(target)
        n += 1
    return n


def build_demo(lake: Lake, settings: Settings, data_dir: str = "./demo-data", fashion_mnist: int = 5000) -> str:
    """Write the demo images, run the whole pipeline over them, and make a curate token.

    Returns the token (printed too: it is the dashboard login and is shown only now).
    """
    from jobs.ingest.driver import run_ingest
    from jobs.pipeline import PipelineRequest, run_pipeline
    from jobs.runner import make_runner
    from lake.tokens import create_token

    root = Path(data_dir).absolute()
    photos = write_skimage_photos(root / "photos")
    fashion = write_fashion_mnist(root / "fashion-mnist", fashion_mnist)
    print(f"demo data in {root}: {photos} photos and {fashion} Fashion-MNIST images newly written")
    runner = make_runner(settings, progress=True)
    try:
        sources = [(root / "photos", "photos"), (root / "fashion-mnist", "fashion-mnist")]
        sources = [(folder, name) for folder, name in sources if folder.is_dir()]
        for folder, collection in sources[:-1]:
            print(run_ingest(lake, settings, str(folder), collection=collection, runner=runner).line())
        folder, collection = sources[-1]
        # the last folder goes through the whole pipeline: ingest, then embed/index/cluster/tag/grid over everything
        summary = run_pipeline(lake, settings, PipelineRequest(images=str(folder), collection=collection),
                               runner=runner, progress=True)
        print(summary.line())
    finally:
        runner.close()
    _, token = create_token(lake, "curate", "demo")
    print(f"dashboard login token (curate scope, shown only now): {token}")
    return token
