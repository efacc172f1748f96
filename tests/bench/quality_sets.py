"""Labeled image sets for the suggestion-quality benchmark, written as ``<folder>/<class>/<file>.png``
and turned into real lakes (ingest + lite0 embed with the project's own jobs, LocalRunner on CPU).

Every set is built from data installed offline:

* ``fashion-2k``: the first 2,000 Fashion-MNIST images (:func:`imagelake.demo.write_fashion_mnist`);
  ``fashion-<N>k`` (``--sets fashion-10k``, ``fashion-70k``: all of it) the first N thousand.
* ``emoji``: the Google emoji PNGs of the npm package ``emoji-datasource-google`` (fetch it once with
  ``npm pack emoji-datasource-google`` into the cache folder); a class is an emoji subcategory with
  15-150 images ("animal-mammal", "clothing", "food-fruit", ...). Alpha is flattened onto white,
  as a viewer shows them (the decoder's RGB conversion would turn transparent pixels black).
* ``emoji-hard``: the same package's small subcategories, 8-14 images each, many of them fine-grained
  siblings ("face-unwell" / "face-negative", "hand-fingers-open" / "hand-fingers-partial").
* ``photos``: crops (30-70 % of each side), colour jitter and flips of scikit-image's sample photos;
  the class is the source photo. Small crops of one photo show different content, so it is not
  trivial (in practice every method reaches the ceiling: a sanity check, not a contest).
* ``shapes``: generated, hard: eight shapes drawn over random photo crops (the class is the shape,
  the background a nuisance); tests/test_suggest_quality.py uses it as the regression guard.

Lakes are cached under ``$IMAGELAKE_QUALITY_CACHE`` (default /tmp/imagelake-quality), never in git.

**The batch path** (:func:`build_lake_batch`, the benchmark's ``--embed batch``): for large sets
(``fashion-70k``) the embed job's per-task overhead is what costs (a full lake build took ~80 min
here). The same images are ingested by the real ingest job, then embedded by the project's own
runtime (``ort-fp32``: :func:`jobs.embed.decode.load_image` and the ONNX export that the embed job
runs, softmax concepts as :func:`jobs.embed.partition.top_concepts`) in one process, batch by
batch, cached per chunk of 5,000 images under the cache folder (resumable), and imported with
:func:`jobs.embed.importer.import_embeddings` (``imagelake embed --import``) under the features key
``lite0-batch@1``; the pipeline's ``suggest`` step then builds the compact matrix. The vectors
are the embed job's own up to batch numerics (the embed job on CPU runs the same runtime on the
same decoded pixels).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CACHE = Path(os.environ.get("IMAGELAKE_QUALITY_CACHE", "/tmp/imagelake-quality"))
SETS = ("fashion-2k", "emoji", "emoji-hard", "shapes", "photos")


@dataclass
class LabeledSet:
    """Row ``i`` of ``full`` (L2-normalised lite0 embedding) is image ``image_ids[i]`` of class ``y[i]``."""

    name: str
    lake_root: str
    image_ids: list[str]
    y: np.ndarray            # int class per row
    classes: list[str]
    full: np.ndarray         # (n, 1280) float32, unit rows
    concepts: "object"       # scipy CSR (n, 1000): the stored top-50 concept probabilities

    @property
    def labels(self) -> dict[str, int]:
        return dict(zip(self.image_ids, self.y.tolist()))


# -- writers ------------------------------------------------------------------------------------

def write_fashion(out: Path, n: int = 2000) -> int:
    from imagelake.demo import write_fashion_mnist

    return write_fashion_mnist(out, n)


def emoji_package(cache: Path = CACHE) -> Path | None:
    """The unpacked ``emoji-datasource-google`` package (``npm pack`` into the cache on first use)."""
    root = cache / "npm"
    pkg = root / "package"
    if (pkg / "emoji.json").is_file():
        return pkg
    root.mkdir(parents=True, exist_ok=True)
    tgz = sorted(root.glob("emoji-datasource-google-*.tgz"))
    if not tgz:
        try:
            subprocess.run(["npm", "pack", "emoji-datasource-google"], cwd=root, check=True, timeout=300,
                           capture_output=True)
        except (OSError, subprocess.SubprocessError):
            return None
        tgz = sorted(root.glob("emoji-datasource-google-*.tgz"))
        if not tgz:
            return None
    with tarfile.open(tgz[-1]) as t:
        t.extractall(root, filter="data")
    return pkg if (pkg / "emoji.json").is_file() else None


def write_emoji(out: Path, lo: int, hi: int, pkg: Path) -> int:
    """Subcategories with ``lo``..``hi`` Google images, one folder each, flattened onto white."""
    entries = [e for e in json.loads((pkg / "emoji.json").read_text()) if e.get("has_img_google")]
    by_sub: dict[str, list[dict]] = {}
    for e in entries:
        if (pkg / "img" / "google" / "64" / e["image"]).is_file():
            by_sub.setdefault(e["subcategory"], []).append(e)
    n = 0
    for sub, items in sorted(by_sub.items()):
        if not lo <= len(items) <= hi:
            continue
        folder = out / sub.replace(" ", "_").replace("&", "and")
        folder.mkdir(parents=True, exist_ok=True)
        for e in items:
            target = folder / e["image"]
            if not target.exists():
                im = Image.open(pkg / "img" / "google" / "64" / e["image"]).convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                Image.alpha_composite(white, im).convert("RGB").save(target)
            n += 1
    return n


def write_photos(out: Path, per_class: int = 30, seed: int = 0, size=(160, 120)) -> int:
    """``per_class`` crops of every scikit-image sample photo (class = source photo)."""
    from common import _sources, jittered_crop

    rng = np.random.default_rng(seed)
    n = 0
    for k, src in enumerate(_sources()):
        folder = out / f"photo{k:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = jittered_crop(src, rng, size, scale=(0.3, 0.7))
            buf = io.BytesIO()
            im.save(buf, "PNG")
            (folder / f"crop_{i:03d}.png").write_bytes(buf.getvalue())
            n += 1
    return n


def write_shapes(out: Path, per_class: int = 24, seed: int = 0, size: int = 96) -> int:
    """Generated and hard: eight shapes (disc, square, triangle, ring, cross, bar, stripes, dots) in
    random colours, sizes and places over random crops of scikit-image's photos; the class is the
    shape, so the background (most of each image's pixels) is a nuisance a model must learn to
    ignore. No network, a few seconds to write: the regression guard's data."""
    from PIL import ImageDraw

    from common import _sources

    rng = np.random.default_rng(seed)
    sources = _sources()
    kinds = ("disc", "square", "triangle", "ring", "cross", "bar", "stripes", "dots")
    n = 0
    for kind in kinds:
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            src = sources[int(rng.integers(len(sources)))]
            h, w = src.shape[:2]
            side = int(min(h, w) * rng.uniform(0.3, 0.8))
            y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            im = Image.fromarray(src[y0:y0 + side, x0:x0 + side]).resize((size, size), Image.Resampling.BILINEAR)
            d = ImageDraw.Draw(im)
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            r = size * rng.uniform(0.2, 0.35)
            cx, cy = rng.uniform(r, size - r, 2)
            box = (cx - r, cy - r, cx + r, cy + r)
            if kind == "disc":
                d.ellipse(box, fill=colour)
            elif kind == "square":
                d.rectangle(box, fill=colour)
            elif kind == "triangle":
                d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            elif kind == "ring":
                d.ellipse(box, outline=colour, width=max(3, int(r / 3)))
            elif kind == "cross":
                d.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=colour)
                d.rectangle((cx - r / 4, cy - r, cx + r / 4, cy + r), fill=colour)
            elif kind == "bar":
                d.rectangle((cx - r, cy - r / 5, cx + r, cy + r / 5), fill=colour)
            elif kind == "stripes":
                for k in range(4):
                    yy = cy - r + k * r / 2
                    d.rectangle((cx - r, yy, cx + r, yy + r / 5), fill=colour)
            else:
                for a in range(3):
                    for b in range(3):
                        px, py = cx - r + a * r, cy - r + b * r
                        d.ellipse((px - r / 6, py - r / 6, px + r / 6, py + r / 6), fill=colour)
            im.save(folder / f"{kind}_{i:03d}.png")
            n += 1
    return n


