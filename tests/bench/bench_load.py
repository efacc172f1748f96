"""Load: ``imagelake serve`` with several workers, 1, 16 and 64 concurrent clients from this (second)
process, the full mix and a write-heavy mix, in one run.

    python tests/bench/bench_load.py [--n 2000] [--clients 1,16,64] [--seconds 30] [--workers 4]
                                     [--mixes full,write] [--steps ingest,embed,...] [--lake DIR]
                                     [--baseline-tree DIR --rounds 3] [--op-costs]

Builds a demo-sized lake with ``imagelake run`` (every step this build has, unless ``--steps``;
``--steps ingest`` with ``--mixes write`` is enough for the write-heavy mix), starts the server in
a child process, warms every worker, then measures side by side:

* baseline: ``GET /health`` only — gunicorn + Flask + loopback, the floor of any route;
* each mix with each client count, the one-client run first (each route's service time without
  queueing: the single-client baseline the others are compared with);
* mixes: ``full`` = :data:`loadgen.MIX` (image metadata, thumbnails, browse, SQL, similarity search,
  suggestions, curation writes); ``write`` = :data:`WRITE_HEAVY` (50 % curation writes — add, move,
  discard, undo — and 50 % bucket and image reads).

Prints per op p50/p99 and the error rate per run, the acknowledged curation actions per second,
the server's CPU time per request and per acknowledged action (every process of the server, read
from ``/proc``: less noisy than wall time on a shared machine), the machine and its load, every
5xx the server logged (with its traceback), and checks that every acknowledged write (every 200 answer of a write
op) is in ``bucket_events`` and that ``seq`` is dense.

``--baseline-tree DIR`` (another checkout, e.g. ``git worktree add /tmp/main main``) also serves a
copy of the lake, taken before any measured run, from that tree's code, and runs the same matrix on
both servers in alternating order for ``--rounds`` rounds: the baseline side by side, medians over
rounds and the ratios printed last.
Targets (issue 19, 2 cores): full mix at 16 clients p99 <= 100 ms overall and for "add to bucket";
write-heavy at 16 clients >= 300 acknowledged actions/s; 64 clients no errors and p99 <= 300 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from common import machine, write_photos  # noqa: E402
from loadgen import HEALTH_ONLY, MIX, LoadContext, LoadReport, Op, Request, api_call, prepare, run_load, start_server  # noqa: E402

REPO = HERE.parents[1]
WRITE_OPS = {"add to bucket", "move", "discard", "undo"}


def _pool(ctx: LoadContext) -> list[str]:
    """The images the write-heavy mix touches: few enough that moves and undos find work."""
    return ctx.image_ids[:100]


def _write_buckets(base: str, token: str, ctx: LoadContext) -> None:
    if "write buckets" in ctx.extra:
        return
    made = []
    for name in ("write a", "write b", "write c"):
        bucket = api_call(base, token, "POST", "/api/v1/buckets", {"name": name})["bucket"]["bucket_id"]
        api_call(base, token, "POST", f"/api/v1/buckets/{bucket}/images", {"image_ids": _pool(ctx)[:30]})
        made.append(bucket)
    ctx.extra["write buckets"] = made


def _pick(r, c) -> str:
    return r.choice(c.extra["write buckets"])


def _move(r, c) -> Request:
    a, b = r.sample(c.extra["write buckets"], 2)
    return Request("POST", f"/api/v1/buckets/{b}/images", {"image_ids": [r.choice(_pool(c))], "from": a, "mode": "move"})


#: 50 % curation writes (3 add : 1 move : 1 discard : 1 undo), 50 % reads of buckets and images.
#: A move of an image not in its source and an undo with nothing left are 409s, not errors.
WRITE_HEAVY: list[Op] = [
    Op("add to bucket", 3, lambda r, c: Request("POST", f"/api/v1/buckets/{_pick(r, c)}/images",
                                                {"image_ids": [r.choice(_pool(c))]}), setup=_write_buckets,
       verify=lambda *a: None),
    Op("move", 1, _move, ok=frozenset({200, 409}), setup=_write_buckets, verify=lambda *a: None),
    Op("discard", 1, lambda r, c: Request("POST", "/api/v1/discard", {"image_ids": [r.choice(_pool(c))]}),
       verify=lambda *a: None),
    Op("undo", 1, lambda r, c: Request("POST", "/api/v1/undo", {}), ok=frozenset({200, 409}), verify=lambda *a: None),
    Op("list buckets", 2, lambda r, c: Request("GET", "/api/v1/buckets"), setup=_write_buckets),
    Op("get bucket", 2, lambda r, c: Request("GET", f"/api/v1/buckets/{_pick(r, c)}?limit=100"), setup=_write_buckets),
    Op("image metadata", 2, lambda r, c: Request("GET", f"/api/v1/images/{r.choice(c.image_ids)}")),
]

MIXES = {"full": MIX, "write": WRITE_HEAVY}


def acknowledged(report: LoadReport) -> list[str]:
    """Event ids of every acknowledged (200) curation write of a run."""
    out = []
    for name, bodies in report.acked.items():
        for body in bodies:
            if isinstance(body, dict) and body.get("ok") and isinstance(body.get("event"), dict):
                out.append(body["event"]["event_id"])
    return out


def check_log(lake: Any, acked: list[str]) -> int:
    """Assert every acknowledged event id is in ``bucket_events`` and ``seq`` is dense; the log's size."""
    from deltalake import DeltaTable

    table = DeltaTable(lake.table_uri("bucket_events")).to_pyarrow_table(columns=["event_id", "seq"])
    stored = set(table.column("event_id").to_pylist())
    seqs = sorted(table.column("seq").to_pylist())
    missing = [e for e in acked if e not in stored]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged actions are not in bucket_events: {missing[:5]}"
    assert seqs == list(range(len(seqs))), "bucket_events.seq is not dense"
    return len(seqs)


