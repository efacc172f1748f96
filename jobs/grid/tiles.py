"""The deep-zoom mosaic of a layout: a DZI pyramid (256 px JPEG tiles, overlap 0).

Full resolution puts each image's ``cell_px`` thumbnail (64 px) in its cell, so the deepest level is
``width·64 × height·64`` px; DZI level ``L`` is that shrunk by ``2^(max_level - L)`` (sizes rounded
up), down to 1 × 1 px at level 0.

What is rendered when (measured, see README Benchmarks):

* **At build time** (:func:`build_tiles`), one sequential pass over the 64 px thumbnails in cell
  order writes ``cells.bin`` (every cell's JPEG, concatenated) with ``cells.idx`` (offsets), and a
  mosaic of ``base_px`` (8) pixels per cell, from which every level with cells of ``base_px`` px
  or less is cut into tiles. Those few levels are all an overview needs; each costs a quarter
  of the one below it.
* **On first request** (:class:`TileSource`), tiles of the deep levels (cells of 16, 32, 64 px: about
  98 % of all tiles and bytes) are drawn from ``cells.bin`` (a few byte ranges per tile, no table
  scan) and cached as files under ``cache/``. Most deep tiles of a big map are never looked at.

``manifest.json`` is written last, atomically; a folder without it is an unfinished build.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from lake.artifacts import file_sha256
from lake.errors import CorruptArtifact, NotFound

__all__ = ["Pyramid", "build_tiles", "finish_tiles", "save_mosaic", "load_mosaic", "publish_tiles", "TileSource",
           "TILE_SIZE", "BACKGROUND"]

TILE_SIZE = 256
BACKGROUND = (17, 17, 17)
_QUALITY = 85
PARALLEL_DECODE_CELLS = 50_000


@dataclass(frozen=True)
class Pyramid:
    """Geometry of a layout's DZI pyramid."""

    width: int        # grid cells across
    height: int       # grid cells down
    cell_px: int = 64
    base_px: int = 8  # cell size of the deepest pre-rendered level
    tile: int = TILE_SIZE

    @property
    def full_size(self) -> tuple[int, int]:
        return self.width * self.cell_px, self.height * self.cell_px

    @property
    def max_level(self) -> int:
        return max(0, math.ceil(math.log2(max(max(self.full_size), 1))))

    def scale(self, level: int) -> int:
        return 2 ** (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        s = self.scale(level)
        w, h = self.full_size
        return max(1, -(-w // s)), max(1, -(-h // s))

    def tiles_across(self, level: int) -> tuple[int, int]:
        w, h = self.level_size(level)
        return -(-w // self.tile), -(-h // self.tile)

    def tile_box(self, level: int, tx: int, ty: int) -> tuple[int, int, int, int]:
        """(left, top, width, height) in level pixels. Raises NotFound outside the pyramid."""
        if not 0 <= level <= self.max_level:
            raise NotFound(f"no level {level}; levels are 0..{self.max_level}")
        nx, ny = self.tiles_across(level)
        if not (0 <= tx < nx and 0 <= ty < ny):
            raise NotFound(f"no tile {tx}_{ty} at level {level}; it has {nx} x {ny} tiles")
        w, h = self.level_size(level)
        left, top = tx * self.tile, ty * self.tile
        return left, top, min(self.tile, w - left), min(self.tile, h - top)

    def prerendered(self, level: int) -> bool:
        """Levels whose cells are ``base_px`` px or smaller come from the build."""
        return self.cell_px / self.scale(level) <= self.base_px

    def dzi_xml(self, fmt: str = "jpg") -> str:
        w, h = self.full_size
        return ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" TileSize="{self.tile}" '
                f'Overlap="0" Format="{fmt}"><Size Width="{w}" Height="{h}"/></Image>\n')


def _fit(jpeg: bytes, cell: int) -> Image.Image | None:
    """Decode a thumbnail shrunk to fit a ``cell`` px square (JPEG DCT scaling does most of it)."""
    if not jpeg:
        return None
    try:
        im = Image.open(io.BytesIO(jpeg))
        im.draft("RGB", (cell, cell))
        im = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    w, h = im.size
    f = cell / max(w, h)
    if f != 1:  # small images (e.g. 28 px Fashion-MNIST) are scaled up to fill the cell
        im = im.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BILINEAR)
    return im


def _paste(canvas: Image.Image, thumb: Image.Image | None, x: int, y: int, cell: int) -> None:
    if thumb is None:
        return
    w, h = thumb.size
    canvas.paste(thumb, (x + (cell - w) // 2, y + (cell - h) // 2))


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=_QUALITY)
    return buf.getvalue()


def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _fit_many(jpegs: list, cell: int) -> list:
    """(width, height, RGB bytes) or None of each thumbnail shrunk to ``cell`` px (picklable)."""
    out = []
    for jpeg in jpegs:
        im = _fit(jpeg, cell)
        out.append(None if im is None else (im.size[0], im.size[1], im.tobytes()))
    return out


class _Decoder:
    """Decodes batches of thumbnails for the base mosaic: in this process (``workers`` = 1), or in
    a pool of ``workers`` forked processes with at most 2 x ``workers`` batches in flight; results
    come back in submission order (decoded here if the pool breaks)."""

    def __init__(self, workers: int, cell: int):
        self.workers, self.cell = max(1, int(workers)), cell
        self.pool, self.pending = None, []

    def __enter__(self) -> "_Decoder":
        if self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # fork (forkserver/spawn would re-import an unguarded __main__ script, i.e. run it again);
            # a fork context starts every worker at the first submit: here, before the thumbnail
            # reads start DuckDB's threads
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))
            try:
                self.pool.submit(int).result()
            except Exception:   # no pool on this platform: decode here
                self.pool.shutdown(wait=False)
                self.pool = None
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, cells: list[int], jpegs: list) -> list[tuple[list[int], list]]:
        if self.pool is None:   # decoded images as they are (no copy through bytes)
            return [(cells, [_fit(jpeg, self.cell) for jpeg in jpegs])]
        for lo in range(0, len(jpegs), 1024):
            part = jpegs[lo:lo + 1024]
            self.pending.append((cells[lo:lo + 1024], part, self._submit(part)))
        done = []
        while len(self.pending) > 2 * self.workers:
            c, part, fut = self.pending.pop(0)
            done.append((c, self._result(part, fut)))
        return done

    def drain(self) -> list[tuple[list[int], list]]:
        done = [(c, self._result(part, fut)) for c, part, fut in self.pending]
        self.pending = []
        return done

    def _submit(self, part: list):
        from concurrent.futures.process import BrokenProcessPool

        try:
            return self.pool.submit(_fit_many, part, self.cell)
        except (BrokenProcessPool, RuntimeError):
            return None

    def _result(self, part: list, fut) -> list:
        """The pool's answer; decoded here when the pool cannot run (e.g. a ``__main__`` script
        without an ``if __name__ == "__main__"`` guard, which forkserver workers re-import)."""
        from concurrent.futures.process import BrokenProcessPool

        if fut is not None:
            try:
                return fut.result()
            except BrokenProcessPool:
                pass
        return [_fit(jpeg, self.cell) for jpeg in part]


