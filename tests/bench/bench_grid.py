"""Benchmark of the grid map: layout time and quality, tiles, cached tile latency.

    PYTHONPATH=. python tests/bench/bench_grid.py [--sizes 100000,1000000] [--tiles-n 100000] [--quick]

(a) 4,096 real Fashion-MNIST images embedded with EfficientNet-Lite0 (ONNX Runtime; cached under
    test-artifacts/bench_grid/), laid out by the seeds' method — PCA-50, sklearn t-SNE, exact
    linear assignment of the full 4,096 × 4,096 cost matrix (scipy) — and by ``layout_grid``, in
    the same run; time and neighbourhood preservation (all cells, exact 50-NN) of both, and random.
(b) 100k and 1M *synthetic* vectors: a spread of those real features (a real feature picked at
    random plus Gaussian noise of half the per-dimension spread), in the real features' PCA-256
    space so 1M fits in memory on a small machine; layout time, quality on 2,000 sampled cells.
(c) Tiles at ``--tiles-n`` (100k) images with 64 px photo-like thumbnails in a real lake:
    the build (one sorted pass: cell pack + pre-rendered overview levels) vs the eager
    alternative (every tile of every level rendered up front); time and bytes of each;
    first-request latency of deep tiles; cached tile latency through the Flask app (p50/p99).

Targets (2 cores): at 4k quality >= 1.0x the seeds' at >= 20x its speed; 1M laid out in <= 5 min;
a cached tile p99 <= 30 ms.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402
from jobs.grid.layout import layout_grid  # noqa: E402
from jobs.grid.quality import neighbourhood_preservation, random_baseline  # noqa: E402

CACHE = ROOT / "test-artifacts" / "bench_grid"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def fashion_features(n: int) -> tuple[np.ndarray, np.ndarray]:
    """lite0 embeddings of the first n Fashion-MNIST training images (cached), and their labels."""
    path = CACHE / f"fmnist_lite0_{n}.npz"
    if path.exists():
        data = np.load(path)
        return data["feats"], data["labels"]
    from PIL import Image

    from jobs.embed import get_model
    from jobs.embed.artifact import ensure_onnx
    from jobs.embed.runtime import OnnxRuntime

    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(FMNIST / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    spec = get_model("efficientnet-lite0")
    runtime = OnnxRuntime(ensure_onnx(str(CACHE / "artifacts"), spec), threads=os.cpu_count() or 1)
    s = spec.input_size
    out = []
    for start in range(0, n, 64):
        batch = np.stack([np.asarray(Image.fromarray(im).convert("RGB").resize((s, s), Image.Resampling.BILINEAR))
                          for im in images[start:start + 64]])
        out.append(runtime.embed(batch)[0])
    feats = np.concatenate(out).astype(np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, feats=feats, labels=labels)
    return feats, labels


def seeds_layout(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, int, int]:
    """The seeds' way: PCA-50 → t-SNE → exact linear assignment to the grid (full n × n matrix)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    from jobs.grid.layout import grid_shape

    n = len(x)
    width, height = grid_shape(n)
    z = PCA(50, random_state=seed).fit_transform(x / np.linalg.norm(x, axis=1, keepdims=True))
    xy = TSNE(2, random_state=seed, init="pca").fit_transform(z)
    xy = (xy - xy.min(axis=0)) / np.maximum(xy.max(axis=0) - xy.min(axis=0), 1e-9)
    gx, gy = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    cells_xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
    cost = cdist(xy, cells_xy, "sqeuclidean")
    _, cells = linear_sum_assignment(cost)
    return cells.astype(np.int64), width, height


