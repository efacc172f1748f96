"""The cluster step with 1 % new images: the incremental run beside a full run of the same lake.

A lake of ``--n`` images is made directly as table rows (``images``, ``sources``, one 64 px JPEG
thumbnail each: a random colour field, 2 % of them re-encoded copies of the one before) with
embeddings from ``bench_million`` (the real features' spectrum, its planted near-copies) imported
through ``imagelake embed --import``'s function. Then, in this process with a local runner:

1. ``run_cluster`` (full: the first run);
2. ``--new`` percent more images the same way, then ``run_cluster`` again (incremental);
3. the **baseline** on the same lake: ``run_cluster(full=True)``, what every run cost before.

Prints the machine, the load, each run's wall and CPU seconds and its timings, the ratio
incremental / full, and whether both found the same groups.

    python tests/bench/bench_cluster_incremental.py [--n 20000] [--new 1.0]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import machine  # noqa: E402


def add_images(lake, start: int, n: int, tmp: Path, seed: int) -> None:
    """``n`` images from index ``start``: rows, thumbnails and imported embeddings."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    import bench_million
    from jobs.embed.importer import import_embeddings
    from lake.catalog import TABLES
    from lake.commit import commit_rows

    rng = np.random.default_rng(seed)
    ids, uris, jpegs, prev = [], [], [], None
    for i in range(start, start + n):
        px = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
            (64, 48), Image.Resampling.BILINEAR))
        q = 85
        if bench_million.is_planted_copy(i) and prev is not None:
            px, q = prev, 60
        prev = px
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, "JPEG", quality=q)
        jpegs.append(buf.getvalue())
        ids.append(hashlib.sha256(f"bench-{i}".encode()).hexdigest())
        uris.append(f"/bench/images/img_{i:08d}.jpg")
    ts = TABLES["images"].schema.field("ingested_at").type
    common = {"collection": ["bench"] * n, "bytes": pa.array([4000] * n, pa.int64()), "mtime": pa.nulls(n, ts),
              "run_id": [f"bench-{start}"] * n, "ingested_at": pa.array([0] * n, ts)}
    commit_rows(lake, "images", pa.table({"image_id": ids, "uri": uris, "format": ["JPEG"] * n,
                                          "width": pa.array([64] * n, pa.int32()),
                                          "height": pa.array([48] * n, pa.int32()), **common}),
                run_id=f"bench-{start}", assign_seq=True)
    commit_rows(lake, "sources", pa.table({"uri": uris, "image_id": ids, **common}), run_id=f"bench-{start}")
    commit_rows(lake, "thumbnails", pa.table({"image_id": ids, "size": pa.array([64] * n, pa.int32()),
                                              "width": pa.array([64] * n, pa.int32()),
                                              "height": pa.array([48] * n, pa.int32()), "jpeg": jpegs}),
                run_id=f"bench-{start}")
    emb = tmp / f"emb-{start}.parquet"
    bench_million.write_embeddings(emb, uris, seed=seed)
    import_embeddings(lake, None, str(emb), bench_million.MODEL)


def timed(label: str, fn) -> dict:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    timings = {k: v for k, v in out.items() if k.endswith("_s")}
    print(f"{label:28s} {wall:7.1f} s wall {cpu:7.1f} CPU-s  load {os.getloadavg()[0]:5.1f}  mode {out['dup_mode']:11s} "
          f"new {out['dup_new']:6d}  groups {out['dup_groups']}  {timings}", flush=True)
    return dict(out, wall=wall, cpu=cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--new", type=float, default=1.0, help="percent new images in the second run")
    args = ap.parse_args()

    import duckdb

    import bench_million
    from jobs.cluster import run_cluster
    from jobs.runner import LocalRunner
    from lake.catalog import Lake
    from lake.commit import ensure_tables, open_table
    from lake.settings import Settings

    print(machine())
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average) on {os.cpu_count()} cores")
    n_new = max(1, int(args.n * args.new / 100))

    def groups(lake, run_id):
        con = duckdb.connect()
        con.register("clusters", open_table(lake, "clusters").to_pyarrow_dataset())
        rows = con.sql(f"SELECT list(image_id) FROM clusters WHERE kind = 'dup' AND run_id = '{run_id}' "
                       "GROUP BY cluster_id").fetchall()
        return {frozenset(r[0]) for r in rows}

    with tempfile.TemporaryDirectory(prefix="bench-cluster-inc-") as tmp:
        lake = Lake.at(Path(tmp, "lake")).ensure()
        ensure_tables(lake)
        settings = Settings(lake=lake.root, runner="local")
        t0 = time.perf_counter()
        add_images(lake, 0, args.n, Path(tmp), seed=args.n)
        print(f"lake of {args.n:,} images made in {time.perf_counter() - t0:.1f} s", flush=True)
        first = timed("first run (full)", lambda: run_cluster(lake, settings, model=bench_million.MODEL,
                                                               runner=LocalRunner()))
        add_images(lake, args.n, n_new, Path(tmp), seed=args.n + 1)
        inc = timed(f"+{args.new:g} % run (incremental)", lambda: run_cluster(lake, settings, model=bench_million.MODEL,
                                                                            runner=LocalRunner()))
        full = timed("baseline: the same, --full", lambda: run_cluster(lake, settings, model=bench_million.MODEL,
                                                                       full=True, runner=LocalRunner()))
        same = groups(lake, inc["run_id"]) == groups(lake, full["run_id"])
    print(f"incremental / full on the same lake: {inc['cpu'] / full['cpu']:.1%} of the CPU time, "
          f"{inc['wall'] / full['wall']:.1%} of the wall time (target <= 10 %); first run {first['cpu']:.1f} CPU-s; "
          f"same groups as the full run: {same} ({inc['dup_groups']} vs {full['dup_groups']})")


if __name__ == "__main__":
    main()
