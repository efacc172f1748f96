"""A small closed-loop HTTP load generator and the request mix it sends to ``imagelake serve``.

The mix is a list of :class:`Op`: a name, a weight, a function that builds one request from the
shared :class:`LoadContext` (a random generator, image ids and collections from the lake, the run's
scratch state) and, for writes, a ``verify`` run after the load with every acknowledged response,
which asserts the write is in the lake (e.g. in ``bucket_events``). Routes that land later plug in
by appending an ``Op`` to :data:`MIX` (or passing ``--ops`` to the benchmark); nothing else changes.

Each client is a thread with one keep-alive ``http.client`` connection: it sends a request, waits
for the answer, records its latency and status, and sends the next (a closed loop, like wrk's
connections). Any status >= 500, a connection error or an unexpected status counts as an error.
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

__all__ = ["Op", "Request", "LoadContext", "LoadReport", "MIX", "HEALTH_ONLY", "api_call", "prepare", "run_load",
           "start_server", "verify_in_table"]

REPO = Path(__file__).resolve().parents[2]


@dataclass
class LoadContext:
    image_ids: list[str]
    collections: list[str]
    extra: dict[str, Any] = field(default_factory=dict)  # per-run state for ops that need it (bucket ids, ...)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: Any = None  # a dict is sent as JSON


@dataclass(frozen=True)
class Op:
    name: str
    weight: float
    build: Callable[[random.Random, LoadContext], Request]
    ok: frozenset = frozenset({200})
    verify: Callable[[Any, LoadContext, list[Any]], None] | None = None  # (lake, ctx, acked JSON bodies)
    setup: Callable[[str, str, LoadContext], None] | None = None  # (base URL, token, ctx), once before the load


def _image(rng: random.Random, ctx: LoadContext) -> str:
    return rng.choice(ctx.image_ids)



def prepare(base: str, token: str, ops: list[Op], ctx: LoadContext) -> None:
    """Run each op's ``setup`` once (e.g. create the buckets curation writes go to, into ``ctx.extra``)."""
    for op in ops:
        if op.setup is not None:
            op.setup(base, token, ctx)


def api_call(base: str, token: str, method: str, path: str, body: Any = None) -> Any:
    """One JSON request outside the measured load (for ``setup`` hooks); raises on a non-2xx answer."""
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if not 200 <= resp.status < 300:
            raise RuntimeError(f"{method} {path} -> {resp.status} {data[:300]!r}")
        return json.loads(data) if data else None
    finally:
        conn.close()


def verify_in_table(table: str, column: str, field: str) -> Callable[[Any, LoadContext, list[Any]], None]:
    """A ``verify`` for writes: every acknowledged body's ``field`` is a ``column`` value in ``table``
    (e.g. ``verify_in_table("bucket_events", "event_id", "event.event_id")``; dots walk into objects)."""
    def verify(lake, ctx: LoadContext, acked: list[Any]) -> None:
        from deltalake import DeltaTable

        stored = set(DeltaTable(lake.table_uri(table)).to_pyarrow_table(columns=[column]).column(0).to_pylist())
        def value(body):
            for part in field.split("."):
                body = body.get(part) if isinstance(body, dict) else None
            return body
        missing = [value(body) for body in acked if value(body) not in stored]
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged writes are not in {table}: {missing[:5]}"
    return verify


def _make_bucket(base: str, token: str, ctx: LoadContext) -> None:
    """Two buckets with a few members each, so suggestions have a model to score with."""
    if "buckets" in ctx.extra:
        return
    ids = []
    for i, name in enumerate(("load a", "load b")):
        made = api_call(base, token, "POST", "/api/v1/buckets", {"name": name})
        bucket = made["bucket"]["bucket_id"]
        api_call(base, token, "POST", f"/api/v1/buckets/{bucket}/images",
                 {"image_ids": ctx.image_ids[i * 5:(i + 1) * 5]})
        ids.append(bucket)
    ctx.extra["buckets"] = ids


MIX: list[Op] = [
    Op("image metadata", 3, lambda r, c: Request("GET", f"/api/v1/images/{_image(r, c)}")),
    Op("thumbnail 64", 3, lambda r, c: Request("GET", f"/api/v1/images/{_image(r, c)}/thumbnail?size=64")),
    Op("thumbnail 256", 1, lambda r, c: Request("GET", f"/api/v1/images/{_image(r, c)}/thumbnail?size=256")),
    Op("browse page", 2, lambda r, c: Request(
        "GET", f"/api/v1/images?limit=60&offset={r.randrange(0, max(1, len(c.image_ids) - 60))}")),
    Op("sql group by", 1, lambda r, c: Request(
        "POST", "/api/v1/sql", {"sql": "SELECT collection, count(*) AS n FROM images GROUP BY 1 ORDER BY 1"})),
    Op("sql point", 1, lambda r, c: Request(
        "POST", "/api/v1/sql", {"sql": f"SELECT seq, uri, width, height FROM images WHERE image_id = '{_image(r, c)}'"})),
    Op("similar by id", 3, lambda r, c: Request("GET", f"/api/v1/search/similar?image_id={_image(r, c)}&k=20")),
    Op("suggestions", 2, lambda r, c: Request("GET", f"/api/v1/buckets/{r.choice(c.extra['buckets'])}/suggestions?n=28"),
       setup=_make_bucket),
    Op("add to bucket", 1, lambda r, c: Request("POST", f"/api/v1/buckets/{r.choice(c.extra['buckets'])}/images",
                                                {"image_ids": [_image(r, c)]}),
       setup=_make_bucket, verify=verify_in_table("bucket_events", "event_id", "event.event_id")),
]


