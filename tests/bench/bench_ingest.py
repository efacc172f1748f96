"""Ingest throughput: the Spark job vs a plain single-process loop, incremental runs, SQL at 10M rows.

    python tests/bench/bench_ingest.py [--n 5000] [--rows 10000000] [--workdir DIR]

Prints the machine and every figure; the baseline runs side by side in the same process.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from common import machine, median_time, write_photos  # noqa: E402
from jobs.ingest.decode import inspect_image  # noqa: E402
from jobs.ingest.driver import run_ingest  # noqa: E402
from jobs.runner import SparkRunner  # noqa: E402
from lake.catalog import Lake  # noqa: E402
from lake.settings import Settings  # noqa: E402


def plain_loop(paths: list[Path]) -> None:
    """What a simple script does: read, hash, full decode, orient, two thumbnails. No lake at all."""
    for p in paths:
        data = p.read_bytes()
        hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im.convert("RGB"))
            for size in (64, 256):
                t = im.copy()
                t.thumbnail((size, size))
                t.save(io.BytesIO(), "JPEG", quality=85)


def same_function_loop(paths: list[Path]) -> None:
    for p in paths:
        inspect_image(p.read_bytes(), max_pixels=10**8)


def sql_at_scale(workdir: Path, rows: int) -> None:
    from deltalake import write_deltalake

    from lake.sql import SqlSandbox

    lake = Lake.at(workdir / "sql-lake").ensure()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    chunk = 2_000_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        table = pa.table({
            "image_id": pa.array([f"{i:064x}" for i in range(start, start + n)]),
            "seq": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "uri": pa.array([f"/data/{i % 997}/{i}.jpg" for i in range(start, start + n)]),
            "collection": pa.array(rng.integers(0, 50, n).astype(str).astype(object)),
            "format": pa.array(np.where(rng.random(n) < 0.8, "JPEG", "PNG").astype(object)),
            "width": pa.array(rng.integers(64, 4000, n).astype(np.int32)),
            "height": pa.array(rng.integers(64, 3000, n).astype(np.int32)),
            "bytes": pa.array(rng.integers(10_000, 5_000_000, n)),
        })
        from lake.catalog import TABLES
        schema = TABLES["images"].schema
        table = pa.table({f.name: table[f.name] if f.name in table.column_names else pa.nulls(n, f.type)
                          for f in schema}).cast(schema)
        write_deltalake(lake.table_uri("images"), table, mode="append")
    print(f"  wrote {rows:,} synthetic images rows in {time.perf_counter() - t0:.1f} s")
    sandbox = SqlSandbox(lake, Settings(lake=lake.root, sql_timeout_s=60))
    q = ("SELECT collection, count(*) AS n, avg(bytes) AS mean_bytes, max(width * height) AS max_px "
         "FROM images GROUP BY collection ORDER BY n DESC")
    sandbox.query(q)
    med, times = median_time(lambda: sandbox.query(q), repeat=5)
    print(f"  GROUP BY over {rows:,} rows (SqlSandbox, warm): median {med * 1000:.0f} ms "
          f"(runs: {', '.join(f'{t * 1000:.0f}' for t in times)} ms)  target <= 1000 ms")
    sandbox.close()
    import subprocess
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "imagelake", "--lake", lake.root, "sql", q, "--format", "csv"],
                         capture_output=True, text=True)
    print(f"  `imagelake sql` end to end, including process start: {time.perf_counter() - t0:.2f} s "
          f"({len(out.stdout.splitlines()) - 1} groups, exit {out.returncode})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ingest-"))
    print("bench_ingest\n" + machine())
    try:
        src = workdir / "photos"
        t0 = time.perf_counter()
        paths = write_photos(src, args.n)
        print(f"  generated {len(paths)} 640x480 JPEGs ({sum(p.stat().st_size for p in paths) / 1e6:.0f} MB) "
              f"in {time.perf_counter() - t0:.0f} s")

        t0 = time.perf_counter()
        plain_loop(paths)
        plain = time.perf_counter() - t0
        sample = paths[: max(200, len(paths) // 10)]
        t0 = time.perf_counter()
        same_function_loop(sample)
        same = (time.perf_counter() - t0) * len(paths) / len(sample)

        settings = Settings(master="local[*]")
        t0 = time.perf_counter()
        runner = SparkRunner(settings)
        runner.spark  # start the session
        startup = time.perf_counter() - t0
        lake = Lake.at(workdir / "lake")
        full = run_ingest(lake, settings.replace(lake=lake.root), str(src), runner=runner)
        new = write_photos(src, max(1, args.n // 100), seed=7, start=args.n)
        incr = run_ingest(lake, settings.replace(lake=lake.root), str(src), runner=runner)
        runner.close()
        assert full.ok == len(paths) and incr.ok == len(new), (full, incr)

        rate = lambda secs: len(paths) / secs  # noqa: E731
        print(f"  plain single-process loop (full decode):      {rate(plain):7.1f} img/s  ({plain:.1f} s)")
        print(f"  same decode function, single-process loop:    {rate(same):7.1f} img/s  (extrapolated from "
              f"{len(sample)})")
        print(f"  imagelake ingest on Spark local[*], job only: {rate(full.seconds):7.1f} img/s  "
              f"({full.seconds:.1f} s, incl. listing and Delta commits; Spark start {startup:.1f} s extra)")
        print(f"  ratio ingest / plain loop: {plain / full.seconds:.2f}x  (target >= 1.5x)")
        print(f"  incremental run with {len(new)} new files (1%): {incr.seconds:.2f} s = "
              f"{100 * incr.seconds / full.seconds:.1f}% of the full run (target <= 10%)")
        sql_at_scale(workdir, args.rows)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
