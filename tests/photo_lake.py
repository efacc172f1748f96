"""Labelled real photos for the core-feature tests, from data that ships with the installed packages.

Fashion-MNIST comes from a Debian package that a bare machine lacks, so the tests of FAISS builds,
similarity search, uploads, suggestions and Tetris run on images made here instead, and
Fashion-MNIST is kept for the benchmarks. Nothing is downloaded.

Three kinds of images, each in a folder named after its label (``<label>/<kind>_NNNNN.png``):

* **photos**: random views of scikit-image's sample photos (``skimage.data``): a crop (35-100% of
  the area), a rotation of up to 20°, a mirror half the time, brightness/contrast/saturation/hue
  jitter and a size between 80 and 128 pixels. The label is the photo's name, so there are several
  classes of real photos whose members are different pictures of the same scene, which ImageNet
  features keep apart (what suggestions and Tetris need);
* **digits**: scikit-learn's handwritten digits (8x8, 1,797 of them), shifted, rotated, scaled up
  and lightly noised; label ``digit_<d>``;
* **scenes**: the generated photo-like scenes of ``planted_images.scene``; label ``scene``.

PNG (lossless), so a test can change one pixel and keep the picture. Every file's bytes differ.
The label of any image in a lake built from these files is the name of its folder
(:func:`label_of` on ``images.uri``).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from lake.catalog import Lake
from lake.settings import Settings

__all__ = ["PHOTO_CLASSES", "label_of", "write_photos", "write_labelled", "photo_template", "copy_lake"]

# distinct scenes that ImageNet features keep apart; each loads offline from scikit-image's own files
PHOTO_CLASSES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina", "colorwheel", "camera", "coins", "clock", "brick")


@lru_cache(maxsize=None)
def _source(name: str) -> tuple[Image.Image, tuple[int, int, int]]:
    """The photo as RGB, at most 384 px a side, and its mean colour (fills a rotation's corners)."""
    from skimage import data

    arr = np.asarray(getattr(data, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3:
        arr = arr[..., :3]
    im = Image.fromarray(arr).convert("RGB")
    im.thumbnail((384, 384))  # views are at most 128 px: a smaller source keeps writing fast
    return im, tuple(int(v) for v in np.asarray(im).reshape(-1, 3).mean(axis=0))


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)  # fast; the bytes are not kept beyond a test session
    return buf.getvalue()


def photo_view(name: str, rng: np.random.Generator) -> Image.Image:
    """One random view of scikit-image's photo ``name`` (crop, rotation, mirror, colour jitter, size)."""
    src, fill = _source(name)
    w, h = src.size
    area = rng.uniform(0.35, 1.0) * w * h
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw, ch = min(w, int(round((area * aspect) ** 0.5))), min(h, int(round((area / aspect) ** 0.5)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    side = int(rng.integers(80, 129))
    # crop, then work at the final size: every later step is cheap on a small image
    im = src.crop((x, y, x + cw, y + ch)).resize((side, max(16, int(side * ch / cw))), Image.Resampling.BILINEAR)
    im = im.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR, fillcolor=fill)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.75, 1.25)))
    im = ImageEnhance.Contrast(im).enhance(float(rng.uniform(0.75, 1.25)))
    im = ImageEnhance.Color(im).enhance(float(rng.uniform(0.6, 1.4)))
    hsv = np.asarray(im.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.integers(-8, 9))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _digit_view(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    arr = (image * (255 / 16)).astype(np.uint8)
    side = int(rng.integers(40, 65))
    im = Image.fromarray(arr).resize((side, side), Image.Resampling.BILINEAR)
    im = im.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR,
                   translate=(int(rng.integers(-3, 4)), int(rng.integers(-3, 4))))
    noisy = np.asarray(im).astype(np.float32) + rng.normal(0, 4, (side, side))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write(folder: Path, label: str, name: str, im: Image.Image, seen: set[str]) -> bool:
    data = _png(im)
    digest = hashlib.sha256(data).hexdigest()
    if digest in seen:
        return False
    seen.add(digest)
    target = folder / label / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return True