def build_tiles(folder: str, pyramid: Pyramid, thumbnails: Iterator[tuple[np.ndarray, list]],
                *, meta: dict | None = None, workers: int | None = None, keep_mosaic: bool = False) -> dict:
    """Write a layout's tile artifact into ``folder`` (local path) and return its manifest.

    Args:
        thumbnails: batches of (cell indices, JPEG bytes or None) in increasing cell order; cells
            that never appear stay empty.
        meta: extra manifest fields (layout id, source versions).
        workers: processes decoding the thumbnails for the base mosaic (about 0.1 ms of CPU
            each: 100 CPU-s at 1M); default one per core from :data:`PARALLEL_DECODE_CELLS`
            cells, else this process. The output is the same either way.
    """
    os.makedirs(folder, exist_ok=True)
    p = pyramid
    n_cells = p.width * p.height
    offsets = np.zeros(n_cells + 1, np.int64)
    sizes = np.zeros(n_cells, np.int64)
    base = Image.new("RGB", (p.width * p.base_px, p.height * p.base_px), BACKGROUND)
    pack_path = os.path.join(folder, "cells.bin")
    if workers is None:
        workers = (os.cpu_count() or 1) if n_cells >= PARALLEL_DECODE_CELLS else 1
    with open(pack_path + ".tmp", "wb") as pack, _Decoder(workers, p.base_px) as decoder:
        last = -1

        def paste(cells: list[int], small: list) -> None:
            for cell, fitted in zip(cells, small):
                if fitted is not None:
                    gy, gx = divmod(cell, p.width)
                    thumb = Image.frombytes("RGB", fitted[:2], fitted[2]) if isinstance(fitted, tuple) else fitted
                    _paste(base, thumb, gx * p.base_px, gy * p.base_px, p.base_px)

        for cells, jpegs in thumbnails:
            kept_cells, kept = [], []
            for cell, jpeg in zip(np.asarray(cells).tolist(), jpegs):
                if cell <= last or not 0 <= cell < n_cells:
                    raise ValueError("thumbnails must come in increasing cell order, inside the grid")
                last = cell
                if not jpeg:
                    continue
                pack.write(jpeg)
                sizes[cell] = len(jpeg)
                kept_cells.append(cell), kept.append(jpeg)
            for done in decoder.submit(kept_cells, kept):
                paste(*done)
        for done in decoder.drain():
            paste(*done)
    os.replace(pack_path + ".tmp", pack_path)
    offsets[1:] = np.cumsum(sizes)
    if keep_mosaic:
        save_mosaic(folder, base)
    return finish_tiles(folder, p, offsets, base, meta)


