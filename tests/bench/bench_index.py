"""Benchmark: the sharded IVF-PQ index with exact re-ranking vs exact brute force (faiss IndexFlatIP).

    python tests/bench/bench_index.py [--n 1000000] [--queries 300] [--api-seconds 15]

Vectors: **synthetic, with the spectrum of real features** — a Gaussian mixture (4,096 clusters,
half of the variance between clusters) whose mean norm (0.71) and covariance eigenvalues (measured
at ranks 1, 2, 4, ..., 1024, interpolated) are those of unit-length EfficientNet-Lite0 features of
2,500 Fashion-MNIST images, in a random orthonormal basis, d = 1280, then L2-normalised. Queries
are held-out draws from the same mixture.

Measured, side by side in the same run:
1. build time: ours = train (sample <= 128k) + encode shards + manifest + publish, from vectors
   already in the build folder; reading features from Delta is measured separately at --delta-n
   through the whole `run_index` and reported per million rows. Baseline: IndexFlatIP.add.
2. bytes per vector: PQ codes + ids (plan), shard files on disk, and resident pages of the shard
   files after the queries (from /proc/self/smaps); the float16 re-rank copy is memory-mapped.
3. recall@10 vs exact, single-query p50/p99 (the search service: coarse quantizer once, shards in
   parallel, re-rank), batched QPS; baseline: IndexFlatIP single query and batched.
4. the API end to end: `imagelake serve` (gunicorn, 2 workers) and a load generator in a second
   process on loopback sending GET /search/similar?image_id=&k=10 from --api-clients threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

D = 1280
# Eigenvalues of the covariance of unit-length lite0 features (2,500 Fashion-MNIST images) at
# ranks 1, 2, 4, ..., 1024; the spectrum in between is interpolated log-log.
REAL_SPECTRUM = {1: 6.81e-2, 2: 3.88e-2, 4: 2.30e-2, 8: 9.91e-3, 16: 5.37e-3, 32: 2.44e-3, 64: 1.06e-3,
                 128: 4.56e-4, 256: 1.86e-4, 512: 6.09e-5, 1024: 5.23e-6, 1280: 1.0e-6}
MEAN_NORM = 0.71
# Two levels of clusters (classes, then sub-clusters) and the share of the variance at each level;
# chosen so that 2,500 draws have the real sample's neighbour statistics (mean cosine to the 1st,
# 10th and 100th neighbour and of random pairs; printed by --calibrate).
CLASSES, SUBCLUSTERS, SHARES = 16, 256, (0.45, 0.35, 0.20)


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def mapped_rss(substr: str) -> float:
    """Resident MiB of this process's mappings of files whose path contains ``substr``."""
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
                current = len(parts) >= 6 and substr in parts[-1]
            elif current and parts[0] == "Rss:":
                total += int(parts[1])
    return total / 1024


