"""``imagelake run`` into a local lake and into an S3 lake on loopback, side by side.

    python tests/bench/bench_object_store.py [--n 2000] [--steps ingest,embed,cluster,tag,grid]
                                             [--runner spark|local] [--repeat 1] [--workdir DIR]

The same N labelled images (tests/photo_lake.py) are run through the real CLI twice per repeat:
into ``<workdir>/local-lake`` and into ``s3://<bucket>/lake`` on moto's S3 server (a real HTTP S3
implementation, in its own process, as in the tests). Prints the machine, each step's time on both
lakes and the ratio (medians over ``--repeat``), and what the S3 server itself spent: requests by
method, the server's time per request (measured inside its WSGI app), and its CPU seconds. moto
is a Python server; when its busy time is a large share of the S3 run's extra time, the server,
not imagelake, is the bottleneck (a real S3 endpoint answers in parallel and in native code).

Steps: by default ingest, embed, cluster, tag and grid (what the README's figures cover); ``--steps``
may add quality, suggest, index and outliers, which run on an object-store lake too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(REPO)]


def _serve() -> None:
    """The timed S3 server: moto's WSGI app behind werkzeug, each request timed; stats on exit."""
    import logging
    import resource
    import threading

    logging.disable(logging.CRITICAL)
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    times: dict[str, list[float]] = {}
    lock = threading.Lock()

    def timed(environ, start_response):
        t0 = time.perf_counter()
        try:
            return list(app(environ, start_response))  # the body is made inside the timing
        finally:
            dt = time.perf_counter() - t0
            with lock:
                times.setdefault(environ.get("REQUEST_METHOD", "?"), []).append(dt)

    server = make_server("127.0.0.1", 0, timed, True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"PORT {server.server_address[1]}", flush=True)
    sys.stdin.readline()  # "stats" (or EOF): report and go on; EOF again ends
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"cpu_s": ru.ru_utime + ru.ru_stime, "times": times}), flush=True)
    sys.stdin.read()
    server.shutdown()


class TimedS3:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the S3 server did not start: {line!r}")
        self.endpoint = f"http://127.0.0.1:{int(line.split()[1])}"

    def options(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
                "AWS_CONDITIONAL_PUT": "etag"}

    def bucket(self, name: str) -> str:
        import urllib.request

        with urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/{name}", method="PUT", data=b""),
                                    timeout=10):
            return name

    def stats(self) -> dict:
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        self.proc.stdin.close()
        self.proc.wait(30)
        return out


_STEP = re.compile(r"(\w+) (\d+) rows out in ([\d.]+) s")


def run_cli(lake: str, images: Path, steps: str, env: dict, cwd: Path) -> tuple[float, dict[str, float]]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "imagelake", "--lake", lake, "run", "--images", str(images),
                        "--steps", steps, "--no-progress"], env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"imagelake run into {lake} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    line = p.stdout.strip().splitlines()[-1]
    return wall, {m.group(1): float(m.group(3)) for m in _STEP.finditer(line)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--steps", default="ingest,embed,cluster,tag,grid")
    ap.add_argument("--runner", choices=["spark", "local"], default="spark")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workdir")
    args = ap.parse_args()

    from common import machine
    from photo_lake import write_labelled

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-object-store-"))
    images = work / f"images-{args.n}"
    if not images.exists():
        write_labelled(images, args.n)
    print(machine())
    print(f"load average before: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores")
    print(f"{args.n} images, steps {args.steps}, runner {args.runner} ({args.master}), {args.repeat} repeat(s)")
    server = TimedS3()
    base = dict(os.environ, PYTHONPATH=str(REPO), IMAGELAKE_RUNNER=args.runner, IMAGELAKE_MASTER=args.master)
    s3_env = dict(base, **server.options())
    cwd = work / "cwd"
    cwd.mkdir(exist_ok=True)
    local_runs, s3_runs = [], []
    try:
        for r in range(args.repeat):
            local_runs.append(run_cli(str(work / f"local-lake-{r}-{time.time_ns()}"), images, args.steps, base, cwd))
            s3_runs.append(run_cli(f"s3://{server.bucket(f'bench-{r}-{time.time_ns()}')}/lake", images,
                                   args.steps, s3_env, cwd))
    finally:
        stats = server.stats()
    steps = list(local_runs[0][1])
    print(f"\n{'step':<10}{'local s':>10}{'s3 s':>10}{'ratio':>8}")
    for step in steps:
        lo = statistics.median(run[1].get(step, float("nan")) for run in local_runs)
        s3 = statistics.median(run[1].get(step, float("nan")) for run in s3_runs)
        print(f"{step:<10}{lo:>10.2f}{s3:>10.2f}{s3 / lo if lo else float('nan'):>8.2f}")
    lo = statistics.median(w for w, _ in local_runs)
    s3 = statistics.median(w for w, _ in s3_runs)
    print(f"{'end to end':<10}{lo:>10.2f}{s3:>10.2f}{s3 / lo:>8.2f}   (CLI wall time, Spark start included)")
    times = stats["times"]
    n_req = sum(len(v) for v in times.values())
    busy = sum(sum(v) for v in times.values())
    print(f"\nS3 server ({args.repeat} s3 run(s)): {n_req} requests, busy {busy:.2f} s in requests, "
          f"{stats['cpu_s']:.2f} s CPU")
    for method, v in sorted(times.items()):
        v = sorted(v)
        print(f"  {method:<7}{len(v):>7} requests  median {1000 * statistics.median(v):7.2f} ms  "
              f"p90 {1000 * v[int(0.9 * (len(v) - 1))]:7.2f} ms  total {sum(v):7.2f} s")
    extra = (s3 - lo) * args.repeat
    if extra > 0:
        print(f"server busy time is {100 * busy / extra:.0f}% of the S3 runs' extra wall time "
              f"({'the server is the bottleneck' if busy >= 0.5 * extra else 'imagelake/transfer dominate'})")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        _serve()
    else:
        main()