MOSAIC = "mosaic.npy"


def save_mosaic(folder: str, base: Image.Image) -> None:
    """Keep the ``base_px`` mosaic (raw RGB, ``height·base_px × width·base_px × 3`` bytes: 192 MB at
    1M cells) so that a later run placing a few new images redraws only their cells."""
    tmp = os.path.join(folder, MOSAIC + ".tmp.npy")
    np.save(tmp, np.asarray(base))
    os.replace(tmp, os.path.join(folder, MOSAIC))


def load_mosaic(folder: str) -> Image.Image | None:
    try:
        return Image.fromarray(np.load(os.path.join(folder, MOSAIC)))
    except (FileNotFoundError, ValueError, OSError):
        return None


def finish_tiles(folder: str, p: Pyramid, offsets: np.ndarray, base: Image.Image, meta: dict | None) -> dict:
    """Write ``cells.idx`` from ``offsets``, the pre-rendered levels cut from ``base``, then the
    manifest (last); ``cells.bin`` must be in place. Returns the manifest."""
    pack_path = os.path.join(folder, "cells.bin")
    sizes = np.diff(offsets)
    idx_buf = io.BytesIO()
    np.save(idx_buf, offsets)
    _write_atomic(os.path.join(folder, "cells.idx"), idx_buf.getvalue())

    levels = [lv for lv in range(p.max_level + 1) if p.prerendered(lv)]
    tile_bytes = 0
    image = base
    for level in sorted(levels, reverse=True):
        size = p.level_size(level)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BOX)
        nx, ny = p.tiles_across(level)
        for ty in range(ny):
            for tx in range(nx):
                left, top, w, h = p.tile_box(level, tx, ty)
                data = _jpeg(image.crop((left, top, left + w, top + h)))
                tile_bytes += len(data)
                _write_atomic(os.path.join(folder, str(level), f"{tx}_{ty}.jpg"), data)
    manifest = {
        **(meta or {}),
        "format": "dzi", "tile_size": p.tile, "overlap": 0, "tile_format": "jpg",
        "width": p.width, "height": p.height, "cell_px": p.cell_px, "base_px": p.base_px,
        "max_level": p.max_level, "prerendered_levels": sorted(levels),
        "prerendered_tile_bytes": tile_bytes,
        "cells": {"bytes": int(offsets[-1]), "filled": int((sizes > 0).sum()),
                  "idx_sha256": file_sha256(os.path.join(folder, "cells.idx")),
                  "bin_sha256": file_sha256(pack_path)},
    }
    _write_atomic(os.path.join(folder, "manifest.json"), json.dumps(manifest, indent=1).encode())
    return manifest


