"""Static int8 quantization of an exported model, calibrated on the lake's own images.

The recipe (:class:`Int8Recipe`, chosen per CPU by :func:`default_recipe`) is QDQ with per-channel
signed int8 weights and unsigned int8 activations (MinMax calibration), with

* the **stem** (the first convolution, which sees raw pixels) and the **head** (the last
  convolution and the classifier that produces an output) kept in float: they are the layers
  whose quantization error every later layer, or every output, inherits;
* **7-bit weights** (``reduce_range``) on CPUs without VNNI (AVX2-only x86 such as AMD Zen 3):
  there ONNX Runtime's u8 x s8 kernels multiply-add pairs into int16 (``vpmaddubsw``), which
  saturates with 8-bit weights (255 * 127 * 2 > 32767) and wrecks some channels (least cosine to
  fp32 0.50 instead of 0.84 on the photo crops here). VNNI and AMX-INT8 accumulate in int32 and
  keep the full 8 bits;
* calibration on up to :data:`INT8_CALIBRATION_N` images, in batches of 16. MinMax keeps only each
  tensor's per-batch minimum and maximum, so memory stays small; percentile and entropy
  calibration keep histograms of every activation (15 GB at 256 images here) and are not used.

Measured on EfficientNet-Lite0 none of the variants passes the quality gate (README, "Embedding
runtimes"); the recipe is what the gate is offered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

__all__ = ["Int8Recipe", "default_recipe", "float_nodes", "quantize_int8", "INT8_CALIBRATION_N"]

#: Most images the int8 model is calibrated on (the gate's sample is apart from them where the lake
#: has enough images).
INT8_CALIBRATION_N = 256

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class Int8Recipe:
    """How the int8 model is made. ``keep_float_ends``: the stem and the head stay float;
    ``reduce_range``: 7-bit weights (no int16 saturation on CPUs without VNNI)."""

    keep_float_ends: bool = True
    reduce_range: bool = False
    float_depthwise: bool = False   # depthwise convolutions (group == channels) stay float too
    quantize_eltwise: bool = True   # also quantize Add/Clip/Relu (else only Conv/Gemm/MatMul)

    def describe(self) -> str:
        return ("QDQ, per-channel s8 weights" + (" (7-bit range)" if self.reduce_range else "")
                + ", u8 activations, MinMax" + (", stem and head in float" if self.keep_float_ends else "")
                + (", depthwise convs in float" if self.float_depthwise else "")
                + ("" if self.quantize_eltwise else ", Add/Clip/Relu in float"))


def default_recipe(flags: list[str] | set[str] | None = None) -> Int8Recipe:
    """The recipe for a CPU with ``flags`` (default: this machine's): 7-bit weights without VNNI."""
    if flags is None:
        from jobs.embed.runtime import cpu_info
        flags = cpu_info()["flags"]
    return Int8Recipe(reduce_range=not (set(flags) & set(_VNNI_FLAGS)))


def float_nodes(model_path: str, depthwise: bool = False) -> list[str]:
    """Names of the nodes the recipe keeps in float: the first Conv (the stem), the last Conv, and
    every Gemm/MatMul whose output is a graph output (the classifier); with ``depthwise`` also
    every depthwise Conv (``group`` > 1)."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    outputs = {o.name for o in model.graph.output}
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    heads = [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul") and set(n.output) & outputs]
    grouped = [n.name for n in model.graph.node if n.op_type == "Conv" and depthwise
               and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    return list(dict.fromkeys(convs[:1] + convs[-1:] + heads + grouped))


def quantize_int8(fp32_path: str, out_path: str, calibration: np.ndarray, batch: int = 16,
                  recipe: Int8Recipe | None = None) -> Int8Recipe:
    """Quantize the model at ``fp32_path`` into ``out_path`` (QDQ), calibrated on ``calibration``
    (uint8 NHWC images of the lake), following ``recipe`` (default: :func:`default_recipe`).
    The uint8 input, its cast and the normalisation stay float. Returns the recipe used."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    recipe = recipe or default_recipe()

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": calibration[i:i + batch]} for i in range(0, len(calibration), batch)])

        def get_next(self):
            return next(self.batches, None)

    pre = out_path + ".pre.onnx"
    try:
        quant_pre_process(fp32_path, pre, skip_symbolic_shape=True)
        quantize_static(pre, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Gemm", "MatMul"]
                        + (["Add", "Clip", "Relu"] if recipe.quantize_eltwise else []),
                        nodes_to_exclude=float_nodes(pre, recipe.float_depthwise) if recipe.keep_float_ends else [],
                        reduce_range=recipe.reduce_range,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    finally:
        if os.path.exists(pre):
            os.remove(pre)
    return recipe
