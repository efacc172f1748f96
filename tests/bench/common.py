"""Shared by the benchmarks: the machine description, timing, and photo-like test images."""

from __future__ import annotations

import io
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for pkg in ("pyspark", "deltalake", "duckdb", "pyarrow", "pillow", "torch", "onnxruntime", "faiss-cpu"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return (f"machine: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}\n         " + ", ".join(versions))


def tree_cpu_seconds(root: int | None = None) -> float:
    """User+system CPU seconds of process ``root`` (default: this one) and every live descendant
    (the Spark JVM, its Python workers), plus the children they reaped, from /proc (Linux)."""
    root = root or os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            parent[int(d)], cpu[int(d)] = int(fields[1]), sum(int(x) for x in fields[11:15]) / tick
    total = 0.0
    for pid, seconds in cpu.items():
        p = pid
        while p and p != root:
            p = parent.get(p, 0)
        total += seconds if p == root else 0.0
    return total


def median_time(fn, repeat: int = 5) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _sources() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field",
                 "immunohistochemistry", "retina", "camera", "coins", "moon", "page"):
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            arr = np.asarray(fn())
        except Exception:
            continue
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        out.append(arr[..., :3].astype(np.uint8))
    return out


def jittered_crop(src: np.ndarray, rng: np.random.Generator, size, scale=(0.5, 1.0)) -> Image.Image:
    """A random crop of ``scale`` × each side of ``src``, resized to ``size``, colour- and
    brightness-jittered, mirrored half the time."""
    h, w = src.shape[:2]
    ch, cw = int(h * rng.uniform(*scale)), int(w * rng.uniform(*scale))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    im = Image.fromarray(src[y:y + ch, x:x + cw]).resize(size, Image.Resampling.BILINEAR)
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4))
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return im


class BucketLog:
    """A BucketState fed events directly (no Delta commit, no HTTP: the suggestion engine alone)."""

    def __init__(self):
        from lake.buckets import BucketState

        self.state, self.seq = BucketState(), 0

    def emit(self, **event):
        self.seq += 1
        self.state.apply({"event_id": f"e{self.seq}", "seq": self.seq, "actor": "bench", **event})


def write_photos(folder: Path, n: int, size=(640, 480), seed: int = 0, start: int = 0) -> list[Path]:
    """``n`` realistic JPEGs: random crops of scikit-image photos, resized, colour-jittered, flipped."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + start)
    sources = _sources()
    paths = []
    for i in range(start, start + n):
        im = jittered_crop(sources[i % len(sources)], rng, size, scale=(0.5, 1.0))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(80, 95)))
        p = folder / f"photo_{i:06d}.jpg"
        p.write_bytes(buf.getvalue())
        paths.append(p)
    return paths
