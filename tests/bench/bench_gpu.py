"""The GPU path in one run, sized to finish in under 5 minutes on one GPU: ``make bench-gpu``.

    PYTHONPATH=. python tests/bench/bench_gpu.py [--n 10000] [--index-n 1000000] [--batch 256]

**Not verified on a GPU yet** (written on machines without one; see README, "GPU"). On a machine
without a CUDA GPU it prints why and exits 0. Prints, with the machine (GPU, CPU, versions):

  decode-only   JPEG decode + resize on the GPU (``jobs.embed.gpu_decode.decode_batch``, nvJPEG via
                torchvision), files already in memory, batches of ``--batch``; the CPU decoder's rate
                beside it (one process, for scale);
  model-only    the CUDA runtime (torch, bf16 where supported, channels_last) on pre-decoded batches
                already on the device;
  e2e           ``run_embed --device cuda`` over ``--n`` generated 640x480 JPEGs in a Delta lake, in
                process (read, GPU decode, model, staged writes, commit), and e2e / model-only;
  quality       the GPU path's embeddings against ONNX Runtime fp32 on the CPU path, 64 images:
                recall@10, top-1 agreement, least cosine;
  index build   ``--index-n`` x 1280 float32 vectors (synthetic, clustered), the index job's own
                plan for that size (``jobs.index.plan.choose_plan``), trained and encoded with
                ``jobs.index.gpu`` (faiss-gpu); skipped with a message when FAISS sees no GPU.

Targets on one H100-class GPU: e2e >= 3,000 img/s; index build of 1M x 1280 <= 60 s.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _gen_chunk(args):
    from bench_embed import generate

    folder, start, n = args
    sub = os.path.join(folder, f"part-{start:07d}")
    os.makedirs(sub, exist_ok=True)
    return generate(sub, n, seed=start)


def generate_parallel(folder: str, n: int) -> list[str]:
    """``n`` 640x480 JPEGs (bench_embed's photo crops), generated on every core."""
    cores = os.cpu_count() or 1
    step = max(1, min(2000, -(-n // cores)))
    jobs = [(folder, s, min(step, n - s)) for s in range(0, n, step)]
    with ProcessPoolExecutor(cores) as pool:
        return [p for chunk in pool.map(_gen_chunk, jobs) for p in chunk]


def _sync():
    import torch

    torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="images for decode and e2e (default 10000)")
    ap.add_argument("--index-n", type=int, default=1_000_000, help="vectors for the index build (default 1M)")
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    try:
        import torch
    except ImportError:
        print("no GPU: torch is not installed (pip install '.[gpu]'); nothing measured")
        return 0
    if not torch.cuda.is_available():
        print("no GPU: torch sees no CUDA device on this machine; nothing measured "
              "(run `make bench-gpu` on a GPU machine)")
        return 0

    from jobs.embed import get_model, run_embed
    from jobs.embed.decode import decode_image
    from jobs.embed.gpu_decode import decode_batch, gpu_decode_available
    from jobs.embed.runtime import TorchRuntime, cpu_info, gate
    from jobs.index import gpu as index_gpu
    from jobs.runner import LocalRunner
    from lake.catalog import Lake
    from lake.commit import commit_rows, ensure_tables, open_table
    from lake.settings import Settings

    spec = get_model("efficientnet-lite0")
    try:
        import torchvision
        tv = torchvision.__version__
    except ImportError:
        tv = "not installed (decode falls back to the CPU)"
    import faiss
    print(f"gpu: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB; "
          f"cpu: {cpu_info()['model']}, {os.cpu_count()} cores")
    print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {tv}, faiss {faiss.__version__} "
          f"(GPUs seen by FAISS: {index_gpu.gpu_count()})", flush=True)
    device = "cuda:0"

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        t0 = time.perf_counter()
        paths = generate_parallel(os.path.join(tmp, "images"), args.n)
        blobs = [open(p, "rb").read() for p in paths]
        print(f"generated {len(paths)} 640x480 JPEGs in {time.perf_counter() - t0:.1f} s", flush=True)

        # -- decode only -----------------------------------------------------------------------
        on_gpu = gpu_decode_available(device)
        decode_batch(blobs[:args.batch], spec.input_size, spec.crop_fraction, device)  # warm-up
        _sync()
        t0 = time.perf_counter()
        for i in range(0, len(blobs), args.batch):
            decode_batch(blobs[i:i + args.batch], spec.input_size, spec.crop_fraction, device)
        _sync()
        dec = len(blobs) / (time.perf_counter() - t0)
        n_cpu = min(500, len(blobs))
        t0 = time.perf_counter()
        for b in blobs[:n_cpu]:
            decode_image(b, spec.input_size, spec.crop_fraction)
        dec_cpu = n_cpu / (time.perf_counter() - t0)
        print(f"decode-only: {dec:.0f} img/s on {'the GPU (nvJPEG)' if on_gpu else 'the CPU (no GPU decoder!)'}, "
              f"batch {args.batch}; CPU decoder, one process: {dec_cpu:.0f} img/s", flush=True)

        # -- model only ------------------------------------------------------------------------
        runtime = TorchRuntime(spec, device)
        pool = torch.stack([t for t in decode_batch(blobs[:args.batch], spec.input_size, spec.crop_fraction, device)])
        for _ in range(3):
            runtime.embed(pool)
        _sync()
        reps = max(10, 20_000 // args.batch)
        t0 = time.perf_counter()
        for _ in range(reps):
            runtime.embed(pool)
        _sync()
        model = reps * len(pool) / (time.perf_counter() - t0)
        print(f"model-only: {model:.0f} img/s ({runtime.name}, batch {args.batch})", flush=True)

        # -- end to end ------------------------------------------------------------------------
        lake = Lake.at(os.path.join(tmp, "lake")).ensure()
        ensure_tables(lake)
        commit_rows(lake, "images", [dict(image_id=hashlib.sha256(b).hexdigest(), seq=i, uri=p, collection="bench",
                                          format="JPEG", width=640, height=480, bytes=len(b))
                                     for i, (p, b) in enumerate(zip(paths, blobs))], run_id="bench-ingest")
        settings = Settings(runner="local")
        t0 = time.perf_counter()
        summary = run_embed(lake, settings, runner=LocalRunner(), device="cuda", batch_size=args.batch)
        e2e_s = time.perf_counter() - t0
        e2e = summary["embedded"] / e2e_s
        print(f"e2e: {e2e:.0f} img/s ({summary['embedded']} images in {e2e_s:.1f} s, key {summary['model']}, "
              f"runtimes {summary['runtimes']}, decode wait {summary['decode_ms_per_image']:.3f} ms/img, "
              f"model {summary['model_ms_per_image']:.3f} ms/img); e2e/model-only = {e2e / model:.2f}", flush=True)

        # -- quality against the CPU fp32 path -------------------------------------------------
        rows = {r["image_id"]: r for r in open_table(lake, "features").to_pyarrow_table().to_pylist()}
        ids = [hashlib.sha256(b).hexdigest() for b in blobs[:64]]
        gpu_emb = np.stack([rows[i]["embedding"] for i in ids]).astype(np.float32)
        from jobs.embed.artifact import ensure_onnx
        from jobs.embed.runtime import OnnxRuntime
        cpu_rt = OnnxRuntime(ensure_onnx(lake.artifacts_dir(), spec), threads=os.cpu_count() or 1)
        cpu_emb, cpu_logits = cpu_rt.embed(np.stack([decode_image(b, spec.input_size, spec.crop_fraction)
                                                     for b in blobs[:64]]))
        _, gpu_logits = runtime.embed(torch.stack(decode_batch(blobs[:64], spec.input_size, spec.crop_fraction,
                                                               device)))
        g = gate((cpu_emb, cpu_logits), (gpu_emb, gpu_logits))
        print(f"quality vs CPU ort-fp32 (64 images): recall@10 = {g['recall10']:.3f}, top-1 = {g['top1']:.3f}, "
              f"least cosine {g['cosine_min']:.4f}", flush=True)

    # -- index build at 1M -------------------------------------------------------------------------
    if index_gpu.gpu_count() == 0:
        print("index build: skipped: FAISS sees no GPU (faiss-cpu installed? pip install '.[gpu]')")
    else:
        from jobs.index.plan import choose_plan
        from lake.settings import Settings as S

        d, n = 1280, args.index_n
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        centres = rng.normal(size=(1024, d)).astype(np.float32)
        x = np.empty((n, d), np.float32)
        for lo in range(0, n, 100_000):
            hi = min(n, lo + 100_000)
            x[lo:hi] = centres[rng.integers(0, len(centres), hi - lo)] + 0.5 * rng.standard_normal((hi - lo, d), np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        gen_s = time.perf_counter() - t0
        budget = S().index_memory_mb * 2**20 if hasattr(S(), "index_memory_mb") else 4 * 2**30
        plan = choose_plan(n, d, budget)
        index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
        sample = x[rng.choice(n, min(n, plan.train_n), replace=False)]
        t0 = time.perf_counter()
        index = index_gpu.train(index, sample)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = index_gpu.add_with_ids(index, x, np.arange(n, dtype=np.int64))
        encode_s = time.perf_counter() - t0
        print(f"index build {n:,} x {d} ({plan.factory}, train on {len(sample):,}): train {train_s:.1f} s + "
              f"encode {encode_s:.1f} s = {train_s + encode_s:.1f} s (target <= 60 s; vectors made in {gen_s:.1f} s, "
              f"not counted); ntotal {index.ntotal:,}", flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