# -- lakes --------------------------------------------------------------------------------------

def build_lake(name: str, cache: Path = CACHE, **kw) -> Path | None:
    """Write the set's images, ingest and embed them (cached: reused while ``ready`` exists).
    None when the set's source data is not installed."""
    from jobs.embed import run_embed
    from jobs.ingest.driver import run_ingest
    from jobs.runner import LocalRunner
    from lake.catalog import Lake
    from lake.settings import Settings

    folder = cache / (name if not kw else name + "-" + "-".join(f"{k}{v}" for k, v in sorted(kw.items())))
    if (folder / "ready").is_file():
        return folder / "lake"
    images = folder / "images"
    if _fashion_n(name):
        written = write_fashion(images, kw.get("n", _fashion_n(name)))
    elif name in ("emoji", "emoji-hard"):
        pkg = emoji_package(cache)
        if pkg is None:
            return None
        written = write_emoji(images, *((15, 150) if name == "emoji" else (8, 14)), pkg)
    elif name == "photos":
        written = write_photos(images, **kw)
    elif name == "shapes":
        written = write_shapes(images, **kw)
    else:
        raise ValueError(f"unknown set {name!r}; one of {SETS}")
    if not written and not any(images.rglob("*.png")):
        return None
    lake = Lake.at(folder / "lake")
    settings = Settings(lake=lake.root, runner="local", partition_files=4096)
    run_ingest(lake, settings, str(images), collection=name, runner=LocalRunner())
    run_embed(lake, settings, device="cpu", runner=LocalRunner(), partition_rows=4096)
    (folder / "ready").write_text("ok\n")
    return folder / "lake"


