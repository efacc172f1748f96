"""POST /images on a small lake: time per upload (median of ``--uploads``), and its steps.

A lake of ``--n`` photo-like JPEGs (tests/bench/common.py) is ingested, embedded (ort-fp32) and
indexed (IVF-PQ, ``flat_below=0``) with the real jobs and a local runner; then ``--uploads`` new
images are POSTed one after the other through the real Flask app (test client: the request path
without a socket). Side by side, interleaved with them, the same number of uploads go through the
**baseline**: the request path before the in-process ingest (the same steps, with the one-file
ingest job on a local runner and the features commit inside a ``job_run``; the key-lookup dedupe
of :func:`lake.commit.commit_rows` helps both). Prints the machine, the load,
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


def _job_ingest(lake, settings, uri: str, collection: str) -> None:
    """The upload's ingest before the in-process path: the ingest job over a one-line list file."""
    import uuid

    from jobs.ingest.driver import run_ingest
    from jobs.runner import LocalRunner

    listing = os.path.join(os.path.dirname(uri), f".list-{uuid.uuid4().hex}.txt")
    with open(listing, "w") as f:
        f.write(uri + "\n")
    try:
        run_ingest(lake, settings, listing, collection=collection, runner=LocalRunner())
    finally:
        os.remove(listing)


def _job_embed(lake, image_id: str, model_key: str, vector, logits) -> None:
    """The upload's features commit before: inside a job_run (a running and an ended job_runs commit)."""
    from jobs.add_image import _embed
    from jobs.runs import job_run

    with job_run(lake, "embed", {"model": model_key, "source": "upload", "image_id": image_id}):
        _embed(lake, image_id, model_key, vector, logits)


def baseline(app, lake, settings, data: bytes) -> tuple[dict, float]:
    """One upload through the request path before the in-process ingest (the route's steps with the
    one-file ingest job and the job_run-wrapped features commit), timed as the route ran it."""
    import pyarrow.compute as pc

    from api.upload_overlay import MAX_OVERLAY
    from api.uploads import check_image
    from jobs import add_image as steps
    from lake.commit import ensure_tables, open_table
    from lake.lock import LakeLock

    with app.app_context():
        from api.index_service import search_service
        from api.services import lake_reader
        from api.uploads import upload_embedder

        t0 = time.perf_counter()
        fmt, _, _ = check_image(data, max_pixels=settings.upload_max_pixels)
        sha = hashlib.sha256(data).hexdigest()
        service = search_service()
        build = service.build()
        key = build.model
        emb = upload_embedder().embed(data, key)
        ensure_tables(lake, ["images", "sources", "thumbnails", "rejects", "features", "job_runs"])
        seconds = {}
        with LakeLock(lake, "upload", timeout=steps.UPLOAD_LOCK_S, holder="bench baseline"):
            t1 = time.perf_counter()
            uri, _ = steps.store_upload(lake, sha, fmt, data)
            _job_ingest(lake, settings, uri, steps.DEFAULT_COLLECTION)
            assert steps._image_row(lake, sha) is not None
            seconds["ingest"] = round(time.perf_counter() - t1, 3)
            t1 = time.perf_counter()
            if not steps._has_features(lake, sha, key):
                _job_embed(lake, sha, key, emb.vector, emb.logits)
            seconds["embed"] = round(time.perf_counter() - t1, 3)
            t1 = time.perf_counter()
            seq = open_table(lake, "images").to_pyarrow_dataset().to_table(
                columns=["seq"], filter=pc.field("image_id") == sha).column("seq").to_pylist()[0]
            if service.overlay.pending(key) < MAX_OVERLAY:
                service.overlay.add(key, int(seq), sha, emb.vector, build)
            seconds["index"] = round(time.perf_counter() - t1, 3)
        lake_reader().refresh(force=True)
        return {"seconds": seconds, "index_action": "overlay"}, time.perf_counter() - t0


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
    print(f"baseline (one-file ingest job + job_run embed + overlay): median {statistics.median(base_times):.3f} s over "
          f"{len(base_times)} uploads (min {min(base_times):.3f}, max {max(base_times):.3f})")
    for k in sorted({k for s in base_steps for k in s}):
        print(f"  step {k}: median {statistics.median(s.get(k, 0.0) for s in base_steps):.3f} s")
    print(f"POST /images: median {statistics.median(times):.3f} s over {len(times)} uploads "
          f"(min {min(times):.3f}, max {max(times):.3f}); searchable at once: {searchable}/{len(times)}")
    for k in sorted({k for s in steps for k in s}):
        print(f"  step {k}: median {statistics.median(s.get(k, 0.0) for s in steps):.3f} s")


if __name__ == "__main__":
    main()
