"""Filtered Browse pages before and after the per-filter seq index (issue 18), in process, side by side.

    python tests/bench/bench_browse.py [--n 20000] [--pages 10] [--repeat 3]

The lake: ``n`` Fashion-MNIST images (real PNGs through the real ingest) with *imported* synthetic
embeddings (``imagelake embed --import`` of bench_million's mixture, with concept probabilities),
then the ``tag`` step (concept tags); built once and cached under
``test-artifacts/fashion-<n>-s<seed>-import/`` (:func:`build_imported`, also what
``bench_dashboard.py --import-embeddings`` uses: minutes instead of the ~10 min of embedding at 70k).

For each filter — a tag (the most common concept tag), a bucket of 5,000 members, a metadata
filter matching every image (``{"format": "PNG"}``) and a folder — it pages ``--pages`` pages of 60
(offset 0, 60, ...) through ``api.browse_filters.filtered_page``:

- **before**: the module at git ``BEFORE`` (loaded under another name): the per-filter seq index,
  with a bucket's or cluster's members bound as one list parameter (session 10; before that,
  88da612, every page ran the filter twice);
- **after**: the current module: id lists join as Arrow tables registered on the cursor; the first
  page runs the filter once and keeps its seqs, later pages are a slice and one seq range read
  (kept indexes are cleared before each repetition, so every repetition's page 1 is cold).

Printed: milliseconds for page 1 and the median of pages 2..N, before and after, and the ratio,
with the machine and the load average.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "tests"), str(REPO)]

from common import machine  # noqa: E402

BEFORE = "39d0b30"  # session 11 start: id lists bound as one list parameter (88da612: one DuckDB query per page)
MODEL = "bench-synthetic@1"


def build_imported(n: int, seed: int = 0) -> Path:
    """A lake of ``n`` Fashion-MNIST images with imported synthetic embeddings and concept tags."""
    import fashion
    from bench_million import write_embeddings
    from lake.commit import open_table

    folder = REPO / "test-artifacts" / f"fashion-{n}-s{seed}-import"
    lake_dir = folder / "lake"
    if (folder / "ready").is_file():
        return lake_dir
    t0 = time.perf_counter()
    lake, _ = fashion.ingest_sample(n, folder, seed)
    print(f"  ingested {n} PNGs in {time.perf_counter() - t0:.1f} s", flush=True)
    uris = sorted(open_table(lake, "sources").to_pyarrow_table(columns=["uri"]).column("uri").to_pylist())
    emb = folder / "embeddings.parquet"
    write_embeddings(emb, uris, seed=seed)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for args in (("embed", "--import", str(emb), "--model", MODEL), ("tag", "--model", MODEL)):
        subprocess.run([sys.executable, "-m", "imagelake", "--lake", str(lake_dir), "--runner", "local", *args],
                       cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    emb.unlink()
    (folder / "ready").write_text("ok\n")
    print(f"  lake of {n} images (imported embeddings, tags) built in {time.perf_counter() - t0:.1f} s", flush=True)
    return lake_dir


def _old_module():
    """api/browse_filters.py as of BEFORE, as the module ``old_browse_filters`` (None without git)."""
    try:
        text = subprocess.run(["git", "show", f"{BEFORE}:api/browse_filters.py"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "old_browse_filters.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_browse_filters", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--pages", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from werkzeug.datastructures import MultiDict

    from api import browse_filters, create_app
    from lake.catalog import Lake
    from lake.settings import Settings
    from lake.tokens import create_token

    lake_dir = build_imported(args.n)
    old = _old_module()
    app = create_app(Settings(lake=str(lake_dir), runner="local", refresh_s=3600.0), {"TESTING": True})
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {create_token(Lake.at(lake_dir), 'curate', 'bench')[1]}"
    every = [i["image_id"] for o in range(0, args.n, 500)
             for i in client.get(f"/api/v1/images?limit=500&offset={o}").get_json()["images"]]
    bucket = client.post("/api/v1/buckets", json={"name": f"browse bench {time.time():.0f}"}).get_json()["bucket"]["bucket_id"]
    for s in range(0, 5000, 1000):
        client.post(f"/api/v1/buckets/{bucket}/images", json={"image_ids": every[s:s + 1000]})
    choices = client.get("/api/v1/browse/filters").get_json()
    tag = choices["tags"][0]
    folder = choices["folders"][0]
    filters = {f"tag {tag['tag']} ({tag['images']} images)": {"tag": tag["tag"]},
               f"bucket (5,000 members)": {"bucket": bucket},
               'where {"format": "PNG"} (every image)': {"where": '{"format": "PNG"}'},
               f"folder ({folder['images']} images)": {"folder": folder["folder"]}}
    load0 = os.getloadavg()[0]
    rows = []
    with app.app_context():
        for name, f in filters.items():
            got = {}
            for label, module in (("before", old), ("after", browse_filters)):
                if module is None:
                    continue
                firsts, rest, seen = [], [], None
                for _ in range(args.repeat):
                    for m in (module, browse_filters):  # both modules keep indexes now: page 1 cold in each
                        getattr(m, "_indexes", {}).clear()
                    pages = []
                    for p in range(args.pages):
                        t = time.perf_counter()
                        body = module.filtered_page(MultiDict(f), limit=60, offset=60 * p)
                        pages.append((time.perf_counter() - t) * 1000)
                        ids = [i["image_id"] for i in body["images"]]
                        seen = seen if p else (ids, body["total"], body["collections"])
                    firsts.append(pages[0])
                    rest.extend(pages[1:])
                got[label] = (statistics.median(firsts), statistics.median(rest) if rest else float("nan"), seen)
            if "before" in got:
                assert got["before"][2] == got["after"][2], f"{name}: before and after answer differently"
            rows.append((name, got))
            line = "  ".join(f"{k} page 1 {v[0]:.1f} ms, pages 2-{args.pages} {v[1]:.1f} ms" for k, v in got.items())
            print(f"{name}: {line}", flush=True)
    print()
    print(machine())
    print(f"n = {args.n} images (Fashion-MNIST, imported embeddings); load average {load0:.2f} -> "
          f"{os.getloadavg()[0]:.2f} (cores: {os.cpu_count()}); {args.pages} pages of 60 x {args.repeat} repetitions, "
          "in process (no HTTP); medians")
    print(f"{'filter':<44}{'before p1':>10}{'after p1':>10}{'before p2+':>11}{'after p2+':>10}{'ratio p2+':>10}")
    for name, got in rows:
        b, a = got.get("before"), got["after"]
        if b:
            print(f"{name:<44}{b[0]:>10.1f}{a[0]:>10.1f}{b[1]:>11.1f}{a[1]:>10.1f}{b[1] / a[1]:>9.1f}x")
        else:
            print(f"{name:<44}{'-':>10}{a[0]:>10.1f}{'-':>11}{a[1]:>10.1f}")


if __name__ == "__main__":
    main()
