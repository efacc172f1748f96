"""Distinct photo-like images plus planted near-duplicates of some of them, for cluster tests and
the cluster benchmark.

Each distinct image is its own scene: a random two-colour gradient, a patch of a scikit-image photo
(random photo, crop, scale, place, colour), random ellipses/rectangles/lines and sensor noise, so no
two share a layout. A planted variant is one of the edits near-duplicate finders must catch:
``crop`` (keeps ~85% of each side), ``resize`` (to half), ``recompress`` (JPEG quality 30),
``flip`` (left-right) and ``colour`` (a small colour/brightness shift).
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

__all__ = ["VARIANTS", "scene", "variant", "write_planted"]

VARIANTS = ("crop", "resize", "recompress", "flip", "colour")
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
           "retina", "colorwheel", "camera", "clock", "coins", "brick", "grass", "gravel", "moon",
           "page", "horse", "cell", "text", "logo")


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from skimage import data

    out = []
    for name in _PHOTOS:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            arr = np.asarray(fn())
        except Exception:  # a photo that needs a download (pooch) is skipped
            continue
        if arr.dtype != np.uint8:
            arr = (arr.astype(np.float32) / max(1.0, float(arr.max())) * 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        out.append(np.ascontiguousarray(arr[..., :3]))
    return tuple(out)


def scene(seed: int, size: tuple[int, int] = (192, 144)) -> Image.Image:
    """One distinct photo-like RGB image, determined by ``seed``."""
    rng = np.random.default_rng(seed)
    w, h = size
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, w)[None, :, None] * rng.uniform(0.3, 1) + np.linspace(0, 1, h)[:, None, None] * rng.uniform(0, 0.7)
    t = np.clip(t, 0, 1)
    im = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    photos = _photos()
    src = photos[rng.integers(len(photos))]
    sh, sw = src.shape[:2]
    ch, cw = int(sh * rng.uniform(0.2, 0.7)), int(sw * rng.uniform(0.2, 0.7))
    y, x = rng.integers(0, sh - ch + 1), rng.integers(0, sw - cw + 1)
    pw = int(w * rng.uniform(0.4, 0.9))
    ph = max(8, int(pw * ch / cw))
    patch = Image.fromarray(src[y:y + ch, x:x + cw]).resize((pw, min(ph, h)))
    patch = ImageEnhance.Color(patch).enhance(rng.uniform(0.3, 1.7))
    im.paste(patch, (int(rng.integers(0, w - pw + 1)), int(rng.integers(0, max(1, h - patch.height + 1)))))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(2, 8)))
    arr = np.asarray(im).astype(np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def variant(im: Image.Image, kind: str, seed: int = 0) -> Image.Image:
    """A planted near-duplicate of ``im`` (see :data:`VARIANTS`). ``recompress`` is applied at save."""
    rng = np.random.default_rng(seed)
    w, h = im.size
    if kind == "crop":
        cw, ch = int(w * 0.85), int(h * 0.85)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return im.crop((x, y, x + cw, y + ch))
    if kind == "resize":
        return im.resize((w // 2, h // 2), Image.Resampling.BILINEAR)
    if kind == "recompress":
        return im
    if kind == "flip":
        return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if kind == "colour":
        im = ImageEnhance.Color(im).enhance(float(rng.uniform(0.85, 1.15)))
        return ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.9, 1.1)))
    raise ValueError(kind)


def _jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_planted(folder: Path, n_distinct: int, n_planted: int, seed: int = 0,
                  size: tuple[int, int] = (192, 144)) -> tuple[list[Path], list[tuple[str, str, str]]]:
    """Write ``n_distinct`` scenes and ``n_planted`` variants (kinds in turn, originals spread
    evenly) as JPEGs into ``folder``.

    Returns:
        (every path, planted pairs as (original file name, variant file name, kind)).
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths, pairs = [], []
    step = max(1, n_distinct // max(1, n_planted))
    originals = {}
    for i in range(n_distinct):
        im = scene(seed * 1_000_003 + i, size)
        p = folder / f"scene_{i:06d}.jpg"
        p.write_bytes(_jpeg(im, 90))
        paths.append(p)
        if i % step == 0 and len(originals) < n_planted:
            originals[i] = im
    for j, (i, im) in enumerate(sorted(originals.items())):
        kind = VARIANTS[j % len(VARIANTS)]
        v = variant(im, kind, seed=j)
        p = folder / f"scene_{i:06d}_{kind}.jpg"
        p.write_bytes(_jpeg(v, 30 if kind == "recompress" else 90))
        paths.append(p)
        pairs.append((f"scene_{i:06d}.jpg", p.name, kind))
    return paths, pairs


def planted_lake(base: Path, n_distinct: int = 160, n_planted: int = 20):
    """A lake with ``n_distinct`` scenes + ``n_planted`` variants ingested and embedded (LocalRunner),
    built once under ``base`` and reused by later callers (the embed is the slow part).

    Returns:
        (lake root, images folder, planted pairs).
    """
    import json

    from jobs.embed import run_embed
    from jobs.ingest.driver import run_ingest
    from jobs.runner import LocalRunner
    from lake.catalog import Lake
    from lake.commit import ensure_tables
    from lake.settings import Settings

    done = base / "done.json"
    if not done.exists():
        images = base / "images"
        _, pairs = write_planted(images, n_distinct, n_planted, seed=7)
        lake = Lake.at(base / "lake")
        ensure_tables(lake)
        settings = Settings(lake=lake.root, runner="local", partition_files=64)
        run_ingest(lake, settings, str(images), runner=LocalRunner())
        run_embed(lake, settings, runner=LocalRunner())
        done.write_text(json.dumps({"pairs": pairs}))
    return str(base / "lake"), base / "images", [tuple(p) for p in json.loads(done.read_text())["pairs"]]
