"""int8 recipes against the quality gate, side by side with ONNX Runtime fp32 in one run.

    PYTHONPATH=. python tests/bench/bench_int8.py [--n 400] [--calibration 256] [--gate 96]

Generates ``--n`` photo-like JPEGs (bench_embed's crops) into a temporary lake, exports
EfficientNet-Lite0, and quantizes it with each recipe of :data:`RECIPES` (static QDQ, MinMax,
calibrated on ``--calibration`` lake images held out from the gate's ``--gate`` images). For each
it prints the gate's figures against fp32 (``recall@10`` of the embeddings' neighbours, top-1
concept agreement, least cosine; the gate is recall@10 >= 0.98 and top-1 >= 0.98) and its speed
(model only, batch 32, all cores, median batch) beside fp32 timed just before it, with the load,
since the machine may be shared. A recipe is worth shipping only if it passes and is faster.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

from bench_embed import generate, machine, register  # noqa: E402
from jobs.embed import choose, get_model  # noqa: E402
from jobs.embed.artifact import OnnxArtifact, ensure_onnx, read_verified  # noqa: E402
from jobs.embed.quantize import Int8Recipe, quantize_int8  # noqa: E402
from jobs.embed.runtime import build_runtime, measure  # noqa: E402
from lake.catalog import Lake  # noqa: E402

RECIPES = {
    "shipped (stem+head float, 7-bit)": Int8Recipe(reduce_range=True),
    "+ depthwise float": Int8Recipe(reduce_range=True, float_depthwise=True),
    "+ depthwise float, Add/Clip float": Int8Recipe(reduce_range=True, float_depthwise=True, quantize_eltwise=False),
    "depthwise+Add/Clip float, 8-bit": Int8Recipe(reduce_range=False, float_depthwise=True, quantize_eltwise=False),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--gate", type=int, default=96)
    ap.add_argument("--measure-s", type=float, default=2.0)
    ap.add_argument("--only", default="", help="comma-separated recipe numbers (0-based) to run")
    args = ap.parse_args(argv)
    print(machine(), flush=True)
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        os.makedirs(os.path.join(tmp, "images"))
        paths = generate(os.path.join(tmp, "images"), args.n)
        lake = Lake.at(os.path.join(tmp, "lake")).ensure()
        register(lake, paths)
        spec = get_model("efficientnet-lite0")
        fp32 = ensure_onnx(lake.artifacts_dir(), spec)
        gate_images = choose.calibration_images(lake, spec, args.gate)
        calib, held_out = choose.int8_calibration_images(lake, spec, args.calibration)
        print(f"{len(paths)} images; gate sample {len(gate_images)}, calibration {len(calib)} "
              f"({'held out from' if held_out else 'overlapping'} the gate's)", flush=True)
        src = os.path.join(tmp, "fp32.onnx")
        with open(src, "wb") as f:
            f.write(read_verified(fp32))
        ref_rt = build_runtime("ort-fp32", spec, fp32, threads)
        ref_m, ref = measure(ref_rt, gate_images, None, 32, args.measure_s)
        print(f"{'recipe':<40}{'recall@10':>10}{'top-1':>7}{'cos min':>9}{'int8 img/s':>12}{'fp32 img/s':>12}"
              f"{'speed':>7}  load  gate", flush=True)
        only = {int(x) for x in args.only.split(",") if x}
        for i, (name, recipe) in enumerate(RECIPES.items()):
            if only and i not in only:
                continue
            out = os.path.join(tmp, f"int8-{i}.onnx")
            t0 = time.perf_counter()
            quantize_int8(src, out, calib, recipe=recipe)
            q_s = time.perf_counter() - t0
            art = OnnxArtifact(out, hashlib.sha256(open(out, "rb").read()).hexdigest(), spec.key)
            f32, _ = measure(ref_rt, gate_images, None, 32, args.measure_s)  # fp32 timed beside it
            m, _ = measure(build_runtime("ort-int8", spec, art, threads), gate_images, ref, 32, args.measure_s)
            print(f"{name:<40}{m.recall10:>10.3f}{m.top1:>7.3f}{m.cosine_min:>9.4f}{m.img_s:>12.1f}{f32.img_s:>12.1f}"
                  f"{m.img_s / f32.img_s:>6.2f}x {os.getloadavg()[0]:5.1f}  {'pass' if m.passed else 'FAIL'}"
                  f"   (quantized in {q_s:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