def write_photos(folder: Path, per_class: int, classes: tuple[str, ...] = PHOTO_CLASSES, seed: int = 0,
                 seen: set[str] | None = None) -> dict[str, str]:
    """``per_class`` distinct views of each photo in ``classes`` as ``folder/<class>/photo_NNNNN.png``.

    Returns {file path: label}.
    """
    rng = np.random.default_rng(seed)
    seen = set() if seen is None else seen
    out: dict[str, str] = {}
    for name in classes:
        i = 0
        while i < per_class:
            path = folder / name / f"photo_{i:05d}.png"
            if _write(folder, name, path.name, photo_view(name, rng), seen):
                out[str(path)] = name
                i += 1
    return out


def write_labelled(folder: Path, n: int, seed: int = 0) -> dict[str, str]:
    """``n`` distinct labelled images: 3/4 photo views (spread over :data:`PHOTO_CLASSES`), 1/8 digits,
    the rest generated scenes. Returns {file path: label}."""
    from sklearn.datasets import load_digits

    from planted_images import scene

    n_digits = n // 8
    n_scenes = n - n_digits - (n * 3 // 4)
    n_photos = n - n_digits - n_scenes
    seen: set[str] = set()
    per, extra = divmod(n_photos, len(PHOTO_CLASSES))
    out: dict[str, str] = {}
    for k, name in enumerate(PHOTO_CLASSES):
        out.update(write_photos(folder, per + (k < extra), (name,), seed=seed * 1000 + k, seen=seen))
    rng = np.random.default_rng(seed + 1)
    digits = load_digits()
    picks = rng.permutation(len(digits.images))
    i = 0
    while len(out) < n_photos + n_digits:
        j = int(picks[i % len(picks)])
        label = f"digit_{digits.target[j]}"
        name = f"digit_{i:05d}.png"
        if _write(folder, label, name, _digit_view(digits.images[j], rng), seen):
            out[str(folder / label / name)] = label
        i += 1
    i = 0
    while len(out) < n:
        name = f"scene_{i:05d}.png"
        if _write(folder, "scene", name, scene(seed * 1_000_003 + i, (128, 96)), seen):
            out[str(folder / "scene" / name)] = "scene"
        i += 1
    return out


def label_of(uri: str) -> str:
    """The label of a lake image written by this module: the name of the folder it was read from."""
    return Path(uri.split("://", 1)[-1]).parent.name


def photo_template(base: Path, n: int = 2000, seed: int = 0) -> tuple[Lake, Path]:
    """A lake with ``n`` labelled images (:func:`write_labelled`) ingested and embedded (LocalRunner),
    built on the first call and shared by every later one (a file lock orders concurrent callers).

    Embedding a couple of thousand images takes 20-40 s on two cores, so tests copy this lake
    (:func:`copy_lake`) instead of building their own. ``IMAGELAKE_TEST_CACHE=/some/dir`` keeps it
    between sessions while developing. Returns the lake and the folder of the images.
    """
    from jobs.embed.driver import run_embed
    from jobs.ingest.driver import run_ingest

    base = Path(os.environ.get("IMAGELAKE_TEST_CACHE") or base)
    root = base / f"photo-template-{n}-s{seed}"
    root.mkdir(parents=True, exist_ok=True)
    lake, images = Lake.at(root / "lake"), root / "images"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            shutil.rmtree(lake.root, ignore_errors=True)
            shutil.rmtree(images, ignore_errors=True)
            write_labelled(images, n, seed)
            settings = Settings(lake=lake.root, runner="local", partition_files=1024)
            summary = run_ingest(lake, settings, str(images), collection="photos")
            assert summary.ok == n and summary.rejected == 0, summary.line()
            run_embed(lake, settings, partition_rows=1024)
            (root / "done").write_text("ok")
    return lake, images


def copy_lake(template: Lake, target: Path, ignore=None) -> Lake:
    shutil.copytree(template.root, target, ignore=ignore)
    return Lake.at(target)
