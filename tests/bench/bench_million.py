"""The whole system at n images, end to end, through the real commands and the real HTTP API.

    python tests/bench/bench_million.py [--n 20000] [--workers 2] [--runner local|spark] [--keep DIR]

1. writes ``n`` small distinct JPEGs (96×72, a few KB each) into a folder (100 subfolders);
2. ``imagelake ingest`` over it;
3. ``imagelake embed --import`` of synthetic 1280-d embeddings with the real features' spectrum
   (``bench_index.Mixture``: the eigenvalues and cluster structure of unit-length EfficientNet-Lite0
   features), keyed by URI, with top-50 concept probabilities; 2 % of the JPEGs are re-encoded or
   cropped copies of the one before, and their embeddings near-copies of its, so the cluster step
   finds near-duplicate groups;
4. ``imagelake index``, ``cluster``, ``tag``, ``grid`` and the pipeline's ``suggest`` step on them;
5. a second round with 1 % new images through the same steps (the incremental cost, step by step),
   its ``grid`` (new images placed into the layout's free cells) followed by ``grid --full`` on the
   same lake: the baseline, what every grid run cost before;
6. ``imagelake serve`` (``--workers`` gunicorn workers) and the user's view over loopback HTTP:
   the curation view (a bucket's 28 suggestions plus their 28 thumbnails, sequentially on one
   connection: an upper bound of what a browser fetches in parallel), a browse page
   (``GET /images?limit=60``), the facets, the image drawer (``GET /images/<id>``), similar-by-id
   p50, a suggestion round (an accept, then the next suggestions), cached map tile p99, and
   ``POST /images`` of 5 new photos, each with its vector in the form field ``embedding`` (the
   lake's embeddings are imported: no model in the server computes them), each then searched by
   id; every worker's RSS afterwards.

Each step runs in its own process: its wall time and peak RSS (VmHWM, polled) are printed, with lake
bytes per image and each target of issue 20 (scaled to 1M where it is a time) met or not. Baseline
side by side: ``GET /health`` on the same server (the floor of any route).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]

from bench_index import Mixture  # noqa: E402
from common import machine  # noqa: E402
from loadgen import start_server  # noqa: E402

MODEL = "bench-synthetic@1"
D = 1280

# issue 20's targets at 1M on 2 cores / 24 GiB: a rate, a time at 1M (scaled linearly here), or a latency
RATE_TARGETS = {"ingest": 400.0, "import": 20_000.0}             # items/s
TIME_TARGETS_1M = {"index": 600.0, "cluster": 900.0, "grid": 300.0}  # seconds at 1M
LATENCY_TARGETS = {"curation view": 1000.0, "browse page": 300.0, "facets": 300.0, "image drawer": 300.0,
                   "similar by id p50": 10.0, "suggestion round": 50.0, "cached tile p99": 30.0,
                   "POST /images": 2000.0}
WORKER_RSS_MB = 2048.0


#: Every image whose index is 49 modulo this is a near-duplicate JPEG of the one before (2 %):
#: re-encoded at quality 60, or (odd multiples) cropped by 3 px a side and resized back.
DUP_EVERY = 50


def is_planted_copy(i: int) -> bool:
    return i % DUP_EVERY == DUP_EVERY - 1


def write_images(folder: Path, n: int, start: int = 0, seed: int = 0) -> list[Path]:
    """``n`` JPEGs: a random 6×8 colour field upsampled to 96×72 plus a seed stripe; 2 % of them
    (:func:`is_planted_copy`) real near-duplicates of the image before, so the cluster step's
    groups are exercised (their embeddings are near-copies too: :func:`write_embeddings`)."""
    from PIL import Image

    rng = np.random.default_rng(seed + start)
    paths = []
    previous = None
    for i in range(start, start + n):
        sub = folder / f"d{i % 100:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        p = sub / f"img_{i:08d}.jpg"
        im = Image.fromarray(small).resize((96, 72), Image.Resampling.BILINEAR)
        px = np.asarray(im).copy()
        px[0, :32] = np.unpackbits(np.array([i >> 24, i >> 16, i >> 8, i], np.uint32).astype(np.uint8))[:, None] * 255
        copy_of, previous = previous, px
        if p.exists():   # a --keep folder of an earlier run: the same bytes (drawn from the same seed)
            paths.append(p)
            continue
        quality = 85
        if is_planted_copy(i) and copy_of is not None:
            if (i // DUP_EVERY) % 2:
                px = np.asarray(Image.fromarray(copy_of[3:-3, 3:-3]).resize((96, 72), Image.Resampling.BILINEAR))
            else:
                px, quality = copy_of, 60
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, "JPEG", quality=quality)
        tmp = p.with_suffix(".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.rename(p)
        paths.append(p)
    return paths


def _image_index(uri: str) -> int:
    return int(uri.rsplit("img_", 1)[1].split(".", 1)[0])


def write_embeddings(path: Path, uris: list[str], seed: int, chunk: int = 20_000) -> None:
    """Parquet keyed by uri: ``embedding`` from the real spectrum (one mixture for every round, fresh
    draws per ``seed``: before, each round had its own cluster centres and the +1 % round's drift
    forced a full index rebuild), the planted JPEG copies' (:func:`is_planted_copy`) near-copies of
    their original's,
    ``concept_probs`` a softmax over 1,000 classes of a fixed random projection (so tags vary)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    mix = _mixture()                    # one collection: the +1 % round draws new images of the same kinds
    mix.rng = np.random.default_rng(seed)
    rng = np.random.default_rng(seed + 7)
    proj = np.random.default_rng(7).standard_normal((D, 1000)).astype(np.float32) * 4  # the same concepts
    schema = pa.schema([("uri", pa.string()), ("embedding", pa.list_(pa.float32(), D)),
                        ("concept_probs", pa.list_(pa.float32(), 1000))])
    uris = sorted(uris, key=_image_index)   # a planted copy's row right after its original's
    last = None
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for s in range(0, len(uris), chunk):
            x = mix.draw(min(chunk, len(uris) - s))
            index = np.array([_image_index(u) for u in uris[s:s + len(x)]])
            prev = np.concatenate([[-1 if last is None else last[0]], index[:-1]])
            dup = np.flatnonzero(np.array([is_planted_copy(int(i)) for i in index]) & (prev == index - 1))
            before = np.vstack([last[1][None] if last is not None else x[:1], x])[dup]   # row dup - 1
            v = before + 0.01 * rng.standard_normal((len(dup), D)).astype(np.float32)
            x[dup] = v / np.linalg.norm(v, axis=1, keepdims=True)
            last = (int(index[-1]), x[-1].copy())
            logits = x @ proj
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            t = pa.table({"uri": uris[s:s + len(x)],
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), D),
                          "concept_probs": pa.FixedSizeListArray.from_arrays(pa.array(p.astype(np.float32).reshape(-1)), 1000)},
                         schema=schema)
            w.write_table(t)


