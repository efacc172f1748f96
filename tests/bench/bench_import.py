"""``imagelake embed --import`` speed: vectors/s of this checkout's importer beside the old one.

A lake of ``--n`` images (``images`` and ``sources`` rows only: the importer reads nothing else)
and the Parquet file ``bench_million`` imports (keyed by uri, ``--dim`` floats from the real
features' spectrum, 1,000 concept probabilities per row) are made once. Then, alternating for
``--rounds`` rounds, each importer imports the file into a fresh copy of the lake: this
checkout's :func:`jobs.embed.importer.import_embeddings` and the **baseline**, the same module as
of commit ``--baseline`` (read with ``git show``). Prints the machine, the load, each import's wall
and CPU seconds and the medians with their ratio.

    python tests/bench/bench_import.py [--n 100000] [--rounds 2] [--baseline b8c0771]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def make_lake(root: Path, n: int) -> list[str]:
    import numpy as np
    import pyarrow as pa

    from lake.catalog import TABLES, Lake
    from lake.commit import commit_rows, ensure_tables

    lake = Lake.at(root).ensure()
    ensure_tables(lake)
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
    uris = [f"/bench/images/img_{i:08d}.jpg" for i in range(n)]   # named as bench_million names them
    ts = TABLES["images"].schema.field("ingested_at").type
    common = {"collection": ["bench"] * n, "bytes": pa.array([4000] * n, pa.int64()), "mtime": pa.nulls(n, ts),
              "run_id": ["bench"] * n, "ingested_at": pa.array([0] * n, ts)}
    commit_rows(lake, "images", pa.table({"image_id": ids, "seq": pa.array(np.arange(n)), "uri": uris,
                                          "format": ["JPEG"] * n, "width": pa.array([64] * n, pa.int32()),
                                          "height": pa.array([64] * n, pa.int32()), **common}), run_id="bench")
    commit_rows(lake, "sources", pa.table({"uri": uris, "image_id": ids, **common}), run_id="bench")
    return uris


def baseline_module(commit: str):
    """``jobs.embed.importer`` as of ``commit``, loaded under another name."""
    text = subprocess.run(["git", "show", f"{commit}:jobs/embed/importer.py"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-import-")) / "importer_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("importer_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["importer_baseline"] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", default="b8c0771", help="commit whose importer is the baseline")
    args = ap.parse_args()

    import bench_million

    from jobs.embed import importer
    from lake.catalog import Lake
    from lake.settings import Settings

    old = baseline_module(args.baseline)
    print(machine())
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average) on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        template = Path(tmp, "template")
        uris = make_lake(template, args.n)
        emb = Path(tmp, "emb.parquet")
        t0 = time.perf_counter()
        bench_million.write_embeddings(emb, sorted(uris), seed=args.n)
        print(f"{args.n:,} vectors of {bench_million.D} floats + 1,000 concept probabilities: "
              f"{emb.stat().st_size / 2**20:.0f} MiB, written in {time.perf_counter() - t0:.1f} s")
        times: dict[str, list[tuple[float, float]]] = {"baseline": [], "new": []}
        for r in range(args.rounds):
            for name, module in (("baseline", old), ("new", importer)):
                root = Path(tmp, f"lake-{name}-{r}")
                shutil.copytree(template, root)
                lake = Lake.at(root)
                w, c = time.perf_counter(), time.process_time()
                res = module.import_embeddings(lake, Settings(lake=lake.root), str(emb), bench_million.MODEL)
                wall, cpu = time.perf_counter() - w, time.process_time() - c
                assert res.imported == args.n, res.lines()
                times[name].append((wall, cpu))
                print(f"round {r} {name:8s}: {wall:6.1f} s wall, {cpu:6.1f} CPU-s, {args.n / wall:8,.0f} vectors/s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
                shutil.rmtree(root)
    for name, label in (("baseline", f"baseline ({args.baseline})"), ("new", "this checkout")):
        w = statistics.median(t[0] for t in times[name])
        c = statistics.median(t[1] for t in times[name])
        print(f"{label:22s}: median {w:.1f} s wall ({args.n / w:,.0f} vectors/s), {c:.1f} CPU-s "
              f"({args.n / c:,.0f} vectors per CPU-s)")
    bw, nw = (statistics.median(t[0] for t in times[k]) for k in ("baseline", "new"))
    bc, nc = (statistics.median(t[1] for t in times[k]) for k in ("baseline", "new"))
    print(f"new / baseline: wall {nw / bw:.2f}x, CPU {nc / bc:.2f}x; target 20,000 vectors/s: "
          f"{'met' if args.n / nw >= 20_000 else 'NOT met'} (wall)")


if __name__ == "__main__":
    main()