BATCH_KEY = "lite0-batch@1"
BATCH_CHUNK = 5000


def build_lake_batch(name: str, cache: Path = CACHE, *, limit: int | None = None, threads: int = 2,
                     batch: int = 64, log=print) -> Path | None:
    """``fashion-<N>k`` through the batch path (module docstring): the ingest job, the ort-fp32
    runtime in one process (chunks cached under ``cache/fashion-batch-emb``, shared by every N),
    the importer, the suggest step. None when Fashion-MNIST is not installed.

    ``limit``: embed and import only the first ``limit`` images (the lake holds all N, its features
    only those: a time box on a busy machine; suggestions and the benchmark then see ``limit``
    images). Such a lake is not marked ready, so a later call goes on where it stopped."""
    from jobs.embed.artifact import ensure_onnx
    from jobs.embed.decode import load_image
    from jobs.embed.models import get_model
    from jobs.embed.runtime import get_runtime
    from jobs.embed.importer import import_embeddings
    from jobs.ingest.driver import run_ingest
    from jobs.runner import LocalRunner
    from jobs.suggest import run_suggest
    from lake.catalog import Lake
    from lake.commit import open_table
    from lake.settings import Settings

    n = _fashion_n(name)
    if not n:
        raise ValueError(f"the batch path builds fashion-<N>k sets, not {name!r}")
    folder = cache / f"{name}-batch"
    if (folder / "ready").is_file():
        return folder / "lake"
    images = folder / "images"
    if not write_fashion(images, n) and not any(images.rglob("*.png")):
        return None
    lake = Lake.at(folder / "lake")
    settings = Settings(lake=lake.root, runner="local", partition_files=4096)
    t0 = time.perf_counter()
    log(run_ingest(lake, settings, str(images), collection=name, runner=LocalRunner()).line())
    uris = sorted(open_table(lake, "images").to_pyarrow_table(columns=["uri"]).column("uri").to_pylist(),
                  key=lambda u: Path(u).name)          # fmnist_<index>.png: dataset order
    partial = limit is not None and limit < len(uris)
    uris = uris[:limit] if partial else uris
    spec = get_model("efficientnet-lite0")
    runtime = get_runtime(spec, "cpu", artifact=ensure_onnx(lake.artifacts_dir(), spec), threads=threads,
                          engine="onnx", precision="fp32")
    chunks = cache / "fashion-batch-emb"
    chunks.mkdir(parents=True, exist_ok=True)
    embed_s = 0.0
    for lo in range(0, len(uris), BATCH_CHUNK):
        part = uris[lo:lo + BATCH_CHUNK]
        first, last = Path(part[0]).stem, Path(part[-1]).stem
        target = next((f for f in sorted(chunks.glob("fmnist_*-fmnist_*.npz")) if ".tmp" not in f.name
                       and f.stem.split("-")[0] <= first and last <= f.stem.split("-")[1]), None)
        if target is None:   # no cached chunk covers these files (a smaller set reuses a bigger one's)
            target = chunks / f"{first}-{last}.npz"
            t1 = time.perf_counter()
            emb, probs = [], []
            for i in range(0, len(part), batch):
                e, logits = runtime.embed(np.stack([load_image(u, spec.input_size, spec.crop_fraction)
                                                    for u in part[i:i + batch]]))
                z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
                p = np.exp(z)
                emb.append(e.astype(np.float32))
                probs.append((p / p.sum(axis=1, keepdims=True)).astype(np.float32))
            tmp = target.with_suffix(".tmp.npz")
            np.savez(tmp, name=np.array([Path(u).name for u in part]), embedding=np.vstack(emb),
                     concept_probs=np.vstack(probs))
            tmp.rename(target)
            embed_s += time.perf_counter() - t1
            log(f"  {name}: embedded {lo + len(part)} / {len(uris)} ({len(part) / (time.perf_counter() - t1):.0f} img/s)")
        with np.load(target) as z:   # the importer keys rows by uri: this lake's path of each file
            by_name = {Path(u).name: u for u in part}
            keep = np.array([str(f) in by_name for f in z["name"]])
            staged = folder / "import.npz"
            np.savez(staged, uri=np.array([by_name[str(f)] for f in z["name"][keep]]),
                     embedding=z["embedding"][keep], concept_probs=z["concept_probs"][keep])
        result = import_embeddings(lake, settings, str(staged), BATCH_KEY, key="uri")
        if result.rejected:
            raise RuntimeError(f"{name}: the import rejected {result.rejected} rows: {result.reasons}")
        staged.unlink()
    log(f"  {name}: suggest step {run_suggest(lake, settings, model=BATCH_KEY)['folder']}")
    if partial:
        return folder / "lake"
    (folder / "ready").write_text(f"built in {time.perf_counter() - t0:.0f} s, embedding {embed_s:.0f} s\n")
    return folder / "lake"


