"""POST /images on a small lake: time per upload (median of ``--uploads``), and its steps.

A lake of ``--n`` photo-like JPEGs (tests/bench/common.py) is ingested, embedded (ort-fp32) and
indexed (IVF-PQ, ``flat_below=0``) with the real jobs and a local runner; then ``--uploads`` new
images are POSTed one after the other through the real Flask app (test client: the request path
without a socket). Side by side, interleaved with them, the same number of uploads go through the
**baseline**: the request path before the overlay (embed, :func:`jobs.add_image.add_image` with
its ``run_index``, then the worker's forced reload of the new build). Prints the machine, the load,
medians and every upload's seconds, the steps' ``seconds``, and whether each upload was
searchable right after its answer.

    python tests/bench/bench_upload.py [--n 300] [--uploads 10]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common import machine, write_photos  # noqa: E402


def baseline(app, lake, settings, data: bytes) -> tuple[dict, float]:
    """One upload through the pre-overlay request path, timed as the route ran it."""

    from api.uploads import check_image
    from jobs.add_image import add_image

    with app.app_context():
        from api.index_service import search_service
        from api.uploads import upload_embedder

        t0 = time.perf_counter()
        fmt, _, _ = check_image(data, max_pixels=settings.upload_max_pixels)
        service = search_service()
        key = service.build().model
        emb = upload_embedder().embed(data, key)
        result = add_image(lake, settings, data, hashlib.sha256(data).hexdigest(), fmt, key, emb.vector, emb.logits)
        if result.indexed:
            service.refresh(force=True)
        return result.as_dict(), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--uploads", type=int, default=10, help="uploads per path (new and baseline)")
    args = ap.parse_args()
    os.environ.setdefault("IMAGELAKE_EMBED_RUNTIME", "ort-fp32")

    from api import API_PREFIX, create_app
    from jobs.embed import run_embed
    from jobs.index.driver import run_index
    from jobs.ingest.driver import run_ingest
    from jobs.runner import LocalRunner
    from lake.catalog import Lake
    from lake.settings import Settings
    from lake.tokens import create_token

    print(machine())
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average) on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        folder = Path(tmp, "photos")
        files = sorted(write_photos(folder, args.n + 2 * args.uploads, size=(320, 240)))
        lake_files, new_files = files[:args.n], files[args.n:]
        hold = Path(tmp, "new")
        hold.mkdir()
        for f in new_files:
            f.rename(hold / f.name)
        lake = Lake.at(Path(tmp, "lake")).ensure()
        settings = Settings(lake=lake.root, runner="local", refresh_s=0.0)
        t0 = time.perf_counter()
        run_ingest(lake, settings, str(folder), runner=LocalRunner())
        run_embed(lake, settings, runner=LocalRunner())
        run_index(lake, settings, runner=LocalRunner(), flat_below=0, shard_size=max(100, args.n // 2))
        print(f"setup (ingest + embed + index of {len(lake_files)} images): {time.perf_counter() - t0:.1f} s")
        app = create_app(settings, {"TESTING": True})
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {create_token(lake, 'admin', 'bench')[1]}"
        times, steps, searchable = [], [], 0
        base_times, base_steps = [], []
        for i, f in enumerate(sorted(hold.iterdir())):
            data = f.read_bytes()
            if i % 2 == 0:
                body, took = baseline(app, lake, settings, data)
                base_times.append(took), base_steps.append(body["seconds"])
                print(f"baseline {i}: {took:.3f} s  {body['seconds']}  action={body['index_action']}")
                continue
            t0 = time.perf_counter()
            r = client.post(f"{API_PREFIX}/images", data={"image": (io.BytesIO(data), f.name)})
            times.append(time.perf_counter() - t0)
            assert r.status_code == 201, r.get_data(as_text=True)
            body = r.get_json()
            steps.append(body.get("seconds") or {})
            hit = client.get(f"{API_PREFIX}/search/similar",
                             query_string={"image_id": hashlib.sha256(data).hexdigest(), "k": 3})
            searchable += hit.status_code == 200
            print(f"upload {i}: {times[-1]:.3f} s  {body.get('seconds')}  indexed={body.get('indexed')} "
                  f"action={body.get('index_action')} searchable={hit.status_code == 200}")
        app.extensions["imagelake"].close()
    print(f"baseline (add_image + run_index + reload): median {statistics.median(base_times):.3f} s over "
          f"{len(base_times)} uploads (min {min(base_times):.3f}, max {max(base_times):.3f})")
    for k in sorted({k for s in base_steps for k in s}):
        print(f"  step {k}: median {statistics.median(s.get(k, 0.0) for s in base_steps):.3f} s")
    print(f"POST /images: median {statistics.median(times):.3f} s over {len(times)} uploads "
          f"(min {min(times):.3f}, max {max(times):.3f}); searchable at once: {searchable}/{len(times)}")
    for k in sorted({k for s in steps for k in s}):
        print(f"  step {k}: median {statistics.median(s.get(k, 0.0) for s in steps):.3f} s")


if __name__ == "__main__":
    main()
