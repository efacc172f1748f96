"""Metadata import, filter and facets at scale, with baselines measured side by side.

A synthetic lake of N images (``images`` rows committed directly; no JPEGs needed) and a CSV of N
metadata rows keyed by file stem. Measures:

* ``imagelake metadata import`` (type inference, key resolution, upsert, rejects) — first import
  (all inserts) and re-import (all updates) — against a naive import: pyarrow CSV read, a Python
  dict from stem to image id, ``write_deltalake(mode="overwrite")`` (no rejects, no upsert, no typing).
* ``matching_seqs`` through a fresh lake connection and through a warm one, against the same
  predicate written by hand as SQL on the warm connection (the cost of the safe compiler).
* ``facet_counts`` over a list column.

Usage: ``python tests/bench/bench_metadata.py [--n 200000]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median_time  # noqa: E402
from deltalake import write_deltalake  # noqa: E402

from lake.catalog import TABLES, Lake  # noqa: E402
from lake.commit import commit_rows, ensure_tables, now_utc  # noqa: E402
from lake.metadata import import_metadata  # noqa: E402
from lake.metadata_filter import facet_counts, lake_connection, matching_seqs  # noqa: E402

WORDS = [f"subject{i:02d}" for i in range(50)]


def build(root: Path, n: int) -> tuple[Lake, Path]:
    lake = Lake.at(root / "lake")
    ensure_tables(lake)
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    now = now_utc()
    images = pa.table({
        "image_id": ids, "seq": pa.array(range(n), pa.int64()),
        "uri": [f"/data/photos/img_{i:07d}.jpg" for i in range(n)],
        "collection": ["photos"] * n, "format": ["JPEG"] * n,
        "width": pa.array([640] * n, pa.int32()), "height": pa.array([480] * n, pa.int32()),
        "bytes": pa.array([50_000] * n, pa.int64()), "mtime": pa.array([now] * n, TABLES["images"].schema.field("mtime").type),
        "run_id": ["bench"] * n, "ingested_at": pa.array([now] * n, TABLES["images"].schema.field("ingested_at").type),
    })
    commit_rows(lake, "images", images, run_id="bench-images")
    rng = np.random.default_rng(0)
    csv_path = root / "meta.csv"
    years = rng.integers(1850, 2020, n)
    with open(csv_path, "w") as f:
        f.write("id,year,title,subjects\n")
        for i in range(n):
            subjects = json.dumps(list(rng.choice(WORDS, rng.integers(1, 4), replace=False))).replace('"', '""')
            f.write(f'img_{i:07d},{years[i]},"Specimen {i}","{subjects}"\n')
    return lake, csv_path


def naive_import(lake: Lake, csv_path: Path) -> None:
    table = pacsv.read_csv(csv_path, convert_options=pacsv.ConvertOptions(column_types={"id": pa.string()}))
    images = lake_connection(lake, ("images",)).sql("SELECT image_id, uri FROM images").to_arrow_table().to_pylist()
    by_stem = {r["uri"].rsplit("/", 1)[1].rsplit(".", 1)[0]: r["image_id"] for r in images}
    image_ids = [by_stem.get(k) for k in table.column("id").to_pylist()]
    table = table.append_column("image_id", pa.array(image_ids, pa.string())).filter(
        pa.compute.is_valid(pa.array(image_ids, pa.string())))
    write_deltalake(lake.path("naive_metadata"), table, mode="overwrite")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args()
    print(machine())
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        lake, csv_path = build(Path(tmp), args.n)
        print(f"built a lake of {args.n:,} images and a {csv_path.stat().st_size / 2**20:.1f} MiB CSV "
              f"in {time.perf_counter() - t0:.1f} s")

        t_naive, _ = median_time(lambda: naive_import(lake, csv_path), repeat=3)
        t0 = time.perf_counter()
        s = import_metadata(lake, csv_path, key="filename", run_id="bench-1")
        t_first = time.perf_counter() - t0
        assert s.imported == args.n and s.rejected == 0, s.lines()
        t0 = time.perf_counter()
        s = import_metadata(lake, csv_path, key="filename", run_id="bench-2")
        t_again = time.perf_counter() - t0
        assert s.updated == args.n, s.lines()

        where = {"year": {">=": 1900, "<": 1950}, "subjects": {"contains": "subject07"}}
        hand = ("SELECT DISTINCT i.seq FROM images i LEFT JOIN metadata m ON m.image_id = i.image_id "
                "WHERE m.year >= 1900 AND m.year < 1950 AND "
                "len(list_filter(m.subjects, lambda x: contains(lower(x), 'subject07'))) > 0 ORDER BY 1")
        con = lake_connection(lake)
        expected = con.sql(hand).to_arrow_table().column(0).to_numpy()
        assert np.array_equal(matching_seqs(con, where), expected)
        t_cold, _ = median_time(lambda: matching_seqs(lake, where))
        t_warm, _ = median_time(lambda: matching_seqs(con, where))
        t_hand, _ = median_time(lambda: con.sql(hand).to_arrow_table())
        t_facet, _ = median_time(lambda: facet_counts(con, "subjects", limit=50))
        con.close()

    n = args.n
    print(f"\n| what ({n:,} rows) | time | rate |\n|---|---|---|")
    print(f"| naive import: pyarrow CSV + Python dict + Delta overwrite (baseline, median of 3) | {t_naive:.2f} s | {n / t_naive:,.0f} rows/s |")
    print(f"| `metadata import` first (inference, key resolution, upsert, rejects) | {t_first:.2f} s | {n / t_first:,.0f} rows/s |")
    print(f"| `metadata import` again (upsert updating every row) | {t_again:.2f} s | {n / t_again:,.0f} rows/s |")
    print(f"| ratio first import / naive | {t_first / t_naive:.2f}x | |")
    print(f"| `matching_seqs(lake, filter)`, fresh connection ({len(expected):,} matches, median of 5) | {t_cold * 1000:.0f} ms | |")
    print(f"| `matching_seqs(con, filter)`, warm connection | {t_warm * 1000:.0f} ms | |")
    print(f"| the same predicate as hand-written SQL (baseline) | {t_hand * 1000:.0f} ms | |")
    print(f"| `facet_counts(subjects)` (list column, 50 values) | {t_facet * 1000:.0f} ms | |")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