def _fashion_n(name: str) -> int:
    """``fashion-<N>k`` -> N * 1000 (0 for any other set)."""
    import re

    hit = re.fullmatch(r"fashion-(\d+)k", name)
    return int(hit.group(1)) * 1000 if hit and int(hit.group(1)) > 0 else 0


def load_set(name: str, lake_root: Path) -> LabeledSet:
    """Embeddings, concepts and labels (the class is the image file's folder) of a built lake."""
    from scipy import sparse

    from lake.catalog import Lake
    from lake.commit import open_table
    from lake.vectors import load_embeddings

    lake = Lake.at(lake_root)
    emb = load_embeddings(lake)
    uris = {r["image_id"]: r["uri"] for r in
            open_table(lake, "images").to_pyarrow_table(columns=["image_id", "uri"]).to_pylist()}
    names = [Path(uris[i]).parent.name for i in emb.image_ids]
    classes = sorted(set(names))
    y = np.array([classes.index(c) for c in names])
    row = {i: r for r, i in enumerate(emb.image_ids)}
    rows, cols, vals = [], [], []
    for f in open_table(lake, "features").to_pyarrow_table(columns=["image_id", "concept_ids", "concept_probs"]).to_pylist():
        if f["image_id"] in row:
            rows += [row[f["image_id"]]] * len(f["concept_ids"])
            cols += f["concept_ids"]
            vals += f["concept_probs"]
    concepts = sparse.csr_matrix((vals, (rows, cols)), shape=(len(emb), 1000), dtype=np.float32)
    return LabeledSet(name, str(lake_root), list(emb.image_ids), y, classes, emb.normalized().astype(np.float32),
                      concepts)


