"""Serving latency from an object-store lake vs the same lake on local disk, after warm-up.

The lake (``--n`` labelled images, ingested and embedded locally, plus a grid layout) is copied
into a bucket on the loopback S3 server (moto, its own process), indexed there with
``run_index``, and served over real HTTP (werkzeug's threaded server, one process) side by side
with the local copy. Each server answers one warm-up round first (it fills the artifact cache and
maps the build / matrix), then every request kind is timed ``--repeat`` times, alternating local
and s3; medians in ms and the ratio s3 / local. Thumbnails ask a different image each time, so
every s3 one is a read from the store (the per-process thumbnail LRU never hits).

    PYTHONPATH=. python tests/bench/bench_s3_serve.py --n 2000 --repeat 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from common import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=40)
    args = ap.parse_args()

    from jobs.grid.driver import run_grid
    from jobs.index.driver import run_index
    from jobs.runner import LocalRunner
    from lake.catalog import Lake
    from lake.commit import open_table
    from lake.settings import Settings
    from lake.store import LakeStore
    from photo_lake import copy_lake, photo_template
    from s3_server import S3Server
    from test_s3_serve import _Server, _settings, _upload_tree

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    print(machine())
    base = Path(tempfile.mkdtemp(prefix="bench-s3-serve-"))
    template = photo_template(base, args.n)[0]
    local = copy_lake(template, base / "local")
    grid = run_grid(local, Settings(lake=local.root, runner="local"), seed=3)
    s3 = S3Server()
    os.environ.update(s3.storage_options())
    try:
        root = f"s3://{s3.make_bucket()}/lake"
        _upload_tree(LakeStore.for_lake(root), local.root, ("tables", f"artifacts/tiles/{grid['layout_id']}"))
        t0 = time.perf_counter()
        run_index(Lake.at(root), _settings(root, base / "x"), runner=LocalRunner(), shard_size=max(1, args.n // 3))
        s3_index_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_index(local, Settings(lake=local.root, runner="local"), runner=LocalRunner(), shard_size=max(1, args.n // 3))
        local_index_s = time.perf_counter() - t0
        print(f"index build ({args.n} vectors, Flat, 3 shards): local {local_index_s:.2f} s, s3 {s3_index_s:.2f} s")

        # refresh_s at its default (the tests use 0: every request re-reads the table versions)
        servers = {"local": _Server(_settings(local.root, base / "cache-local").replace(refresh_s=2.0)),
                   "s3": _Server(_settings(root, base / "cache-s3").replace(refresh_s=2.0))}
        ids = sorted(open_table(local, "images").to_pyarrow_table(columns=["image_id"]).column(0).to_pylist())
        buckets = {}
        for name, srv in servers.items():   # warm-up: first loads fill the cache and map everything
            t0 = time.perf_counter()
            srv.json("GET", f"/search/similar?image_id={ids[0]}&k=10")
            b = srv.json("POST", "/buckets", {"name": "bench"}, status=201)["bucket"]["bucket_id"]
            srv.json("POST", f"/buckets/{b}/images", {"image_ids": ids[:5]})
            srv.json("GET", f"/buckets/{b}/suggestions?n=20&explore=false")
            lid = srv.json("GET", "/grid/latest")["layout"]["layout_id"]
            srv.request("GET", f"/grid/{lid}/tiles/0/0_0.jpg")
            buckets[name] = (b, lid)
            print(f"warm-up {name}: {time.perf_counter() - t0:.2f} s")
        top = servers["local"].json("GET", "/grid/latest")["dzi"]["max_level"]
        kinds = {
            "similarity query (k=10)": lambda srv, name, i: srv.request("GET", f"/search/similar?image_id={ids[i % len(ids)]}&k=10"),
            "suggestions (n=20)": lambda srv, name, i: srv.request("GET", f"/buckets/{buckets[name][0]}/suggestions?n=20&explore=false"),
            "thumbnail 64 px (uncached)": lambda srv, name, i: srv.request("GET", f"/images/{ids[(7 * i + 11) % len(ids)]}/thumbnail?size=64"),
            "deep tile (after first)": lambda srv, name, i: srv.request("GET", f"/grid/{buckets[name][1]}/tiles/{top}/0_0.jpg"),
        }
        print(f"\n{'request':30} {'local ms':>9} {'s3 ms':>9} {'s3/local':>9}   (medians of {args.repeat})")
        for kind, fn in kinds.items():
            times = {"local": [], "s3": []}
            for i in range(args.repeat):
                for name, srv in servers.items():
                    t0 = time.perf_counter()
                    code, _, _ = fn(srv, name, i)
                    times[name].append((time.perf_counter() - t0) * 1000)
                    assert code == 200, (kind, name, code)
            lm, sm = statistics.median(times["local"]), statistics.median(times["s3"])
            print(f"{kind:30} {lm:9.2f} {sm:9.2f} {sm / lm:9.2f}")
        for srv in servers.values():
            srv.stop()
    finally:
        s3.stop()


if __name__ == "__main__":
    main()
