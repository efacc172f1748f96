"""Load: ``imagelake serve`` with several workers, 16 concurrent clients from this (second) process.

    python tests/bench/bench_load.py [--n 2000] [--clients 16] [--seconds 60] [--workers 4]
                                     [--steps ingest,embed,...] [--mix module:ATTR] [--lake DIR]

Builds a demo-sized lake with ``imagelake run`` (every step this build has, unless ``--steps``),
starts the server in a child process, warms every worker, then measures side by side:

* baseline: ``GET /health`` only — gunicorn + Flask + loopback, the floor of any route;
* the mix with one client — each route's service time without queueing;
* the mix: :data:`loadgen.MIX` (image metadata, thumbnails, browse, SQL; similarity search,
  suggestions and curation writes join it at merge), or ``--mix module:ATTR``.

Prints req/s, p50/p99 per operation and overall, the error rate, the machine and its load, and
checks every acknowledged write with its op's ``verify`` (e.g. the event is in ``bucket_events``).
Targets (issue 9): error rate 0, p99 <= 100 ms.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from common import machine, write_photos  # noqa: E402
from loadgen import HEALTH_ONLY, MIX, LoadContext, prepare, run_load, start_server  # noqa: E402

REPO = HERE.parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _imagelake(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "imagelake", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"imagelake {' '.join(args)} failed: {done.stderr[-2000:]}")
    return done.stdout


def build_lake(lake: Path, n: int, steps: str | None) -> float:
    images = lake.parent / "images"
    if not images.exists():
        write_photos(images, n, size=(320, 240))
    t0 = time.perf_counter()
    out = _imagelake("--lake", str(lake), "--runner", "local", "run", "--images", str(images), "--collection", "bench",
                     "--no-progress", *(["--steps", steps] if steps else []))
    print(out.strip())
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images in the lake")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the mixed run")
    ap.add_argument("--baseline-seconds", type=float, default=15.0)
    ap.add_argument("--single-seconds", type=float, default=10.0,
                    help="the mix with one client first: service time without queueing")
    ap.add_argument("--workers", type=int, default=4, help="server worker processes")
    ap.add_argument("--threads", type=int, default=8, help="threads per worker")
    ap.add_argument("--steps", help="pipeline steps to build the lake with (default: all in this build)")
    ap.add_argument("--mix", help="module:ATTR of a list of loadgen.Op to use instead of loadgen.MIX")
    ap.add_argument("--lake", help="reuse this lake folder (its images/ sibling too) instead of a temporary one")
    args = ap.parse_args()

    ops = MIX
    if args.mix:
        module, _, attr = args.mix.partition(":")
        ops = getattr(importlib.import_module(module), attr)

    with tempfile.TemporaryDirectory(prefix="imagelake-load-") as tmp:
        lake_dir = Path(args.lake) if args.lake else Path(tmp) / "lake"
        build_s = build_lake(lake_dir, args.n, args.steps)
        token = _imagelake("--lake", str(lake_dir), "token", "create", "--scope", "admin", "--name", "bench").strip()
        from deltalake import DeltaTable
        from lake.catalog import Lake

        lake = Lake.at(lake_dir)
        rows = DeltaTable(lake.table_uri("images")).to_pyarrow_table(columns=["image_id", "collection"])
        ctx = LoadContext(image_ids=rows.column("image_id").to_pylist(),
                          collections=sorted(set(rows.column("collection").to_pylist())))
        port = _free_port()
        log = Path(tmp) / "server.log"
        server = start_server(str(lake_dir), port, args.workers, str(log), threads=args.threads)
        base = f"http://127.0.0.1:{port}"
        try:
            prepare(base, token, ops, ctx)
            run_load(base, token, ops, ctx, clients=args.clients, seconds=5, seed=99)  # warm every worker
            load_before = os.getloadavg()
            single = run_load(base, token, ops, ctx, clients=1, seconds=args.single_seconds, seed=3)
            baseline = run_load(base, token, HEALTH_ONLY, ctx, clients=args.clients, seconds=args.baseline_seconds, seed=1)
            mixed = run_load(base, token, ops, ctx, clients=args.clients, seconds=args.seconds, seed=2)
            load_after = os.getloadavg()
        finally:
            server.terminate()
            server.wait(timeout=30)
        for op in ops:
            if op.verify is not None:
                op.verify(lake, ctx, mixed.acked.get(op.name, []))
                print(f"verified: all {len(mixed.acked.get(op.name, []))} acknowledged '{op.name}' writes are in the lake")

    print(machine())
    print(f"lake: {len(ctx.image_ids)} images ({args.n} files, 320x240), built in {build_s:.1f} s; server: "
          f"{args.workers} gunicorn gthread workers x {args.threads} threads; {args.clients} closed-loop clients "
          f"in one separate process over loopback")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
          f"(cores: {os.cpu_count()}; other work on the machine included)")
    print("\n-- baseline: GET /health only")
    print(baseline.table())
    print("\n-- the mix, one client (service time, no queueing)")
    print(single.table())
    print(f"\n-- the mix, {args.clients} clients")
    print(mixed.table())
    if mixed.error_samples:
        print("\nerror samples:\n  " + "\n  ".join(mixed.error_samples[:10]))
    b, m = baseline.summary(), mixed.summary()
    print(f"\nsummary: mix {m['req_per_s']} req/s, p50 {m['p50_ms']} ms, p99 {m['p99_ms']} ms, errors "
          f"{m['error_rate']:.4%}; baseline {b['req_per_s']} req/s, p99 {b['p99_ms']} ms; "
          f"mix/baseline throughput {m['req_per_s'] / max(b['req_per_s'], 1e-9):.2f}; one client: "
          f"p50 {single.summary()['p50_ms']} ms, p99 {single.summary()['p99_ms']} ms")
    print(f"targets: error rate 0 -> {'met' if m['error_rate'] == 0 else 'NOT met'}; p99 <= 100 ms -> "
          f"{'met' if m['p99_ms'] <= 100 else 'NOT met'}")


if __name__ == "__main__":
    main()