def spread(real: np.ndarray, n: int, seed: int = 0, dims: int = 256) -> np.ndarray:
    """n synthetic vectors around the real ones, in the real features' PCA space (see docstring)."""
    rng = np.random.default_rng(seed)
    unit = real / np.linalg.norm(real, axis=1, keepdims=True)
    mean = unit.mean(axis=0)
    _, _, vt = np.linalg.svd(unit - mean, full_matrices=False)
    base = ((unit - mean) @ vt[:dims].T).astype(np.float32)
    scale = 0.5 * base.std(axis=0)
    out = np.empty((n, dims), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        out[start:start + m] = base[rng.integers(len(base), size=m)] + scale * rng.standard_normal((m, dims), np.float32)
    return out + 1.0  # away from the origin, so unit-normalising keeps the structure


def bench_4k(n: int) -> None:
    x, labels = fashion_features(n)
    print(f"\n(a) {n} real Fashion-MNIST lite0 features ({x.shape[1]}-d)")
    t0 = time.perf_counter()
    cells, w, h = seeds_layout(x)
    seeds_s = time.perf_counter() - t0
    seeds_q = neighbourhood_preservation(x, cells, w, h, sample=None)
    ours_s, runs = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        layout = layout_grid(x, seed=0)
        ours_s.append(time.perf_counter() - t0)
        runs.append(layout)
    ours_q = neighbourhood_preservation(x, runs[-1].cells, runs[-1].width, runs[-1].height, sample=None)
    other = [neighbourhood_preservation(x, layout_grid(x, seed=s).cells, w, h, sample=None) for s in (1, 2)]
    med = statistics.median(ours_s)
    print(f"  seeds' method (PCA-50, t-SNE, exact LSA {n}x{n}): {seeds_s:7.2f} s   quality {seeds_q:.3f}")
    print(f"  layout_grid (median of 3):                    {med:7.2f} s   quality {ours_q:.3f} "
          f"(seeds 1, 2: {other[0]:.3f}, {other[1]:.3f})   [{runs[-1].timings}]")
    print(f"  random placement: quality ≈ {random_baseline(n):.3f}")
    print(f"  => speed {seeds_s / med:.1f}x the seeds', quality {ours_q / seeds_q:.2f}x "
          f"(targets: >= 20x, >= 1.0x)", flush=True)


def bench_scale(sizes: list[int]) -> dict[int, object]:
    real, _ = fashion_features(4096)
    layouts = {}
    for n in sizes:
        x = spread(real, n)
        t0 = time.perf_counter()
        layout = layout_grid(x, seed=0)
        secs = time.perf_counter() - t0
        t0 = time.perf_counter()
        q = neighbourhood_preservation(x, layout.cells, layout.width, layout.height, sample=2000)
        q_s = time.perf_counter() - t0
        parts = ", ".join(f"{k} {v:.1f}" for k, v in layout.timings.items())
        print(f"\n(b) {n:,} synthetic vectors (spread of real features, 256-d): layout {secs:.1f} s ({parts}); "
              f"quality {q:.3f} on 2,000 cells (scored in {q_s:.1f} s; random ≈ {random_baseline(n):.5f}); "
              f"load now {os.getloadavg()[0]:.1f}", flush=True)
        layouts[n] = layout
        del x
    return layouts


def _photo_thumbnails(count: int) -> list[bytes]:
    """``count`` distinct 64x48 photo-like JPEG thumbnails (crops of scikit-image photos)."""
    from PIL import Image

    from common import _sources

    rng = np.random.default_rng(0)
    sources = _sources()
    out = []
    for i in range(count):
        src = sources[i % len(sources)]
        hh, ww = src.shape[:2]
        ch, cw = int(hh * rng.uniform(0.2, 0.6)), int(ww * rng.uniform(0.2, 0.6))
        y, x = rng.integers(0, hh - ch + 1), rng.integers(0, ww - cw + 1)
        buf = io.BytesIO()
        Image.fromarray(src[y:y + ch, x:x + cw]).resize((64, 48)).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def bench_tiles(n: int, layout) -> None:
    import pyarrow as pa

    from api import create_app
    from jobs.grid.driver import _thumbnails_in_cell_order
    from jobs.grid.tiles import Pyramid, TileSource, build_tiles
    from lake.catalog import Lake
    from lake.commit import commit_rows, ensure_tables, now_utc
    from lake.settings import Settings
    from lake.tokens import create_token

    tmp = Path(tempfile.mkdtemp(prefix="bench_grid_"))
    try:
        lake = Lake.at(tmp / "lake")
        ensure_tables(lake)
        ids = [hashlib.sha256(f"bench-{i}".encode()).hexdigest() for i in range(n)]
        thumbs = _photo_thumbnails(1024)
        for start in range(0, n, 50_000):
            part = range(start, min(n, start + 50_000))
            commit_rows(lake, "thumbnails", pa.table({
                "image_id": [ids[i] for i in part], "size": pa.array([64] * len(part), pa.int32()),
                "width": pa.array([64] * len(part), pa.int32()), "height": pa.array([48] * len(part), pa.int32()),
                "jpeg": [thumbs[i % len(thumbs)] for i in part]}), run_id=f"bench-thumbs-{start}")
        layout_id = "bench"
        p = Pyramid(layout.width, layout.height)
        folder = lake.artifacts_dir("tiles", layout_id)
        t0 = time.perf_counter()
        manifest = build_tiles(folder, p, _thumbnails_in_cell_order(lake, ids, layout.cells, 64),
                               meta={"layout_id": layout_id})
        build_s = time.perf_counter() - t0
        pre_bytes = manifest["prerendered_tile_bytes"]
        pack_bytes = manifest["cells"]["bytes"] + os.path.getsize(os.path.join(folder, "cells.idx"))
        pre_tiles = sum(np.prod(p.tiles_across(z)) for z in manifest["prerendered_levels"])
        deep_levels = [z for z in range(p.max_level + 1) if not p.prerendered(z)]
        deep_tiles = sum(int(np.prod(p.tiles_across(z))) for z in deep_levels)
        print(f"\n(c) tiles for {n:,} images ({layout.width}x{layout.height} cells, {p.full_size[0]:,} px square, "
              f"{p.max_level + 1} levels, {pre_tiles + deep_tiles:,} tiles)")
        print(f"  build (sorted pass: cell pack + {pre_tiles:,} overview tiles of levels "
              f"{manifest['prerendered_levels'][0]}..{manifest['prerendered_levels'][-1]}): {build_s:.1f} s, "
              f"{(pre_bytes + pack_bytes) / 2**20:.0f} MiB ({pack_bytes / 2**20:.0f} MiB pack, "
              f"{pre_bytes / 2**20:.1f} MiB tiles)", flush=True)

        source = TileSource(folder, cache=True)
        rng = np.random.default_rng(0)
        # The eager alternative: all deep tiles up front (time a sample per level, extrapolate exactly
        # by the tile count of each level), and the bytes they take.
        eager_s = eager_bytes = 0.0
        first = []
        for z in deep_levels:
            nx, ny = p.tiles_across(z)
            picks = [(int(rng.integers(nx)), int(rng.integers(ny))) for _ in range(min(nx * ny, 150))]
            times, sizes = [], []
            for tx, ty in picks:
                t0 = time.perf_counter()
                data = source.tile(z, tx, ty)
                times.append(time.perf_counter() - t0)
                sizes.append(len(data))
            first += times
            eager_s += statistics.mean(times) * nx * ny
            eager_bytes += statistics.mean(sizes) * nx * ny
        print(f"  eager alternative (every tile of levels {deep_levels[0]}..{deep_levels[-1]} rendered up front, "
              f"extrapolated from samples): +{eager_s:.0f} s, +{eager_bytes / 2**20:.0f} MiB on top of the overview")
        first.sort()
        print(f"  deep tile on first request (render from pack + cache write): p50 {1000 * first[len(first) // 2]:.1f} ms, "
              f"p99 {1000 * first[int(len(first) * 0.99)]:.1f} ms over {len(first)} tiles")

        settings = Settings(lake=lake.root, refresh_s=60.0)
        created = now_utc()
        commit_rows(lake, "grid", pa.table({
            "layout_id": [layout_id] * n, "image_id": ids, "x": layout.xy[:, 0], "y": layout.xy[:, 1],
            "gx": layout.gx, "gy": layout.gy, "created_at": pa.array([created] * n, pa.timestamp("us", tz="UTC"))}),
            run_id="bench-grid")
        commit_rows(lake, "grid_layouts", [{"layout_id": layout_id, "n": n, "width": layout.width,
                                            "height": layout.height, "tiles_path": f"artifacts/tiles/{layout_id}",
                                            "created_at": created}], run_id="bench-layouts")
        app = create_app(settings, {"TESTING": True})
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {create_token(lake, 'read', 'bench')[1]}"
        urls = []
        for z in range(p.max_level + 1):
            nx, ny = p.tiles_across(z)
            for _ in range(40):
                tx, ty = int(rng.integers(nx)), int(rng.integers(ny))
                urls.append(f"/api/v1/grid/{layout_id}/tiles/{z}/{tx}_{ty}.jpg")
        for u in urls:  # warm: layout loaded, every tile rendered and cached
            assert client.get(u).status_code == 200, u
        lat = []
        for _ in range(3):
            for u in urls:
                t0 = time.perf_counter()
                r = client.get(u)
                lat.append(time.perf_counter() - t0)
                assert r.status_code == 200
        lat.sort()
        print(f"  cached tile through the Flask app (test client, all levels): p50 {1000 * lat[len(lat) // 2]:.2f} ms, "
              f"p99 {1000 * lat[int(len(lat) * 0.99)]:.2f} ms over {len(lat)} requests (target p99 <= 30 ms)")
        app.extensions["imagelake"].close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n4k", type=int, default=4096)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--tiles-n", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="4k comparison and 20k tiles only")
    args = ap.parse_args()
    print(machine())
    print(f"load average at start: {os.getloadavg()}")
    bench_4k(args.n4k)
    sizes = [] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    tiles_n = 20_000 if args.quick else args.tiles_n
    layouts = bench_scale(sorted(set(sizes) | {tiles_n}))
    bench_tiles(tiles_n, layouts[tiles_n])
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
