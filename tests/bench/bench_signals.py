"""Derived signals: ingest time with capture metadata vs without (same run), and the quality step's rate.

    python tests/bench/bench_signals.py --n 2000 [--repeat 3] [--spark]

Each repeat ingests the same n photo-like 640x480 JPEGs (each with a full EXIF block: camera,
lens, exposure, date with offset, GPS, keywords) into two fresh lakes, one with
``capture_metadata`` off and one with it on, in alternating order; medians are quoted, of wall
seconds and of CPU seconds (this process and its children: the Spark JVM and Python workers with
``--spark``), with the load average, since a shared machine moves wall time most. Then the
``quality`` step runs over the last lake (rows measured per second), beside a plain loop of the
same measure function over the thumbnails (no lake, no staging) as its baseline.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from PIL import Image  # noqa: E402
from PIL.TiffImagePlugin import IFDRational  # noqa: E402

from common import machine, tree_cpu_seconds, write_photos  # noqa: E402
from jobs.capture.exif import read_capture  # noqa: E402
from jobs.ingest.driver import run_ingest  # noqa: E402
from jobs.quality.driver import run_quality  # noqa: E402
from jobs.quality.partition import measure  # noqa: E402
from jobs.runner import LocalRunner, SparkRunner  # noqa: E402
from lake.catalog import Lake  # noqa: E402
from lake.commit import open_table  # noqa: E402
from lake.settings import Settings  # noqa: E402


def _exif(i: int) -> Image.Exif:
    ex = Image.Exif()
    ex[0x010F], ex[0x0110], ex[0x0112] = "Canon", f"Canon EOS {i % 7}D", 1
    sub = ex.get_ifd(0x8769)
    sub[0x9003], sub[0x9011] = f"2021:07:{1 + i % 28:02d} 18:{i % 60:02d}:05", "+02:00"
    sub[0x829A], sub[0x829D], sub[0x8827] = IFDRational(1, 250), IFDRational(28, 10), 100 * (1 + i % 32)
    sub[0x920A], sub[0xA434] = IFDRational(50, 1), "EF50mm f/1.8 STM"
    gps = ex.get_ifd(0x8825)
    gps[1], gps[2] = "N", (IFDRational(48, 1), IFDRational(i % 60, 1), IFDRational(2964, 100))
    gps[3], gps[4] = "E", (IFDRational(2, 1), IFDRational(17, 1), IFDRational(4008, 100))
    ex[0x9C9E] = "holiday;paris".encode("utf-16-le") + b"\x00\x00"
    return ex


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--spark", action="store_true", help="run on Spark local[*] (default: in process)")
    ap.add_argument("--workdir")
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-signals-"))
    print("bench_signals\n" + machine())
    try:
        src = workdir / "photos"
        paths = write_photos(src, args.n)
        for i, p in enumerate(paths):  # the same pictures with a full EXIF block
            im = Image.open(p)
            im.load()
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90, exif=_exif(i))
            p.write_bytes(buf.getvalue())
        print(f"  {len(paths)} 640x480 JPEGs with EXIF, {sum(p.stat().st_size for p in paths) / 1e6:.0f} MB")
        base = Settings(master="local[*]", runner="spark" if args.spark else "local")
        runner = SparkRunner(base) if args.spark else LocalRunner()
        if args.spark:
            runner.spark  # start the session outside the timings
        times: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        loads = [os.getloadavg()[0]]
        lake = None
        for r in range(args.repeat):
            for capture in ((False, True) if r % 2 == 0 else (True, False)):
                lake = Lake.at(workdir / f"lake-{r}-{int(capture)}")
                settings = base.replace(lake=lake.root, capture_metadata=capture)
                c0, t0 = tree_cpu_seconds(), time.perf_counter()
                summary = run_ingest(lake, settings, str(src), runner=runner)
                times[capture].append(time.perf_counter() - t0)
                cpu[capture].append(tree_cpu_seconds() - c0)
                assert summary.ok == len(paths), summary.line()
                if capture:
                    capture_lake = lake
                else:
                    shutil.rmtree(lake.root)
            loads.append(os.getloadavg()[0])
        off, on = statistics.median(times[False]), statistics.median(times[True])
        coff, con = statistics.median(cpu[False]), statistics.median(cpu[True])
        pairs = statistics.median(b / a for a, b in zip(times[False], times[True]))
        print(f"  load average (1 min) over the repeats: {' '.join(f'{x:.1f}' for x in loads)}")
        print(f"  ingest without capture metadata: median {off:.2f} s wall ({len(paths) / off:.0f} img/s), "
              f"{coff:.2f} s CPU, of {[round(t, 2) for t in times[False]]}")
        print(f"  ingest with capture metadata:    median {on:.2f} s wall ({len(paths) / on:.0f} img/s), "
              f"{con:.2f} s CPU, of {[round(t, 2) for t in times[True]]}")
        print(f"  ratio with / without: {on / off:.3f}x wall (median of per-repeat ratios {pairs:.3f}x), "
              f"{con / coff:.3f}x CPU  (target <= 1.15x)")
        data = [p.read_bytes() for p in paths[:200]]
        t0, c0 = time.perf_counter(), time.process_time()
        for i, d in enumerate(data):
            read_capture(d, f"{i:064x}", max_block_bytes=1 << 20)
        per, per_cpu = ((time.perf_counter() - t0) / len(data) * 1e3, (time.process_time() - c0) / len(data) * 1e3)
        print(f"  read_capture alone: {per:.2f} ms wall, {per_cpu:.2f} ms CPU per image (200 images)")

        settings = base.replace(lake=capture_lake.root)
        t0 = time.perf_counter()
        result = run_quality(capture_lake, settings, runner=runner)
        step = time.perf_counter() - t0
        print(f"  quality step: {result['rows_out']} images in {step:.2f} s = {result['rows_out'] / step:.0f} img/s "
              f"({'Spark local[*]' if args.spark else 'in process'}, incl. finding the work and the commit)")
        thumbs = open_table(capture_lake, "thumbnails").to_pyarrow_table(columns=["size", "jpeg"])
        jpegs = [j for s, j in zip(thumbs.column("size").to_pylist(), thumbs.column("jpeg").to_pylist()) if s == 256]
        t0 = time.perf_counter()
        for j in jpegs:
            measure(j)
        loop = time.perf_counter() - t0
        print(f"  baseline, plain loop of measure() over the same thumbnails: {len(jpegs) / loop:.0f} img/s")
        again = run_quality(capture_lake, settings, runner=runner)
        print(f"  quality re-run on the unchanged lake: {again['rows_in']} images to do")
        runner.close()
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