class Mixture:
    """Draws vectors with the fitted spectrum (rank-256 structure + isotropic tail), in chunks."""

    def __init__(self, d: int = D, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.rng = rng
        basis, _ = np.linalg.qr(rng.standard_normal((d, d)).astype(np.float32))
        ranks = np.array(sorted(REAL_SPECTRUM), dtype=np.float64)
        eig = np.exp(np.interp(np.log(np.arange(1, d + 1)), np.log(ranks), np.log([REAL_SPECTRUM[int(r)] for r in ranks])))
        self.r = 256
        self.proj = (basis[:, : self.r] * np.sqrt(eig[: self.r])[None, :]).T.astype(np.float32)   # (r, d)
        self.tail = float(np.sqrt(eig[self.r:].sum() / d))
        mean = np.abs(rng.standard_normal(d)).astype(np.float32)
        self.mean = mean / np.linalg.norm(mean) * MEAN_NORM
        a, b, c = SHARES
        classes = np.sqrt(a) * (rng.standard_normal((CLASSES, self.r)).astype(np.float32) @ self.proj)
        subs = np.sqrt(b) * (rng.standard_normal((CLASSES * SUBCLUSTERS, self.r)).astype(np.float32) @ self.proj)
        self.centers = self.mean + np.repeat(classes, SUBCLUSTERS, axis=0) + subs
        self.within = float(np.sqrt(c))

    def draw(self, n: int) -> np.ndarray:
        c = self.rng.integers(0, len(self.centers), n)
        x = self.centers[c] + self.within * (self.rng.standard_normal((n, self.r)).astype(np.float32) @ self.proj)
        x += self.within * self.tail * self.rng.standard_normal(x.shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def write_segment(folder: str, mix: Mixture, n: int, flat, chunk: int = 50_000) -> None:
    """seqs/ids/float16 vectors of n vectors into ``folder``; the float32 ones into ``flat``."""
    seqs = np.arange(n, dtype=np.int64)
    np.save(os.path.join(folder, "seqs.npy"), seqs)
    ids = np.frombuffer(b"".join(hashlib.sha256(b"img-%d" % i).digest() for i in range(n)), np.uint8).reshape(n, 32)
    np.save(os.path.join(folder, "ids.npy"), ids)
    vectors = np.lib.format.open_memmap(os.path.join(folder, "vectors.npy"), mode="w+", dtype=np.float16, shape=(n, D))
    for lo in range(0, n, chunk):
        x = mix.draw(min(chunk, n - lo))
        vectors[lo:lo + len(x)] = x.astype(np.float16)
        if flat is not None:
            flat.add(x)
    vectors.flush()
    del vectors


def delta_read_rate(n: int, tmp: str) -> dict:
    """Seconds per million rows of the read stage (features + images from Delta -> build folder)."""
    import datetime as dt

    from jobs.index.driver import run_index
    from jobs.runner import LocalRunner
    from lake.catalog import Lake
    from lake.commit import commit_rows, ensure_tables
    from lake.settings import Settings

    lake = Lake.at(os.path.join(tmp, "delta-lake"))
    ensure_tables(lake)
    mix = Mixture(seed=5)
    now = dt.datetime.now(dt.timezone.utc)
    for lo in range(0, n, 25_000):
        m = min(25_000, n - lo)
        ids = [hashlib.sha256(b"d-%d" % i).hexdigest() for i in range(lo, lo + m)]
        commit_rows(lake, "images", [dict(image_id=i, seq=lo + j, uri=f"/x/{lo + j}", ingested_at=now)
                                     for j, i in enumerate(ids)], run_id=f"img-{lo}")
        import pyarrow as pa
        x = mix.draw(m) * 16.5
        emb = pa.ListArray.from_arrays(pa.array(np.arange(0, (m + 1) * D, D, dtype=np.int32)), pa.array(x.reshape(-1)))
        from lake.catalog import TABLES
        given = {"image_id": pa.array(ids), "model": pa.array(["bench@1"] * m), "embedding": emb}
        schema = TABLES["features"].schema
        table = pa.table({f.name: given.get(f.name, pa.nulls(m, f.type)) for f in schema}).cast(schema)
        commit_rows(lake, "features", table, run_id=f"feat-{lo}")
    summary = run_index(lake, Settings(lake=lake.root, runner="local"), runner=LocalRunner())
    shutil.rmtree(lake.root, ignore_errors=True)
    return {"n": n, "read_s": summary["read_s"], "train_s": summary["train_s"], "encode_s": summary["encode_s"],
            "read_s_per_million": summary["read_s"] * 1e6 / n, "factory": summary["factory"]}


_LOAD = r"""
import json, random, sys, threading, time, requests
base, token, seconds, clients, ids = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split(",")
lat, errors = [], []
stop = time.perf_counter() + seconds
def worker(seed):
    rnd = random.Random(seed); s = requests.Session(); s.headers["Authorization"] = "Bearer " + token
    while time.perf_counter() < stop:
        t = time.perf_counter()
        r = s.get(base + "/api/v1/search/similar", params={"image_id": rnd.choice(ids), "k": 10}, timeout=30)
        if r.status_code == 200:
            lat.append((time.perf_counter() - t) * 1000)
        else:
            errors.append(r.status_code)
threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
t0 = time.perf_counter(); [t.start() for t in threads]; [t.join() for t in threads]
print(json.dumps({"n": len(lat), "errors": len(errors), "codes": sorted(set(errors)), "seconds": time.perf_counter() - t0, "lat": lat}))
"""


def api_bench(lake_root: str, ids: list[str], seconds: float, clients: int) -> dict:
    from lake.catalog import Lake
    from lake.tokens import create_token

    token = create_token(Lake.at(lake_root), "read", "bench")[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), IMAGELAKE_LOG_LEVEL="WARNING")
    server = subprocess.Popen([sys.executable, "-m", "imagelake", "--lake", lake_root, "serve", "--port", str(port),
                               "--workers", "2"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        import requests

        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {token}"
        deadline = time.monotonic() + 600
        warm = 0
        while time.monotonic() < deadline and warm < 20:      # both workers verify + load the build
            try:
                r = http.get(f"{base}/api/v1/search/similar", params={"image_id": ids[warm], "k": 10}, timeout=300)
                warm += r.status_code == 200
                if r.status_code not in (200,):
                    time.sleep(0.5)
            except requests.ConnectionError:
                time.sleep(0.2)
        out = subprocess.run([sys.executable, "-c", _LOAD, base, token, str(seconds), str(clients), ",".join(ids[:2000])],
                             capture_output=True, text=True, timeout=seconds + 120)
        result = json.loads(out.stdout)
    finally:
        server.terminate()
        server.wait(timeout=30)
    p50, p99 = percentiles(result["lat"]) if result["lat"] else (float("nan"), float("nan"))
    return {"req_s": result["n"] / result["seconds"], "p50_ms": p50, "p99_ms": p99, "errors": result["errors"],
            "requests": result["n"], "clients": clients, "error_codes": result["codes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--shard-size", type=int, default=250_000)
    ap.add_argument("--delta-n", type=int, default=50_000, help="rows for the Delta read-stage measurement (0: skip)")
    ap.add_argument("--api-seconds", type=float, default=15.0, help="0 skips the API part")
    ap.add_argument("--api-clients", type=int, default=8)
    ap.add_argument("--dir", help="work folder (default: a temp folder, removed at the end)")
    args = ap.parse_args()

    import faiss

    from api.index_service import SearchService
    from jobs.index.build import build_dir, write_manifest
    from jobs.index.driver import _encode, _manifest_common, _publish, _train
    from jobs.index.plan import choose_plan
    from jobs.runner import LocalRunner
    from lake.catalog import Lake
    from lake.commit import ensure_tables
    from lake.settings import Settings

    print(machine())
    print(f"load average at start: {os.getloadavg()}")
    print(f"vectors: synthetic mixture with the spectrum of real lite0 features, n={args.n:,}, d={D}, "
          f"{args.queries} held-out queries")
    work = args.dir or tempfile.mkdtemp(prefix="bench-index-")
    try:
        lake = Lake.at(os.path.join(work, "lake"))
        ensure_tables(lake)
        settings = Settings(lake=lake.root, runner="local", refresh_s=3600)
        build_id = "bench-" + time.strftime("%Y%m%dT%H%M%S")
        folder = build_dir(lake, build_id)
        os.makedirs(folder)
        mix = Mixture()
        flat = faiss.IndexFlatIP(D)
        t = time.perf_counter()
        write_segment(folder, mix, args.n, flat)
        gen_s = time.perf_counter() - t
        queries = mix.draw(args.queries)
        print(f"generated in {gen_s:.0f} s (baseline IndexFlatIP.add included); rss {rss_mb():.0f} MiB")

        # -- build ------------------------------------------------------------------------------
        plan = choose_plan(args.n, D, settings.index_memory_mb * 2**20)
        t0 = time.perf_counter()
        trained, residual = _train(folder, plan, os.cpu_count() or 2)
        t1 = time.perf_counter()
        shards = _encode(LocalRunner(), folder, trained, args.n, args.shard_size)
        t2 = time.perf_counter()
        files = {n: {} for n in ("seqs.npy", "ids.npy", "vectors.npy", "trained.faiss")}
        files.update({s["file"]: {} for s in shards})
        manifest = write_manifest(folder, dict(_manifest_common("bench@1", D, 0, build_id), kind="full",
                                               base_build_id=None, factory=plan.factory, plan=plan.to_dict(),
                                               ntotal=args.n, files=files, drift={"coarse_residual": residual},
                                               shards=[{k: s[k] for k in ("file", "ntotal", "seq_min", "seq_max")} for s in shards]))
        _publish(lake, build_id, manifest, "full", None, args.n, [manifest])
        t3 = time.perf_counter()
        build_s = t3 - t0
        print(f"build {plan.factory}: train {t1 - t0:.0f} s, encode {len(shards)} shards {t2 - t1:.0f} s, "
              f"manifest + publish {t3 - t2:.0f} s; total {build_s:.0f} s")
        shard_bytes = sum(os.path.getsize(os.path.join(folder, s["file"])) for s in shards)

        # -- exact baseline -----------------------------------------------------------------------
        faiss.omp_set_num_threads(os.cpu_count() or 2)
        t = time.perf_counter()
        _, exact = flat.search(queries, 10)
        flat_batch_qps = len(queries) / (time.perf_counter() - t)
        flat_ms = []
        for q in queries[:20]:
            t = time.perf_counter()
            flat.search(q[None], 10)
            flat_ms.append((time.perf_counter() - t) * 1000)
        flat_p50, flat_p99 = percentiles(flat_ms)
        del flat

        # -- ours ---------------------------------------------------------------------------------
        service = SearchService(settings)
        t = time.perf_counter()
        service.refresh(force=True)
        load_s = time.perf_counter() - t
        ms, recalls = [], []
        for q, truth in zip(queries, exact):
            t = time.perf_counter()
            hits = service.similar_to_vector(q, 10)
            ms.append((time.perf_counter() - t) * 1000)
            recalls.append(len({h.seq for h in hits} & set(truth.tolist())) / 10)
        p50, p99 = percentiles(ms)
        t = time.perf_counter()
        batched = service.similar_to_vectors(queries, 10)
        batch_qps = len(queries) / (time.perf_counter() - t)
        batch_recall = np.mean([len({h.seq for h in hits} & set(truth.tolist())) / 10 for hits, truth in zip(batched, exact)])
        resident_shards = mapped_rss("/shard-")
        resident_f16 = mapped_rss("vectors.npy")
        recall = float(np.mean(recalls))

        delta = delta_read_rate(args.delta_n, work) if args.delta_n else None
        api = None
        if args.api_seconds > 0:
            ids = [hashlib.sha256(b"img-%d" % i).hexdigest() for i in
                   np.random.default_rng(3).choice(args.n, 2000, replace=False)]
            api = api_bench(lake.root, ids, args.api_seconds, args.api_clients)

        print("\n| what | ours (IVF-PQ + exact re-rank) | exact IndexFlatIP | target |\n|---|---|---|---|")
        print(f"| build | {build_s:.0f} s (train {t1 - t0:.0f} + encode {t2 - t1:.0f} + publish {t3 - t2:.0f}) | "
              f"add only (in generation) | <= 600 s |")
        print(f"| bytes/vector, PQ codes + ids | {plan.bytes_per_vector} (files {shard_bytes / args.n:.0f}; resident after "
              f"queries {resident_shards * 2**20 / args.n:.1f}) | {4 * D} | <= 100 |")
        print(f"| float16 re-rank copy | {2 * D} B/vector on disk, memory-mapped ({resident_f16:.0f} MiB resident after queries) | - | |")
        print(f"| recall@10 vs exact | {recall:.4f} (batched {batch_recall:.4f}) | 1 | >= 0.98 |")
        print(f"| single query p50 / p99 | {p50:.2f} / {p99:.2f} ms | {flat_p50:.1f} / {flat_p99:.1f} ms | p50 <= 3 ms |")
        print(f"| speed-up, single-query p50 | {flat_p50 / p50:.0f}x | 1x | >= 50x |")
        print(f"| batched QPS ({len(queries)} queries) | {batch_qps:.0f} | {flat_batch_qps:.0f} | |")
        print(f"| service load (verify sha256 + mmap) | {load_s:.1f} s | - | |")
        if delta:
            print(f"| read stage (Delta features -> build folder) | {delta['read_s_per_million']:.0f} s per million rows "
                  f"(measured at {delta['n']:,}: {delta['read_s']:.1f} s) | - | |")
        if api:
            print(f"| API GET /search/similar, {api['clients']} clients, loopback | {api['req_s']:.0f} req/s, p50 "
                  f"{api['p50_ms']:.1f} ms, p99 {api['p99_ms']:.1f} ms ({api['requests']} requests, {api['errors']} errors {api['error_codes']}) "
                  f"| - | >= 300 req/s, p99 <= 50 ms |")
        print(f"\nplan: {json.dumps(plan.to_dict())}; nprobe {service.build().nprobe}, candidates "
              f"{max(settings.search_candidates, 100)}; faiss {faiss.__version__}")
        print(f"load average at end: {os.getloadavg()}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