def writer_stats(lake_root: str) -> dict[str, Any] | None:
    """The node's bucket-log writer counters (:class:`lake.bucket_store.WriterStats`), as published."""
    from lake.bucket_writer import VersionBoard, socket_name

    return VersionBoard(socket_name(lake_root)).read_stats()


def stats_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the writer did between two snapshots (``after`` alone when another process took over)."""
    if after is None:
        return None
    if before is None or before.get("pid") != after.get("pid") or before.get("started") != after.get("started"):
        return after
    out = {k: after[k] - before[k] for k in ("batches", "actions", "commits", "rows", "replans", "compactions",
                                              "merges", "checkpoints") if k in after}
    out["max_batch"], out["max_queue_s"] = after["max_batch"], after["max_queue_s"]  # since the writer started
    out["seconds"] = {k: after["seconds"][k] - before["seconds"].get(k, 0.0) for k in after["seconds"]}
    return out


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and every live descendant."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo.extend(c for c, pp in parent.items() if pp == p)
    return total


def run_matrix(base: str, token: str, mixes: dict[str, list[Op]], ctx: LoadContext, clients: list[int],
               seconds: float, lake_root: str | None = None,
               server_pid: int | None = None) -> list[tuple[str, int, LoadReport]]:
    """Every mix with every client count (in the order given), ``seconds`` each; each report gets
    the writer's counters over its run as ``report.writer`` (when ``lake_root`` is given), the
    server's CPU seconds as ``report.server_cpu_s`` (when ``server_pid`` is given), this process's
    (the clients') as ``report.client_cpu_s`` and the 1-minute load average after it as ``report.load``."""
    out = []
    for name, ops in mixes.items():
        for k, n in enumerate(clients):
            before = writer_stats(lake_root) if lake_root else None
            cpu0, own0 = (tree_cpu_s(server_pid) if server_pid else 0.0), time.process_time()
            report = run_load(base, token, ops, ctx, clients=n, seconds=seconds, seed=10 * k + 2)
            report.server_cpu_s = tree_cpu_s(server_pid) - cpu0 if server_pid else float("nan")
            report.client_cpu_s, report.load = time.process_time() - own0, os.getloadavg()[0]
            if lake_root:
                time.sleep(0.5)  # the writer publishes its counters every 0.2 s
                report.writer = stats_delta(before, writer_stats(lake_root))
            out.append((name, n, report))
    return out


def op_costs(base: str, token: str, ops: list[Op], ctx: LoadContext, server_pid: int, clients: int = 4,
             seconds: float = 4.0) -> list[tuple[str, int, float, float]]:
    """Each op of a mix alone: (name, requests, server CPU ms per request, p50 ms) — where the
    server's CPU goes, per route, without the others competing."""
    out = []
    for k, op in enumerate(ops):
        cpu0 = tree_cpu_s(server_pid)
        r = run_load(base, token, [op], ctx, clients=clients, seconds=seconds, seed=500 + k)
        out.append((op.name, r.requests, (tree_cpu_s(server_pid) - cpu0) * 1e3 / max(1, r.requests),
                    r.percentile(50)))
    return out


def server_errors(log_path: Path, limit: int = 5) -> list[str]:
    """The server log's 5xx reports (``request ... failed with``), each with its traceback."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for i, line in enumerate(lines):
        if " failed with 5" in line and len(out) < limit:
            block = [line]
            for nxt in lines[i + 1:i + 60]:
                if nxt.startswith("[") and block[1:]:  # the next log record
                    break
                block.append(nxt)
            out.append("\n".join(block))
    return out


def writer_table(runs: list[tuple[str, int, LoadReport]]) -> str:
    """Per run: the writer's batches, actions per batch and milliseconds per batch in each phase."""
    phases = ("queue", "lock", "sync", "plan", "commit", "adopt", "compact", "ckpt", "batch")
    head = f"{'run':<16}{'batches':>8}{'act/b':>7}{'max b':>6}{'commits':>8}{'replan':>7}{'m/c/ck':>9}" + "".join(
        f"{p:>8}" for p in phases)
    lines = [head, f"{'':<16}{'(merges/compactions/checkpoints)':>45}" +
             f"{'(ms per batch; queue: ms per action)':>{8 * len(phases)}}"]
    for mix, n, r in runs:
        w = getattr(r, "writer", None)
        if not w or not w.get("batches"):
            lines.append(f"{mix + ' ' + str(n):<16}{'-':>8}")
            continue
        b = w["batches"]
        cells = [w["seconds"].get("queue", 0.0) / max(1, w["actions"]) * 1e3] + [
            w["seconds"].get({"ckpt": "checkpoint"}.get(p, p), 0.0) / b * 1e3 for p in phases[1:]]
        upkeep = f"{w.get('merges', 0)}/{w.get('compactions', 0)}/{w.get('checkpoints', 0)}"
        lines.append(f"{mix + ' ' + str(n):<16}{b:>8}{w['actions'] / b:>7.1f}{w['max_batch']:>6}{w['commits']:>8}"
                     f"{w['replans']:>7}{upkeep:>9}" + "".join(f"{c:>8.2f}" for c in cells))
    return "\n".join(lines)


def write_rate(report: LoadReport) -> float:
    return len(acknowledged(report)) / report.seconds


def cpu_per_action(report: LoadReport) -> float:
    """Server CPU milliseconds per acknowledged curation action (the reads of the mix included)."""
    n = len(acknowledged(report))
    return getattr(report, "server_cpu_s", float("nan")) * 1e3 / n if n else float("nan")


def ab_table(rounds: dict[str, list[list[tuple[str, int, LoadReport]]]]) -> str:
    """Medians over rounds per tree and run, and this tree's ratio to the baseline's."""
    import statistics

    def med(tree, mix, n, f):
        vals = [f(r) for rs in rounds[tree] for m, c, r in rs if m == mix and c == n]
        vals = [v for v in vals if v == v]
        return statistics.median(vals) if vals else float("nan")

    metrics = [("acked/s", write_rate), ("p50 ms", lambda r: r.percentile(50)), ("p99 ms", lambda r: r.percentile(99)),
               ("CPU ms/action", cpu_per_action), ("errors", lambda r: sum(r.errors.values()))]
    trees = list(rounds)
    keys = list(dict.fromkeys((m, c) for rs in rounds[trees[0]] for m, c, _ in rs))
    lines = [f"{'run':<14}{'metric':<15}" + "".join(f"{t:>14}" for t in trees) + f"{'ratio':>9}"]
    for mix, n in keys:
        for name, f in metrics:
            vals = [med(t, mix, n, f) for t in trees]
            ratio = vals[0] / vals[1] if len(vals) > 1 and vals[1] else float("nan")
            lines.append(f"{mix + ' ' + str(n):<14}{name:<15}" + "".join(f"{_fmt(v):>14}" for v in vals) +
                         f"{ratio:>9.2f}")
    return "\n".join(lines)


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
    if not (lake / "images").exists():
        out = _imagelake("--lake", str(lake), "--runner", "local", "run", "--images", str(images), "--collection",
                         "bench", "--no-progress", *(["--steps", steps] if steps else []))
        print(out.strip())
    return time.perf_counter() - t0


def _fmt(v: float) -> str:
    return "-" if v != v else f"{v:.1f}"


def comparison(runs: list[tuple[str, int, LoadReport]]) -> str:
    """Per op: p50/p99 for each client count of each mix, side by side."""
    lines = []
    for mix in dict.fromkeys(m for m, _, _ in runs):
        mine = [(n, r) for m, n, r in runs if m == mix]
        ops = sorted({op for _, r in mine for op in r.latencies_ms} | {op for _, r in mine for op in r.errors})
        head = f"{'op (' + mix + ' mix)':<22}" + "".join(f"{f'{n} cl p50/p99 ms':>22}" for n, _ in mine)
        lines.append(head)
        for op in ops + [None]:
            cells = []
            for _, r in mine:
                n = len(r.latencies_ms.get(op, [])) if op else 1
                cells.append(f"{(_fmt(r.percentile(50, op)) + ' / ' + _fmt(r.percentile(99, op))) if n else '-':>22}")
            lines.append(f"{op or 'all':<22}" + "".join(cells))
        lines.append(f"{'req/s':<22}" + "".join(f"{r.requests / r.seconds:>22.0f}" for _, r in mine))
        lines.append(f"{'errors':<22}" + "".join(f"{sum(r.errors.values()):>22}" for _, r in mine))
        lines.append(f"{'acked actions/s':<22}" + "".join(f"{write_rate(r):>22.0f}" for _, r in mine))
        lines.append(f"{'server CPU ms/request':<22}" + "".join(
            f"{_fmt(getattr(r, 'server_cpu_s', float('nan')) * 1e3 / max(1, r.requests)):>22}" for _, r in mine))
        lines.append(f"{'server CPU ms/action':<22}" + "".join(
            f"{_fmt(cpu_per_action(r)):>22}" for _, r in mine))
        lines.append(f"{'load avg after':<22}" + "".join(f"{getattr(r, 'load', float('nan')):>22.1f}" for _, r in mine))
        lines.append("")
    return "\n".join(lines)


def targets(runs: list[tuple[str, int, LoadReport]]) -> list[str]:
    out = []
    get = {(m, n): r for m, n, r in runs}
    full16, write16 = get.get(("full", 16)), get.get(("write", 16))
    if full16 is not None:
        p99, add = full16.percentile(99), full16.percentile(99, "add to bucket")
        out.append(f"full mix, 16 clients: p99 {p99:.0f} ms, add to bucket p99 {_fmt(add)} ms (<= 100) -> "
                   f"{'met' if p99 <= 100 and add <= 100 else 'NOT met'}; errors {sum(full16.errors.values())}")
    if write16 is not None:
        rate = write_rate(write16)
        out.append(f"write-heavy, 16 clients: {rate:.0f} acknowledged actions/s (>= 300) -> "
                   f"{'met' if rate >= 300 else 'NOT met'}")
    for (m, n), r in get.items():
        if n == 64:
            ok = sum(r.errors.values()) == 0 and r.percentile(99) <= 300
            out.append(f"{m} mix, 64 clients: errors {sum(r.errors.values())}, p99 {r.percentile(99):.0f} ms "
                       f"(0, <= 300) -> {'met' if ok else 'NOT met'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images in the lake")
    ap.add_argument("--clients", default="1,16,64", help="client counts, comma-separated (1 first: the baseline)")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each mixed run")
    ap.add_argument("--baseline-seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=4, help="server worker processes")
    ap.add_argument("--threads", type=int, default=8, help="threads per worker")
    ap.add_argument("--mixes", default="full,write", help="full and/or write")
    ap.add_argument("--steps", help="pipeline steps to build the lake with (default: all in this build)")
    ap.add_argument("--lake", help="reuse this lake folder (its images/ sibling too) instead of a temporary one")
    ap.add_argument("--baseline-tree", help="another checkout whose server runs the same matrix on a copy of the "
                                            "lake, alternating with this tree's (the side-by-side baseline)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the matrix per tree (medians printed)")
    ap.add_argument("--op-costs", action="store_true",
                    help="first run each op of each mix alone (4 clients, 4 s) and print its server CPU per request")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    mixes = {m: MIXES[m] for m in args.mixes.split(",")}
    trees = {"this": REPO}
    if args.baseline_tree:
        trees["baseline"] = Path(args.baseline_tree).resolve()

    with tempfile.TemporaryDirectory(prefix="imagelake-load-") as tmp:
        lake_dir = Path(args.lake) if args.lake else Path(tmp) / "lake"
        build_s = build_lake(lake_dir, args.n, args.steps)
        token = _imagelake("--lake", str(lake_dir), "token", "create", "--scope", "admin", "--name", "bench").strip()
        from deltalake import DeltaTable
        from lake.catalog import Lake

        lakes = {"this": lake_dir}
        if "baseline" in trees:  # the same lake (token included), before any write
            lakes["baseline"] = Path(tmp) / "baseline-lake"
            shutil.copytree(lake_dir, lakes["baseline"], symlinks=True)
        rows = DeltaTable(Lake.at(lake_dir).table_uri("images")).to_pyarrow_table(columns=["image_id", "collection"])
        image_ids = rows.column("image_id").to_pylist()
        collections = sorted(set(rows.column("collection").to_pylist()))
        servers, ctxs, logs, bases = {}, {}, {}, {}
        try:
            for name, tree in trees.items():
                port = _free_port()
                logs[name] = Path(tmp) / f"server-{name}.log"
                servers[name] = start_server(str(lakes[name]), port, args.workers, str(logs[name]),
                                             threads=args.threads, repo=tree)
                bases[name] = f"http://127.0.0.1:{port}"
                ctxs[name] = LoadContext(image_ids=image_ids, collections=collections)
                for ops in mixes.values():
                    prepare(bases[name], token, ops, ctxs[name])
                    run_load(bases[name], token, ops, ctxs[name], clients=max(clients), seconds=3, seed=99)  # warm
            costs = {name: {mix: op_costs(bases[name], token, ops, ctxs[name], servers[name].pid)
                            for mix, ops in mixes.items()} for name in trees} if args.op_costs else {}
            load_before = os.getloadavg()
            baseline = run_load(bases["this"], token, HEALTH_ONLY, ctxs["this"], clients=16,
                                seconds=args.baseline_seconds, seed=1)
            rounds: dict[str, list] = {name: [] for name in trees}
            for k in range(args.rounds):
                for name in (list(trees) if k % 2 == 0 else list(trees)[::-1]):
                    rounds[name].append(run_matrix(bases[name], token, mixes, ctxs[name], clients, args.seconds,
                                                   lake_root=str(lakes[name]), server_pid=servers[name].pid))
            load_after = os.getloadavg()
        finally:
            for server in servers.values():
                server.terminate()
            for server in servers.values():
                server.wait(timeout=30)
        for name in trees:
            acked = [e for rs in rounds[name] for _, _, r in rs for e in acknowledged(r)]
            total = check_log(Lake.at(lakes[name]), acked)
            print(f"verified ({name} tree): all {len(acked)} acknowledged curation actions of the measured runs are "
                  f"in bucket_events ({total} events, seq dense)")
        failures = {name: server_errors(logs[name]) for name in trees}

    print(machine())
    print(f"lake: {len(image_ids)} images ({args.n} files, 320x240), built in {build_s:.1f} s; server: "
          f"{args.workers} gunicorn gthread workers x {args.threads} threads; closed-loop clients in one separate "
          f"process over loopback; {args.seconds:.0f} s per run; trees: "
          + ", ".join(f"{k} = {v}" for k, v in trees.items()))
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
          f"(cores: {os.cpu_count()}; other work on the machine included)")
    print("\n-- baseline: GET /health only, 16 clients")
    print(baseline.table())
    for name, per_mix in costs.items():
        for mix, rows in per_mix.items():
            print(f"\n-- {name} tree, {mix} mix, each op alone (4 clients, 4 s): server CPU per request")
            print(f"{'op':<22}{'requests':>9}{'CPU ms/req':>12}{'p50 ms':>9}")
            for op, n, cpu, p50 in rows:
                print(f"{op:<22}{n:>9}{cpu:>12.2f}{_fmt(p50):>9}")
    for name in trees:
        for k, runs in enumerate(rounds[name]):
            print(f"\n== {name} tree, round {k + 1}: per op p50 / p99, the one-client run first "
                  "(the single-client baseline)\n")
            print(comparison(runs))
            print("-- the node's bucket-log writer per run (lake.bucket_store.WriterStats)\n")
            print(writer_table(runs) + "\n")
            for mix, n, r in runs:
                if r.error_samples:
                    print(f"error samples ({mix}, {n} clients):\n  " + "\n  ".join(r.error_samples[:5]))
        for block in failures[name]:
            print(f"server log ({name} tree), a 5xx:\n  " + block.replace("\n", "\n  "))
    if len(trees) > 1:
        print(f"\n== medians over {args.rounds} round(s), this tree / baseline\n")
        print(ab_table(rounds))
    print("\ntargets (this tree, last round):\n  " + "\n  ".join(targets(rounds["this"][-1])))


if __name__ == "__main__":
    main()
