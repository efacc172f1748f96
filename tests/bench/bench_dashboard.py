"""Curation view load time in a real browser on the 70k-image Fashion-MNIST lake (issue 8: <= 1 s).

    python tests/bench/bench_dashboard.py [--n 70000] [--baseline-n 1000] [--repeat 9] [--workers 2]
    python tests/bench/bench_dashboard.py --workflow [--n 70000] [--baseline-n 1000] [--repeat 5] [--import-embeddings]
        [--old-rev REV] [--viewports 1366x768,1920x1080]

``--workflow`` (issue 18) measures what a curator waits for, in the page's own clock, on both
lakes side by side (the pipeline's ``suggest`` and ``grid`` steps run first): a number key ->
the badge on the cell (and -> the bucket's count updated, the add's round trip), ``n`` -> the
next page shown (feedback committed, page 2 fetched and painted), map open -> first tile drawn,
a rectangle of ~500 cells -> the selection shown (count and marks), and a bucket of 5,000
members (all images when the lake has fewer) -> its page's first 56 thumbnails decoded. Targets:
<= 200 ms median, map open and the rectangle <= 1 s. ``--import-embeddings`` builds both lakes with
imported synthetic embeddings instead of the embed job (``bench_browse.build_imported``: the same
Fashion-MNIST PNGs through the real ingest; minutes instead of ~10 min at 70k): what is measured is
latency, which does not depend on what the vectors mean. ``--old-rev REV`` serves the large lake
from ``git archive REV`` first (its API and dashboard; same lake, same harness), then from this
tree: the before and after of a change in one run (``--baseline-n 0`` skips the small lake). Each
step's requests are printed from the browser's resource timeline: route, requests per round, and
the server wait (request sent -> first byte) against the whole round trip, medians.

For each lake (the baseline's small one first, then the large one, both built once by
tests/fashion.py with the real ingest and embed jobs and cached under test-artifacts/; the large
one takes ~10 min of embedding on 2 cores), on a copy of it:

1. the pipeline's ``suggest`` step builds the compact suggestion matrix (timed);
2. ``imagelake serve`` starts with ``--workers`` gunicorn workers;
3. each repetition deletes the previous bench bucket and creates a new one through the HTTP API
   with 8 members of one class (a different class and members each time, so the suggestions and
   their thumbnails are new to the server's caches) and 12 rejected images of another class;
4. a fresh browser context (empty HTTP cache, the login cookie only) opens ``/#curate`` and the
   clock stops when all 28 grid thumbnails are decoded (``img.complete && naturalWidth > 0``).

"Load" is navigation start to that moment, read from the page's own ``performance.now()``. The
first load after the server starts is reported on its own (each worker maps the matrix once). The
baseline is the same view, same harness, on the small lake: the ratio shows what collection size
costs the view. Also printed: time to the first suggestion cell, the suggestion request's server
time (its ``ms`` field) and its round trip, and the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "tests"), str(REPO)]

import requests  # noqa: E402

import fashion  # noqa: E402
from browser import running_server  # noqa: E402
from common import machine  # noqa: E402

CHROMIUM = os.environ.get("IMAGELAKE_CHROMIUM", "/usr/bin/chromium")
PAGE = 28
TARGET_MS = 1000.0

LOADED = f"""() => {{
  const imgs = [...document.querySelectorAll('#curate-grid .cell img')];
  return imgs.length >= {PAGE} && imgs.every(i => i.complete && i.naturalWidth > 0);
}}"""


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _by_class(lake_dir: Path) -> dict[int, list[str]]:
    from lake.catalog import Lake
    from lake.commit import open_table

    rows = open_table(Lake.at(lake_dir), "images").to_pyarrow_table(columns=["image_id", "uri"]).to_pylist()
    out: dict[int, list[str]] = {}
    for r in sorted(rows, key=lambda r: r["image_id"]):
        out.setdefault(fashion.label_of(r["uri"]), []).append(r["image_id"])
    return out


class Api:
    def __init__(self, base: str, token: str):
        self.base = base + "/api/v1"
        self.s = requests.Session()
        self.s.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, **kw) -> dict:
        r = self.s.request(method, self.base + path, timeout=120, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r.json()


def measure(lake_dir: Path, repeat: int, workers: int, browser, label: str) -> dict:
    from jobs.pipeline import PipelineRequest, run_pipeline
    from lake.catalog import Lake
    from lake.settings import Settings
    from lake.tokens import create_token

    classes = _by_class(lake_dir)
    lake = Lake.at(lake_dir)
    t0 = time.perf_counter()
    run_pipeline(lake, Settings(lake=lake.root, runner="local"), PipelineRequest(steps=("suggest",)))
    suggest_step_s = time.perf_counter() - t0
    _, token = create_token(lake, "curate", "dashboard bench")
    loads, firsts, server_ms, rtts = [], [], [], []
    first_load = None
    with running_server(lake.root, workers=workers) as base:
        api = Api(base, token)
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        page = context.new_page()
        page.goto(base + "/login")
        page.fill("#token", token)
        page.click("button[type=submit]")
        page.wait_for_url(base + "/")
        state = context.storage_state()
        context.close()
        for b in api.call("GET", "/buckets")["buckets"]:  # the view opens the first bucket: start from none
            if not b["system"]:
                api.call("DELETE", f"/buckets/{b['bucket_id']}")
        previous = None
        for r in range(repeat + 1):
            if previous:
                api.call("DELETE", f"/buckets/{previous}")
            cls, other = r % 10, (r + 5) % 10
            members = classes[cls][(r // 10) * 8:(r // 10) * 8 + 8]
            rejected = classes[other][(r // 10) * 12:(r // 10) * 12 + 12]
            bucket = api.call("POST", "/buckets", json={"name": f"bench {label} {r}"})["bucket"]["bucket_id"]
            api.call("POST", f"/buckets/{bucket}/images", json={"image_ids": members})
            api.call("POST", f"/buckets/{bucket}/feedback", json={"accepted": [], "rejected": rejected})
            previous = bucket
            context = browser.new_context(viewport={"width": 1280, "height": 860}, storage_state=state)
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("response", lambda resp: errors.append(f"{resp.status} {resp.url}") if resp.status >= 400 else None)
            with page.expect_response(lambda resp: "/suggestions" in resp.url, timeout=60_000) as info:
                page.goto(base + "/#curate")
            suggest = info.value.json() if info.value.ok else {}
            page.wait_for_function(LOADED, timeout=60_000, polling="raf")
            load_ms = page.evaluate("performance.now()")
            first_cell = page.evaluate("""() => { const e = performance.getEntriesByType('mark').find(m => m.name === 'curate-grid-shown');
                                               return e ? e.startTime : null; }""")
            rtt = page.evaluate("""() => { const e = performance.getEntriesByType('resource').find(x => x.name.includes('/suggestions'));
                                        return e ? e.responseEnd - e.startTime : null; }""")
            context.close()
            if errors:
                raise RuntimeError(f"the page reported errors: {errors[:5]}")
            if r == 0:
                first_load = load_ms
                continue
            loads.append(load_ms)
            if first_cell is not None:
                firsts.append(first_cell)
            if suggest.get("ms") is not None:
                server_ms.append(float(suggest["ms"]))
            if rtt is not None:
                rtts.append(rtt)
            print(f"  {label} rep {r}: class {cls}, loaded in {load_ms:.0f} ms (suggestions {suggest.get('ms')} ms "
                  f"on the server, {rtt or 0:.0f} ms round trip)", flush=True)
    return {"label": label, "images": sum(len(v) for v in classes.values()), "suggest_step_s": suggest_step_s,
            "first_load": first_load, "loads": loads, "firsts": firsts, "server_ms": server_ms, "rtts": rtts}


def thumbnail_lookups(lake_dir: Path, samples: int = 200) -> dict:
    """One thumbnail by id, side by side: the SQL lookup the reader used before (DuckDB over the
    table's Parquet files) against :class:`lake.thumbnail_index.ThumbnailIndex`."""
    import random

    import duckdb
    from deltalake import DeltaTable

    from lake.thumbnail_index import ThumbnailIndex

    files = DeltaTable(str(lake_dir / "tables" / "thumbnails")).file_uris()
    con = duckdb.connect()
    con.execute("SET parquet_metadata_cache = true")
    con.execute("CREATE VIEW thumbnails AS SELECT * FROM read_parquet([" + ", ".join(f"'{f}'" for f in files) + "])")
    ids = [r[0] for r in con.sql("SELECT DISTINCT image_id FROM thumbnails").fetchall()]
    pick = random.Random(0).sample(ids, min(samples, len(ids)))
    t0 = time.perf_counter()
    index = ThumbnailIndex()
    index.update(files)
    build_s = time.perf_counter() - t0
    sql_ms, idx_ms = [], []
    for image_id in pick:
        t0 = time.perf_counter()
        a = con.execute("SELECT jpeg FROM thumbnails WHERE image_id = ? AND size = ? LIMIT 1", [image_id, 256]).fetchall()
        sql_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        b = index.get(image_id, 256)
        idx_ms.append((time.perf_counter() - t0) * 1e3)
        assert bytes(a[0][0]) == b, image_id
    return {"files": len(files), "rows": len(index), "build_s": build_s, "sql_ms": sql_ms, "idx_ms": idx_ms}


def _row(m: dict) -> str:
    med = statistics.median
    first_cell = f"{med(m['firsts']):7.0f}" if m["firsts"] else "      -"
    return (f"{m['label']:<10}{m['images']:>8}  {med(m['loads']):8.0f}  {_pct(m['loads'], 0.9):6.0f}  "
            f"{m['first_load']:10.0f}  {first_cell}  {med(m['server_ms']):9.1f}  {med(m['rtts']):7.0f}  "
            f"{m['suggest_step_s']:8.1f}")


WORKFLOW_TARGETS = {"key -> badge": 200, "key -> count": 200, "n -> next page": 200, "map open -> first tile": 1000,
                    "rectangle -> selection": 1000, "bucket page -> first page": 200}

# In the page: run `act` (a function source) and resolve with the ms until `done()` holds.
_TIMED = """async ([act, done]) => {
  const t0 = performance.now();
  (new Function(act))();
  const check = new Function('return (' + done + ')()');
  while (!check()) await new Promise((r) => requestAnimationFrame(r));
  return performance.now() - t0;
}"""


def _timed(page, act: str, done: str, timeout_s: float = 60) -> float:
    """Milliseconds from ``act`` to ``done()`` (polled every frame), in the page's clock. The bench's
    own context bypasses the page's CSP (new Function): the dashboard's code is unchanged."""
    page.set_default_timeout(timeout_s * 1000)
    took = page.evaluate(_TIMED.replace("while (!check())", f"while (!check() && performance.now() - t0 < {timeout_s * 1000})"),
                         [act, done])
    if took >= timeout_s * 1000:
        raise RuntimeError(f"not done after {timeout_s} s: {done}")
    return took


# the requests one step made, from the browser's resource timeline: route, server wait (request
# sent -> first byte: the server's time plus loopback) and the whole round trip
_REQUESTS = """() => performance.getEntriesByType('resource').filter((e) => e.name.includes('/api/v1/')
    && !e.name.includes('/thumbnail')).map((e) => [e.name.replace(/^.*\\/api\\/v1/, '').replace(/[0-9a-f]{16,}/g, ':id')
    .replace(/\\?.*$/, ''), e.responseStart - e.requestStart, e.duration])"""


def _requests_of(page) -> list[tuple[str, float, float]]:
    return [tuple(x) for x in page.evaluate(_REQUESTS)]


def workflow(lake_dir: Path, repeat: int, workers: int, browser, label: str, tree: Path,
             viewports: list[tuple[int, int]]) -> dict:
    """The curate rounds on ``lake_dir`` with the server (and so the dashboard) run from ``tree``,
    at each viewport; figures per viewport and step."""
    from lake.catalog import Lake
    from lake.tokens import create_token

    classes = _by_class(lake_dir)
    everyone = sorted(i for ids in classes.values() for i in ids)
    lake = Lake.at(lake_dir)
    _, token = create_token(lake, "curate", "dashboard workflow bench")
    out: dict = {"label": label, "images": len(everyone), "figures": {}, "selected": [], "requests": {}}
    with running_server(lake.root, workers=workers, tree=tree) as base:
        api = Api(base, token)
        for b in api.call("GET", "/buckets")["buckets"]:  # a previous tree's leftovers
            if not b["system"]:
                api.call("DELETE", f"/buckets/{b['bucket_id']}")
        big = api.call("POST", "/buckets", json={"name": f"big {label}"})["bucket"]["bucket_id"]
        members = everyone[:5000]
        for width, height in viewports:
            vp = f"{width}x{height}"
            figures: dict[str, list[float]] = {k: [] for k in WORKFLOW_TARGETS}
            calls: dict[str, list[tuple[str, float, float]]] = {"key -> count": [], "n -> next page": []}
            context = browser.new_context(viewport={"width": width, "height": height}, bypass_csp=True)
            page = context.new_page()
            page.goto(base + "/login")
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_url(base + "/")
            for r in range(repeat + 1):  # the first round warms the server's caches and is not counted
                cls = r % 10
                bucket = api.call("POST", "/buckets", json={"name": f"wf {label} {vp} {r}"})["bucket"]["bucket_id"]
                api.call("POST", f"/buckets/{bucket}/images", json={"image_ids": classes[cls][8 * (r // 10):8 * (r // 10) + 8]})
                keys = [b["bucket_id"] for b in api.call("GET", "/buckets")["buckets"] if not b["system"]]
                key = str(keys.index(bucket) + 1) if keys.index(bucket) < 9 else None
                if key is None:
                    raise RuntimeError("more than 9 buckets: the bench deletes its buckets as it goes")
                page.goto(base + "/#curate")
                page.reload()
                page.click(f".bucket[data-bucket-id='{bucket}'] .name")
                page.wait_for_selector(f".bucket.active[data-bucket-id='{bucket}']")
                page.wait_for_function(f"() => document.querySelector('#curate-status').textContent.includes('suggestions for wf {label} {vp} {r} ')")
                page.wait_for_timeout(300)  # the bar's previews and the undo button's question settle first
                badges = page.locator("#curate-grid .badge").count()
                page.evaluate("() => performance.clearResourceTimings()")
                got = {"key -> badge": _timed(page, f"document.body.dispatchEvent(new KeyboardEvent('keydown', {{key: '{key}', bubbles: true}}))",
                                              f"() => document.querySelectorAll('#curate-grid .badge').length > {badges}")}
                got["key -> count"] = got["key -> badge"] + _timed(page, "", f"""() => (document.querySelector(".bucket[data-bucket-id='{bucket}'] .count") || {{}}).textContent === '9 images'""")
                round_calls = {"key -> count": _requests_of(page)}
                page.wait_for_timeout(300)
                page.evaluate("() => performance.clearResourceTimings()")
                marks = page.evaluate("() => performance.getEntriesByName('curate-next-shown').length")
                got["n -> next page"] = _timed(page, "document.body.dispatchEvent(new KeyboardEvent('keydown', {key: 'n', bubbles: true}))",
                                               f"() => performance.getEntriesByName('curate-next-shown').length > {marks}")
                round_calls["n -> next page"] = _requests_of(page)
                # the map, opened fresh (its module and OpenSeadragon come from the browser cache after round 0)
                page.goto(base + "/#sql")
                page.reload()
                page.wait_for_selector("#sql-presets button")
                got["map open -> first tile"] = _timed(page, "location.hash = '#map'",
                                                       "() => performance.getEntriesByName('map-first-tile').length > 0")
                page.wait_for_selector("#map-viewer[data-ready='1']")
                page.wait_for_timeout(300)
                layout = api.call("GET", "/grid")["layouts"][0]
                box = page.locator("#map-viewer").bounding_box()
                cell = min(box["width"] / layout["width"], box["height"] / layout["height"])
                side = min(500 ** 0.5, layout["width"], layout["height"]) * cell
                cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
                page.click("#map-rect")
                page.evaluate("() => { window.__up = null; window.addEventListener('pointerup', () => { window.__up = performance.now(); }, true); }")
                shown = page.evaluate("() => performance.getEntriesByName('map-selection-shown').length")
                page.mouse.move(cx - side / 2, cy - side / 2)
                page.mouse.down()
                page.mouse.move(cx + side / 2, cy + side / 2, steps=3)
                page.mouse.up()
                page.wait_for_function(f"() => performance.getEntriesByName('map-selection-shown').length > {shown}")
                got["rectangle -> selection"] = page.evaluate(
                    "() => performance.getEntriesByName('map-selection-shown').at(-1).startTime - window.__up")
                selected = int(page.locator("#map-viewer").get_attribute("data-selected"))
                page.keyboard.press("Escape")
                page.goto(base + "/#sql")
                api.call("DELETE", f"/buckets/{bucket}")
                line = ", ".join(f"{k} {v:.0f}" for k, v in got.items())
                print(f"  {label} {vp} round {r}: {line} ms; rectangle held {selected} images", flush=True)
                if r > 0:
                    for k, v in got.items():
                        figures[k].append(v)
                    for k, v in round_calls.items():
                        calls[k].extend(v)
                    out["selected"].append(selected)
            if not out["figures"]:  # the bucket of 5,000 (it labels its members, so the curate rounds come first)
                for i in range(0, len(members), 1000):
                    api.call("POST", f"/buckets/{big}/images", json={"image_ids": members[i:i + 1000]})
            for r in range(repeat + 1):
                page.goto(base + "/#sql")
                page.reload()
                page.wait_for_selector("#sql-presets button")
                took = _timed(page, f"location.hash = '#buckets/{big}'", """() => {
                    const imgs = [...document.querySelectorAll('#bucket-members .cell img')];
                    return performance.getEntriesByName('bucket-page-shown').length > 0 && imgs.length >= Math.min(56, %d)
                           && imgs.every((i) => i.complete && i.naturalWidth > 0); }""" % len(members))
                print(f"  {label} {vp} bucket page round {r}: {took:.0f} ms", flush=True)
                if r > 0:
                    figures["bucket page -> first page"].append(took)
            context.close()
            out["figures"][vp] = figures
            out["requests"][vp] = calls
        api.call("DELETE", f"/buckets/{big}")
    out["bucket_members"] = len(members)
    return out


def _model(lake) -> str:
    """The model with the most features (the embed job's, or the imported one)."""
    import duckdb

    from lake.commit import open_table

    con = duckdb.connect()
    con.register("features", open_table(lake, "features").to_pyarrow_dataset())
    return con.execute("SELECT model FROM features GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1").fetchone()[0]


def _old_tree(rev: str, into: Path) -> Path:
    """The repository at ``rev`` (git archive), to serve the baseline dashboard and API from."""
    import subprocess

    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _breakdown(calls: list[tuple[str, float, float]], rounds: int) -> str:
    """Per route: requests per round, median server wait and round trip."""
    med = statistics.median
    by: dict[str, list[tuple[float, float]]] = {}
    for route, wait, total in calls:
        by.setdefault(route, []).append((wait, total))
    return "; ".join(f"{route} x{len(v) / max(1, rounds):.1f} {med(w for w, _ in v):.0f}/{med(t for _, t in v):.0f}"
                     for route, v in sorted(by.items()))


def workflow_main(args) -> None:
    from playwright.sync_api import sync_playwright

    from jobs.pipeline import PipelineRequest, run_pipeline
    from lake.catalog import Lake
    from lake.settings import Settings

    viewports = [tuple(int(x) for x in v.split("x")) for v in args.viewports.split(",")]
    results = []
    load_before = os.getloadavg()
    with sync_playwright() as p, tempfile.TemporaryDirectory(prefix="imagelake-dash-") as tmp:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        old = _old_tree(args.old_rev, Path(tmp) / "old") if args.old_rev else None
        lakes = ([("baseline", args.baseline_n, 1)] if args.baseline_n else []) + [("measured", args.n, 0)]
        try:
            for label, n, seed in lakes:
                t0 = time.perf_counter()
                if args.import_embeddings:
                    from bench_browse import build_imported

                    source = build_imported(n, seed=seed)
                else:
                    source = fashion.build(n, seed=seed)
                print(f"{label}: lake of {n} images ready in {time.perf_counter() - t0:.1f} s ({source})", flush=True)
                lake_dir = Path(tmp) / label / "lake"
                shutil.copytree(source, lake_dir, ignore=shutil.ignore_patterns("artifacts"))
                lake = Lake.at(lake_dir)
                t0 = time.perf_counter()
                run_pipeline(lake, Settings(lake=lake.root, runner="local"),
                             PipelineRequest(steps=("suggest", "grid"), model=_model(lake)))
                print(f"  {label}: suggest and grid steps in {time.perf_counter() - t0:.1f} s", flush=True)
                trees = ([(f"{label} {args.old_rev}", old)] if old and label == "measured" else []) + [(label, REPO)]
                merged: dict[str, dict] = {}
                for vp in viewports:  # old and new tree take turns, one viewport at a time (the load drifts)
                    for name, tree in trees:
                        got = workflow(lake_dir, args.repeat, args.workers, browser, name, tree, [vp])
                        if name not in merged:
                            merged[name] = got
                        else:
                            for k in ("figures", "requests"):
                                merged[name][k].update(got[k])
                            merged[name]["selected"] += got["selected"]
                results.extend(merged.values())
                shutil.rmtree(lake_dir.parent)
        finally:
            browser.close()
    load_after = os.getloadavg()
    med = statistics.median
    print()
    print(machine())
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (cores: {os.cpu_count()}); "
          f"server: {args.workers} gunicorn workers; Chromium; {args.repeat} rounds after a warm-up round; "
          f"embeddings: {'imported (synthetic)' if args.import_embeddings else 'the embed job'}")
    for width, height in viewports:
        vp = f"{width}x{height}"
        print(f"\ncuration workflow at {vp}, median ms (p90) per lake and tree")
        header = f"{'step':<28}{'target':>8}" + "".join(f"{m['label'] + ' ' + str(m['images']):>26}" for m in results)
        print(header)
        for k, target in WORKFLOW_TARGETS.items():
            cells = "".join(f"{med(m['figures'][vp][k]):>16.0f} ({_pct(m['figures'][vp][k], 0.9):>6.0f})" for m in results)
            print(f"{k:<28}{target:>8}{cells}")
        print("requests per step (route xper-round server-wait/round-trip ms, medians):")
        for m in results:
            for k, calls in m["requests"][vp].items():
                print(f"  {m['label']:<22} {k:<16} {_breakdown(calls, args.repeat)}")
    for m in results:
        print(f"{m['label']}: the rectangle held {med(m['selected']):.0f} images (median); bucket page of "
              f"{m['bucket_members']} members")
    big = results[-1]
    for width, height in viewports:
        vp = f"{width}x{height}"
        missed = [k for k, t in WORKFLOW_TARGETS.items() if med(big["figures"][vp][k]) > t]
        print(f"targets at {big['images']} images, {vp}: " + ("all met" if not missed else "NOT met: " + ", ".join(missed)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=70000, help="images in the measured Fashion-MNIST lake")
    ap.add_argument("--baseline-n", type=int, default=1000, help="images in the baseline lake")
    ap.add_argument("--repeat", type=int, default=9, help="timed loads per lake (after one first load)")
    ap.add_argument("--workers", type=int, default=2, help="server worker processes")
    ap.add_argument("--workflow", action="store_true", help="the curation workflow figures (issue 18) instead")
    ap.add_argument("--import-embeddings", action="store_true",
                    help="--workflow on lakes with imported synthetic embeddings (no embed job)")
    ap.add_argument("--old-rev", default="",
                    help="--workflow: also serve the large lake from this git revision first (the before of a change)")
    ap.add_argument("--viewports", default="1366x768,1920x1080", help="--workflow: browser window sizes, comma-separated")
    args = ap.parse_args()
    if not fashion.available():
        sys.exit("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    if not shutil.which(CHROMIUM):
        sys.exit(f"{CHROMIUM} is not installed (apt-get install chromium)")
    if args.workflow:
        return workflow_main(args)
    from playwright.sync_api import sync_playwright

    results = []
    load_before = os.getloadavg()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            for label, n, seed in (("baseline", args.baseline_n, 1), ("measured", args.n, 0)):
                t0 = time.perf_counter()
                source = fashion.build(n, seed=seed)
                print(f"{label}: lake of {n} Fashion-MNIST images ready in {time.perf_counter() - t0:.1f} s "
                      f"({source})", flush=True)
                with tempfile.TemporaryDirectory(prefix="imagelake-dash-") as tmp:
                    lake_dir = Path(tmp) / "lake"
                    shutil.copytree(source, lake_dir, ignore=shutil.ignore_patterns("artifacts"))
                    results.append(measure(lake_dir, args.repeat, args.workers, browser, label))
                    if label == "measured":
                        lookups = thumbnail_lookups(lake_dir)
        finally:
            browser.close()
    load_after = os.getloadavg()

    print()
    print(machine())
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (cores: {os.cpu_count()}); "
          f"server: {args.workers} gunicorn workers; Chromium {CHROMIUM}, 1280x860, a fresh context per load")
    print("\ncuration view load (navigation start -> all 28 grid thumbnails decoded), milliseconds")
    print(f"{'lake':<10}{'images':>8}  {'median':>8}  {'p90':>6}  {'first load':>10}  {'1st cell':>7}  "
          f"{'sugg. srv':>9}  {'sugg rtt':>7}  {'suggest step s':>8}")
    for m in results:
        print(_row(m))
    base, big = results
    ratio = statistics.median(big["loads"]) / statistics.median(base["loads"])
    ok = statistics.median(big["loads"]) <= TARGET_MS
    med = statistics.median
    print(f"\nthumbnail point lookup at {big['images']} images ({lookups['files']} data files, "
          f"{len(lookups['sql_ms'])} random ids, 256 px, in process): SQL over the Parquet files "
          f"{med(lookups['sql_ms']):.2f} ms median vs index {med(lookups['idx_ms']):.2f} ms "
          f"({med(lookups['sql_ms']) / med(lookups['idx_ms']):.0f}x); index of {lookups['rows']} rows built in "
          f"{lookups['build_s']:.2f} s")
    print(f"\nratio measured/baseline (median load): {ratio:.2f}x for {big['images'] / base['images']:.0f}x the images")
    print(f"target: curation view loads in <= {TARGET_MS:.0f} ms with {big['images']} images: "
          f"{'met' if ok else 'NOT met'} (median {statistics.median(big['loads']):.0f} ms, "
          f"worst {max(big['loads']):.0f} ms, first load after server start {big['first_load']:.0f} ms)")


if __name__ == "__main__":
    main()