#: The baseline: the cheapest authenticated-free route, i.e. gunicorn + Flask + loopback alone.
HEALTH_ONLY: list[Op] = [Op("health", 1, lambda r, c: Request("GET", "/api/v1/health"))]


@dataclass
class LoadReport:
    seconds: float
    clients: int
    latencies_ms: dict[str, list[float]]
    errors: dict[str, int]
    error_samples: list[str]
    acked: dict[str, list[Any]]

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies_ms.values()) + sum(self.errors.values())

    @property
    def error_rate(self) -> float:
        return sum(self.errors.values()) / max(1, self.requests)

    def percentile(self, q: float, op: str | None = None) -> float:
        values = self.latencies_ms[op] if op else [x for v in self.latencies_ms.values() for x in v]
        if not values:
            return float("nan")
        values = sorted(values)
        return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]

    def table(self) -> str:
        lines = [f"{'op':<18} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8}"]
        for op in sorted(set(self.latencies_ms) | set(self.errors)):
            n = len(self.latencies_ms.get(op, []))
            lines.append(f"{op:<18} {n:>8} {self.errors.get(op, 0):>6} "
                         f"{self.percentile(50, op) if n else float('nan'):>8.1f} "
                         f"{self.percentile(99, op) if n else float('nan'):>8.1f}")
        lines.append(f"{'all':<18} {self.requests:>8} {sum(self.errors.values()):>6} "
                     f"{self.percentile(50):>8.1f} {self.percentile(99):>8.1f}")
        lines.append(f"throughput {self.requests / self.seconds:.0f} req/s with {self.clients} clients over "
                     f"{self.seconds:.0f} s; error rate {self.error_rate:.4%}")
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        return {"req_per_s": round(self.requests / self.seconds, 1), "p50_ms": round(self.percentile(50), 2),
                "p99_ms": round(self.percentile(99), 2), "error_rate": self.error_rate,
                "requests": self.requests, "mean_ms": round(statistics.fmean(
                    [x for v in self.latencies_ms.values() for x in v] or [float("nan")]), 2)}


def _client(base: str, token: str, ops: list[Op], ctx: LoadContext, seed: int, stop_at: float,
            report: LoadReport, lock: threading.Lock) -> None:
    url = urlparse(base)
    rng = random.Random(seed)
    weights = [op.weight for op in ops]
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    lat: dict[str, list[float]] = {}
    errs: dict[str, int] = {}
    samples: list[str] = []
    acked: dict[str, list[Any]] = {}
    headers = {"Authorization": f"Bearer {token}"}
    while time.perf_counter() < stop_at:
        op = rng.choices(ops, weights)[0]
        req = op.build(rng, ctx)
        body = None
        h = dict(headers)
        if req.body is not None:
            body = json.dumps(req.body).encode()
            h["Content-Type"] = "application/json"
        t0 = time.perf_counter()
        try:
            conn.request(req.method, req.path, body=body, headers=h)
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
            errs[op.name] = errs.get(op.name, 0) + 1
            samples.append(f"{op.name}: {type(e).__name__}: {e}")
            continue
        ms = (time.perf_counter() - t0) * 1000
        if status in op.ok:
            lat.setdefault(op.name, []).append(ms)
            if op.verify is not None:
                acked.setdefault(op.name, []).append(json.loads(data))
        else:
            errs[op.name] = errs.get(op.name, 0) + 1
            if len(samples) < 20:
                samples.append(f"{op.name}: {req.method} {req.path} -> {status} {data[:200]!r}")
    conn.close()
    with lock:
        for k, v in lat.items():
            report.latencies_ms.setdefault(k, []).extend(v)
        for k, v in errs.items():
            report.errors[k] = report.errors.get(k, 0) + v
        for k, v in acked.items():
            report.acked.setdefault(k, []).extend(v)
        report.error_samples.extend(samples[: max(0, 20 - len(report.error_samples))])


def run_load(base: str, token: str, ops: list[Op], ctx: LoadContext, clients: int = 16,
             seconds: float = 60.0, seed: int = 0) -> LoadReport:
    """``clients`` closed-loop clients for ``seconds``; returns latencies, errors and acknowledged writes."""
    report = LoadReport(seconds, clients, {}, {}, [], {})
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    threads = [threading.Thread(target=_client, args=(base, token, ops, ctx, seed * 1000 + i, stop_at, report, lock),
                                daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.seconds = time.perf_counter() - t0
    return report


def start_server(lake_root: str, port: int, workers: int, log_path: str, threads: int = 8,
                 env: dict | None = None, repo: Path | None = None) -> subprocess.Popen:
    """``imagelake serve`` in a child process, its stderr in ``log_path``; returns once ``/health``
    answers (raises if it dies first). ``repo``: the source tree the server runs from (default this
    one; another checkout serves as a side-by-side baseline)."""
    import os
    import urllib.request

    repo = Path(repo or REPO)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "imagelake", "--lake", lake_root, "serve", "--port", str(port),
                                 "--workers", str(workers)], cwd=repo,
                                env=dict(os.environ, PYTHONPATH=str(repo), IMAGELAKE_THREADS=str(threads), **(env or {})),
                                stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"imagelake serve exited: {Path(log_path).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("imagelake serve did not answer /health within 120 s")
