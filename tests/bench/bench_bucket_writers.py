"""The bucket log's write path without HTTP: P processes x T threads submitting adds, side by side
for the two designs measured for issue 19.

    python tests/bench/bench_bucket_writers.py [--processes 4] [--threads 4] [--seconds 8] [--lake DIR]

* ``per-process``: every process commits its own actions (group commit within the process),
  ordered by Delta versions: a process that lost the next version re-reads and replans (what
  every server worker did before, taking turns on the table);
* ``node``: the processes elect one writer (:mod:`lake.bucket_writer`) and hand it their actions
  over the local socket; one group commit takes everyone's.

Prints acknowledged actions/s, commits, replans and p50/p99 latency per design, the machine and
its load; checks every acknowledged event is in ``bucket_events`` with ``seq`` dense.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

IDS = [f"{k:064x}" for k in range(1, 200)]


def _worker(root: str, bucket: str, node: bool, threads: int, seconds: float, k: int, go, out) -> None:
    from lake.bucket_store import Action, BucketStore
    from lake.catalog import Lake

    store = BucketStore(Lake.at(root), node_writer=node)
    lat: list[float] = []
    acked: list[str] = []
    mu = threading.Lock()
    start = go.get()  # wait for the go signal, so every process starts together
    stop = start + seconds

    def run(t: int) -> None:
        j = 0
        while time.time() < stop:
            t0 = time.perf_counter()
            e = store.submit(Action("add", bucket, (IDS[(t * 7 + j) % len(IDS)],), actor=f"{k}-{t}"))
            with mu:
                lat.append(time.perf_counter() - t0)
                acked.append(e["event_id"])
            j += 1

    ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    out.put((k, acked, lat, store.commits, store.replans))
    time.sleep(0.5)  # let the others finish before a writer's exit forces a take-over


def measure(root: str, node: bool, processes: int, threads: int, seconds: float) -> dict:
    from lake.bucket_store import Action, BucketStore
    from lake.catalog import Lake

    bucket = BucketStore(Lake.at(root)).submit(Action("create", payload={"name": "b"}, actor="x"))["bucket_id"]
    ctx = mp.get_context("spawn")
    gos, out = [ctx.Queue() for _ in range(processes)], ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(root, bucket, node, threads, seconds, k, gos[k], out))
             for k in range(processes)]
    [p.start() for p in procs]
    time.sleep(8)  # imports in every child
    start = time.time() + 1
    for q in gos:
        q.put(start)
    results = [out.get(timeout=seconds + 300) for _ in procs]
    [p.join() for p in procs]
    lat = sorted(x for r in results for x in r[2])
    acked = [e for r in results for e in r[1]]
    from deltalake import DeltaTable

    table = DeltaTable(Lake.at(root).table_uri("bucket_events")).to_pyarrow_table(columns=["event_id", "seq"])
    stored = set(table.column("event_id").to_pylist())
    assert set(acked) <= stored, "an acknowledged action is missing"
    assert sorted(table.column("seq").to_pylist()) == list(range(table.num_rows)), "seq not dense"
    return {"actions_s": len(acked) / seconds, "commits": sum(r[3] for r in results),
            "replans": sum(r[4] for r in results), "p50": lat[len(lat) // 2] * 1000,
            "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, "acked": len(acked)}


def main() -> None:
    from common import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--lake", help="folder for the lakes (default: a temporary one)")
    args = ap.parse_args()
    tmp = args.lake or tempfile.mkdtemp(prefix="imagelake-writers-")
    load = os.getloadavg()[0]
    rows = []
    for name, node in (("per-process", False), ("node", True)):
        rows.append((name, measure(os.path.join(tmp, name), node, args.processes, args.threads, args.seconds)))
    print(machine())
    print(f"{args.processes} processes x {args.threads} threads, {args.seconds:.0f} s each; local lake; "
          f"load average before/after {load:.1f} / {os.getloadavg()[0]:.1f} (cores: {os.cpu_count()})")
    print(f"{'design':<12} {'actions/s':>10} {'commits':>8} {'replans':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in rows:
        print(f"{name:<12} {r['actions_s']:>10.0f} {r['commits']:>8} {r['replans']:>8} {r['p50']:>8.1f} {r['p99']:>8.1f}")
    print("verified: every acknowledged action is in bucket_events, seq dense")


if __name__ == "__main__":
    main()