def publish_tiles(folder: str, store, prefix: str, threads: int = 8) -> int:
    """Copy a tile artifact built in the local ``folder`` to ``prefix`` of ``store`` (a
    :class:`lake.store.LakeStore`, e.g. an object-store lake): every file in parallel, then
    ``manifest.json`` last, so readers of the store never see an unfinished build. Returns the
    bytes copied. Raises: StoreUnavailable (the store failed; the build stays unlisted)."""
    from concurrent.futures import ThreadPoolExecutor

    files = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/")
            if rel != "manifest.json":
                files.append(rel)

    def put(rel: str) -> int:
        path = os.path.join(folder, rel)
        store.upload(f"{prefix}/{rel}", path)
        return os.path.getsize(path)

    with ThreadPoolExecutor(threads, thread_name_prefix="tiles-upload") as pool:
        total = sum(pool.map(put, sorted(files)))
    return total + put("manifest.json")


class TileSource:
    """Serves one layout's tiles from its artifact folder; thread-safe.

    Opening checks the manifest against ``cells.idx`` (sha256) and ``cells.bin`` (size; its sha256
    is in the manifest for offline checks — hashing gigabytes per server start is not worth it).

    Raises:
        NotFound: no finished build in ``folder``. CorruptArtifact: the files do not match it.
    """

    def __init__(self, folder: str, cache: bool = True):
        self.folder, self.cache = folder, cache
        try:
            with open(os.path.join(folder, "manifest.json"), "rb") as f:
                self.manifest = json.load(f)
        except FileNotFoundError:
            raise NotFound(f"the tiles of this layout are not built ({folder} has no manifest)") from None
        m = self.manifest
        self.pyramid = Pyramid(m["width"], m["height"], m["cell_px"], m["base_px"], m["tile_size"])
        idx_path = os.path.join(folder, "cells.idx")
        if file_sha256(idx_path) != m["cells"]["idx_sha256"]:
            raise CorruptArtifact(f"{idx_path} does not match the manifest")
        self._offsets = np.load(idx_path)
        bin_path = os.path.join(folder, "cells.bin")
        if os.path.getsize(bin_path) != m["cells"]["bytes"]:
            raise CorruptArtifact(f"{bin_path} does not match the manifest")
        self._pack = np.memmap(bin_path, np.uint8, "r") if m["cells"]["bytes"] else np.zeros(0, np.uint8)

    def tile_path(self, level: int, tx: int, ty: int) -> str:
        if self.pyramid.prerendered(level):
            return os.path.join(self.folder, str(level), f"{tx}_{ty}.jpg")
        return os.path.join(self.folder, "cache", str(level), f"{tx}_{ty}.jpg")

    def tile(self, level: int, tx: int, ty: int) -> bytes:
        """The JPEG of a tile. Raises NotFound outside the pyramid."""
        self.pyramid.tile_box(level, tx, ty)
        path = self.tile_path(level, tx, ty)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            if self.pyramid.prerendered(level):
                raise CorruptArtifact(f"pre-rendered tile {path} is missing") from None
        data = self.render(level, tx, ty)
        if self.cache:
            _write_atomic(path, data)
        return data

    def render(self, level: int, tx: int, ty: int) -> bytes:
        """Draw a deep-level tile from the cells' thumbnails."""
        p = self.pyramid
        left, top, w, h = p.tile_box(level, tx, ty)
        cell = p.cell_px // p.scale(level)
        canvas = Image.new("RGB", (w, h), BACKGROUND)
        gx0, gy0 = left // cell, top // cell
        gx1, gy1 = min(p.width, -(-(left + w) // cell)), min(p.height, -(-(top + h) // cell))
        for gy in range(gy0, gy1):
            for gx in range(gx0, gx1):
                c = gy * p.width + gx
                a, b = int(self._offsets[c]), int(self._offsets[c + 1])
                if b > a:
                    _paste(canvas, _fit(self._pack[a:b].tobytes(), cell), gx * cell - left, gy * cell - top, cell)
        return _jpeg(canvas)