_MIXTURE: list = []


def _mixture() -> Mixture:
    """The one embedding mixture (built once: its 1280 x 1280 QR costs seconds on a loaded machine)."""
    if not _MIXTURE:
        _MIXTURE.append(Mixture(d=D, seed=0))
    return _MIXTURE[0]


def step(name: str, *args: str, lake: Path, runner: str) -> dict:
    """One ``imagelake`` command in its own process: wall time, peak RSS (wait4), its last line."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "imagelake", "--lake", str(lake), "--runner", runner, *args],
                            cwd=REPO, env=env, stdout=out, stderr=err)
    # peak RSS: VmHWM of the process (and of any children it starts), polled; wait4's ru_maxrss would
    # start from this (large) parent's RSS at fork
    peak = 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, _hwm_mb(proc.pid))
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0), err.seek(0)
    text, errs = out.read().decode(errors="replace").strip(), err.read().decode(errors="replace").strip()
    line = text.splitlines()[0] if text else ""
    if proc.returncode != 0:   # recorded, and the run goes on: one broken step should not hide the others
        print(f"imagelake {' '.join(args)} FAILED ({proc.returncode}): {errs[-3000:]}", flush=True)
        line = f"FAILED ({proc.returncode}): {errs.strip().splitlines()[-1][:300] if errs.strip() else ''}"
    return dict(step=name, seconds=seconds, rss_mb=peak, line=line, out=text,
                cpu_s=usage.ru_utime + usage.ru_stime, load=os.getloadavg()[0])


def _hwm_mb(pid: int) -> float:
    """VmHWM of ``pid`` plus the VmRSS of its children (a Spark JVM, pool workers), in MB."""
    total = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    except OSError:
        pass
    return total


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Client:
    def __init__(self, port: int, token: str):
        self.port, self.token = port, token
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None) -> tuple[int, bytes, float]:
        h = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        data = raw
        if body is not None:
            data, h["Content-Type"] = json.dumps(body).encode(), "application/json"
        t0 = time.perf_counter()
        try:
            self.conn.request(method, path, body=data, headers=h)
            resp = self.conn.getresponse()
            payload = resp.read()
        except (http.client.HTTPException, OSError):
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            self.conn.request(method, path, body=data, headers=h)
            resp = self.conn.getresponse()
            payload = resp.read()
        return resp.status, payload, (time.perf_counter() - t0) * 1000

    def json(self, method: str, path: str, body=None) -> dict:
        status, payload, _ = self.call(method, path, body)
        if not 200 <= status < 300:
            raise RuntimeError(f"{method} {path}: {status} {payload[:300]!r}")
        return json.loads(payload)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def worker_rss(server_pid: int) -> list[float]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            status = (p / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("PPid", "").strip() == str(server_pid):
            out.append(int(fields.get("VmRSS", "0 kB").split()[0]) / 1024)
    return out


def server_cpu_s(server_pid: int) -> float:
    """CPU seconds (user + system) of the server process and its workers so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in [Path(f"/proc/{server_pid}")] + [q for q in Path("/proc").iterdir() if q.name.isdigit()]:
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if p.name == str(server_pid) or fields[1] == str(server_pid):
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def measure_view(port: int, token: str, ids: list[str], repeat: int, server_pid: int = 0) -> tuple[dict, dict]:
    c = Client(port, token)
    rng = random.Random(5)
    lat: dict[str, float] = {}
    extra: dict[str, object] = {}
    health = [c.call("GET", "/api/v1/health")[2] for _ in range(30)]
    lat["health (baseline) p50"] = statistics.median(health)
    # warm each worker a little (first requests map the index, the matrix, the thumbnail index)
    for _ in range(6):
        c.call("GET", f"/api/v1/search/similar?image_id={rng.choice(ids)}&k=20")
        c.call("GET", "/api/v1/images?limit=60")
    # curation view: a new bucket each repetition, 8 members; its 28 suggestions and their thumbnails
    views, rounds, rounds_server = [], [], []
    for r in range(repeat):
        b = c.json("POST", "/api/v1/buckets", {"name": f"bench {r} {time.time_ns()}"})["bucket"]["bucket_id"]
        c.json("POST", f"/api/v1/buckets/{b}/images", {"image_ids": rng.sample(ids, 8)})
        t0 = time.perf_counter()
        sug = c.json("GET", f"/api/v1/buckets/{b}/suggestions?n=28")
        for s in sug["suggestions"]:
            c.call("GET", s.get("thumbnail_url") and "/" + s["thumbnail_url"].lstrip("/")
                   if str(s.get("thumbnail_url", "")).startswith("/api") else f"/api/v1/images/{s['image_id']}/thumbnail?size=64")
        views.append((time.perf_counter() - t0) * 1000)
        # a suggestion round: accept the first suggestion, then ask for the next ones
        t0 = time.perf_counter()
        c.json("POST", f"/api/v1/buckets/{b}/images", {"image_ids": [sug["suggestions"][0]["image_id"]]})
        nxt = c.json("GET", f"/api/v1/buckets/{b}/suggestions?n=28")
        rounds.append((time.perf_counter() - t0) * 1000)
        if "ms" in nxt:
            rounds_server.append(float(nxt["ms"]))
    lat["curation view"] = statistics.median(views)
    lat["suggestion round"] = statistics.median(rounds)
    if rounds_server:
        extra["suggestion server ms p50"] = statistics.median(rounds_server)
    # browse pages at random offsets, facets, the drawer
    n = len(ids)
    lat["browse page"] = statistics.median(
        c.call("GET", f"/api/v1/images?limit=60&offset={rng.randrange(0, max(1, n - 60))}")[2] for _ in range(repeat * 2))
    status, _, _ = c.call("GET", "/api/v1/facets?column=collection")
    lat["facets"] = statistics.median(c.call("GET", "/api/v1/facets?column=collection")[2] for _ in range(repeat)) if status == 200 else float("nan")
    lat["image drawer"] = statistics.median(c.call("GET", f"/api/v1/images/{rng.choice(ids)}")[2] for _ in range(repeat * 2))
    sims = [c.call("GET", f"/api/v1/search/similar?image_id={rng.choice(ids)}&k=20")[2] for _ in range(60)]
    lat["similar by id p50"] = statistics.median(sims)
    extra["similar by id p99"] = pct(sims, 0.99)
    # map tiles: fetch 40 distinct tiles once (render + cache), then again: the cached p99
    layouts = c.json("GET", "/api/v1/grid")["layouts"]
    if layouts:
        meta = c.json("GET", f"/api/v1/grid/{layouts[0]['layout_id']}")["dzi"]
        tiles, z = [], meta["max_level"]
        while len(tiles) < 40 and z >= 0:
            size = max(1, -(-meta["width"] // (meta["tile_size"] << (meta["max_level"] - z))))
            rows = max(1, -(-meta["height"] // (meta["tile_size"] << (meta["max_level"] - z))))
            tiles += [(z, x, y) for x in range(min(size, 7)) for y in range(min(rows, 7))]
            z -= 1
        tiles = tiles[:40]
        url = "/api/v1/" + meta["tiles"]
        first = [c.call("GET", url.format(z=t[0], x=t[1], y=t[2]))[2] for t in tiles]
        again = [c.call("GET", url.format(z=t[0], x=t[1], y=t[2]))[2] for t in tiles * 2]
        lat["cached tile p99"] = pct(again, 0.99)
        extra["first tile p50"] = statistics.median(first)
    # POST /images: new photos with their vectors (the lake's embeddings are imported, so the client
    # sends each upload's vector as the form field `embedding`), then similar-by-id of each at once
    from PIL import Image

    mix = _mixture()
    mix.rng = np.random.default_rng(99)
    posts, searchable, answer, upload_cpu = [], 0, "", []
    for u, vec in enumerate(mix.draw(5)):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(99 + u).integers(0, 256, (72, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
        boundary = "benchboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"embedding\"\r\n\r\n"
                f"{json.dumps(vec.tolist())}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"new{u}.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + buf.getvalue() + f"\r\n--{boundary}--\r\n".encode()
        cpu0 = server_cpu_s(server_pid) if server_pid else 0.0
        status, payload, ms = c.call("POST", "/api/v1/images", raw=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if server_pid:
            upload_cpu.append((server_cpu_s(server_pid) - cpu0) * 1000)
        answer = f"{status} in {ms:.0f} ms: {payload[:240].decode(errors='replace')}"
        if not 200 <= status < 300:
            break
        posts.append(ms)
        new_id = json.loads(payload)["image_id"]
        extra["POST /images server seconds (last)"] = json.dumps(json.loads(payload).get("seconds"))
        st, found, _ = c.call("GET", f"/api/v1/search/similar?image_id={new_id}&k=5")
        searchable += st == 200 and bool(json.loads(found).get("results"))
    # an error answer is no figure
    lat["POST /images"] = statistics.median(posts) if posts else float("nan")
    extra["POST /images answer (last)"] = answer
    if upload_cpu:   # load-proof: the server's CPU per upload (all its processes, the request's share of idle threads too)
        extra["POST /images server CPU ms p50"] = statistics.median(upload_cpu)
    extra["POST /images searchable by id right after"] = f"{searchable} of {len(posts)}"
    return lat, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runner", choices=["local", "spark"], default="local")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--keep", help="build in this folder and keep it (default: a temporary folder)")
    args = ap.parse_args()

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="imagelake-million-"))
    tmp.mkdir(parents=True, exist_ok=True)
    images, lake = tmp / "images", tmp / "lake"
    results: list[dict] = []
    try:
        t_bench = time.perf_counter()
        print(machine())
        print(f"n = {args.n:,} images, runner {args.runner}, load average {os.getloadavg()[0]:.2f}", flush=True)
        t0 = time.perf_counter()
        write_images(images, args.n)
        print(f"wrote {args.n:,} JPEGs ({du(images) / args.n / 1024:.1f} KiB each) in {time.perf_counter() - t0:.1f} s",
              flush=True)

        def rounds(label: str, src: Path, emb: Path) -> list[dict]:
            class Run(list):
                def append(self, r: dict) -> None:   # printed as each step ends: a long run shows its progress
                    r["round"] = label
                    print(f"[{label}] {r['step']:8s} {r['seconds']:8.1f} s  {r['cpu_s']:7.1f} CPU-s  load {r['load']:5.1f}  "
                          f"peak RSS {r['rss_mb']:7.0f} MB  {r['line'][:400]}", flush=True)
                    super().append(r)

            run = Run()
            run.append(step("ingest", "ingest", "--images", str(src), "--collection", "bench", "--no-progress",
                            lake=lake, runner=args.runner))
            from deltalake import DeltaTable

            from lake.catalog import Lake
            L = Lake.at(lake)
            src_rows = DeltaTable(L.table_uri("sources")).to_pyarrow_table(columns=["uri"]).column("uri").to_pylist()
            mine = sorted(u for u in src_rows if u.startswith(str(src)) or f"/{src.name}/" in u)
            t = time.perf_counter()
            write_embeddings(emb, mine, seed=len(mine))
            print(f"[{label}] wrote {len(mine):,} embeddings to {emb.name} ({emb.stat().st_size / 2**20:.0f} MiB) "
                  f"in {time.perf_counter() - t:.1f} s", flush=True)
            run.append(step("import", "embed", "--import", str(emb), "--model", MODEL, lake=lake, runner=args.runner))
            run.append(step("suggest", "run", "--steps", "suggest", "--model", MODEL, "--no-progress", lake=lake,
                            runner=args.runner))
            run.append(step("index", "index", "--model", MODEL, "--no-progress", lake=lake, runner=args.runner))
            run.append(step("cluster", "cluster", "--model", MODEL, "--no-progress", lake=lake, runner=args.runner))
            run.append(step("tag", "tag", "--model", MODEL, lake=lake, runner=args.runner))
            run.append(step("grid", "grid", "--model", MODEL, lake=lake, runner=args.runner))
            if label != "full":   # baseline in the same run: what every grid run cost before (all laid out anew)
                run.append(step("grid --full", "grid", "--model", MODEL, "--full", lake=lake, runner=args.runner))
            return list(run)

        full = rounds("full", images, tmp / "emb-full.parquet")
        results += full
        lake_bytes = du(lake)
        inc_images = tmp / "images-new"
        n_new = max(1, args.n // 100)
        write_images(inc_images, n_new, start=args.n, seed=1)
        inc = rounds("+1 %", inc_images, tmp / "emb-new.parquet")
        results += inc

        token = subprocess.run([sys.executable, "-m", "imagelake", "--lake", str(lake), "token", "create", "--scope",
                                "admin", "--name", "bench"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                               capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        from deltalake import DeltaTable

        from lake.catalog import Lake
        ids = DeltaTable(Lake.at(lake).table_uri("images")).to_pyarrow_table(columns=["image_id"]).column("image_id").to_pylist()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = tmp / "server.log"
        t0 = time.perf_counter()
        server = start_server(str(lake), port, args.workers, str(log), threads=4)
        start_s = time.perf_counter() - t0
        try:
            lat, extra = measure_view(port, token, ids, args.repeat, server.pid)
            rss = worker_rss(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)

        print(f"\n## bench_million at n = {args.n:,} (+1 % = {n_new:,}), {args.workers} API workers, runner {args.runner}")
        print(f"lake bytes per image: {lake_bytes / args.n:,.0f} B (after the full round; originals not counted)")
        print("\n| step | full s | CPU-s | load | peak RSS MB | rate | at 1M (linear) | target | met | +1 % s | +1 % / full |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        by_inc = {r["step"]: r for r in inc}
        for r in full:
            name, s = r["step"], r["seconds"]
            rate = args.n / s if s else 0
            at_1m = s * 1_000_000 / args.n
            if name in RATE_TARGETS:
                target, met = f">= {RATE_TARGETS[name]:,.0f}/s", rate >= RATE_TARGETS[name]
            elif name in TIME_TARGETS_1M:
                target, met = f"<= {TIME_TARGETS_1M[name]:.0f} s at 1M", at_1m <= TIME_TARGETS_1M[name]
            else:
                target, met = "-", None
            i = by_inc.get(name, {}).get("seconds", float("nan"))
            print(f"| {name} | {s:.1f} | {r['cpu_s']:.1f} | {r['load']:.1f} | {r['rss_mb']:.0f} | {rate:,.0f}/s | "
                  f"{at_1m / 60:.1f} min | {target} | {'-' if met is None else ('yes' if met else 'NO')} | {i:.1f} | "
                  f"{i / s:.0%} (target <= 10 %) |")
        if "grid --full" in by_inc:
            b, g = by_inc["grid --full"], by_inc["grid"]
            print(f"| grid, +1 % round: baseline `grid --full` (every image laid out anew, as before) | "
                  f"{b['seconds']:.1f} | {b['cpu_s']:.1f} | {b['load']:.1f} | {b['rss_mb']:.0f} | | | | | "
                  f"incremental {g['seconds']:.1f} s / {g['cpu_s']:.1f} CPU-s | {g['seconds'] / b['seconds']:.0%} of it |")
        print(f"\nserver start (gunicorn, {args.workers} workers) to /health: {start_s:.1f} s")
        print("\n| view | ms | target ms | met |")
        print("|---|---|---|---|")
        for k, v in lat.items():
            t = LATENCY_TARGETS.get(k)
            verdict = "-" if t is None else ("not measured" if v != v else ("yes" if v <= t else "NO"))
            print(f"| {k} | {v:.1f} | {'-' if t is None else f'{t:.0f}'} | {verdict} |")
        for k, v in extra.items():
            print(f"{k}: {v if isinstance(v, str) else f'{v:.1f}'}")
        print(f"API worker RSS after the view: {', '.join(f'{x:.0f} MB' for x in rss)} (target <= {WORKER_RSS_MB:.0f} MB"
              f" each: {'yes' if rss and max(rss) <= WORKER_RSS_MB else 'NO'})")
        print(f"load average at the end: {os.getloadavg()[0]:.2f}; the whole bench: "
              f"{(time.perf_counter() - t_bench) / 60:.1f} min wall, {sum(os.times()[2:4]):.0f} CPU-s in its child "
              f"processes (steps and server), {sum(os.times()[:2]):.0f} CPU-s in this one (images, embeddings, client)")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
