"""Runtimes: one interface, ``embed(images_uint8_nhwc) -> (embeddings, logits)``, two engines.

* :class:`OnnxRuntime` — CPU. onnxruntime on the model exported once to ONNX (see
  :mod:`jobs.embed.artifact`); measured several times faster than torch eager on CPU. Threads are
  matched to the cores one task owns (``spark.task.cpus``; all cores in process).
* :class:`TorchRuntime` — CUDA (bf16, or fp16 where bf16 is unsupported; channels_last; pinned
  host memory and non-blocking copies). Also runs on CPU in float32, which is how its code path is
  tested on machines without a GPU. Given a ``precision`` it computes in exactly that one, on
  either device (the embed driver always gives one, so one run never mixes precisions).

Every runtime says its ``precision`` (``fp32``, ``bf16``, ``fp16``): the part of the features key
(``name@version+bf16``) that tells vectors of different numerics apart.

Runtimes are built once per worker process and cached here by (model, engine, device, threads,
precision): Spark reuses Python workers across tasks, so the model loads once per executor core, not per task.

**The CPU runtime catalog** (:data:`CATALOG`): named ways to compute one model's embeddings on a
CPU — ``ort-fp32`` (the reference), ``ort-int8`` (ONNX Runtime on a static QDQ int8 model
calibrated on a sample of the lake's own images, :func:`quantize_int8`), ``openvino-fp32``,
``openvino-bf16``, ``openvino-int8`` (where the ``openvino`` package is installed; bf16 where the
CPU has AMX or AVX512-BF16), ``torch-bf16`` (where the CPU has AMX or AVX512-BF16) and
``torch-fp32`` (never chosen by measurement: the slowest, kept for ``--runtime``).
:func:`measure` times one on a calibration batch and scores it against ``ort-fp32`` on the same
images (:func:`gate`: recall@10 of its embeddings, top-1 concept agreement); the embed driver keeps
the fastest that passes (:mod:`jobs.embed.choose`).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from jobs.embed.artifact import OnnxArtifact, read_verified
from jobs.embed.models import Embedder, ModelSpec
from jobs.embed.quantize import quantize_int8  # noqa: F401  (re-exported; it lives in its own module)
from lake.errors import BadInput

__all__ = ["Runtime", "OnnxRuntime", "OpenVinoRuntime", "TorchRuntime", "get_runtime", "resolve_device",
           "cuda_available", "reduced_precision", "CATALOG", "CatalogEntry", "cpu_info", "machine_id",
           "runtime_available", "build_runtime", "quantize_int8", "measure", "gate", "Measurement",
           "recall_at_k", "top1_agreement", "RECALL_MIN", "TOP1_MIN"]

Device = Literal["auto", "cpu", "cuda"]


class Runtime(Protocol):
    name: str
    precision: str

    def embed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``images``: uint8 ``[N, S, S, 3]`` RGB. Returns float32 ``[N, D]`` and ``[N, classes]``."""
        ...


def cuda_available() -> bool:
    """Whether torch sees a GPU. Without an NVIDIA driver node this answers without importing
    torch (a 1-2 s import, per Spark worker, that a CPU-only executor does not need)."""
    if not os.path.exists("/dev/nvidiactl") and not os.environ.get("IMAGELAKE_PROBE_CUDA"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_device(device: Device) -> Literal["cpu", "cuda"]:
    """``auto`` means CUDA when this process sees a GPU, else CPU.

    Raises:
        BadInput: ``cuda`` was asked for and no GPU is visible.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise BadInput(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise BadInput("device 'cuda' was asked for but torch sees no GPU; use --device cpu or auto")
    return device


def reduced_precision() -> str:
    """The precision CUDA runs use on this process's GPU: ``bf16``, or ``fp16`` where the GPU lacks
    bf16 (before Ampere)."""
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class OnnxRuntime:
    """ONNX Runtime on CPU. ``precision`` says what the artifact computes in: ``fp32`` for the
    export, ``int8`` for its static QDQ quantization (:func:`quantize_int8`)."""

    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, artifact: OnnxArtifact, threads: int = 1, precision: str = "fp32"):
        if precision != "fp32":
            self.precision = precision
            self.name = f"onnxruntime-{precision}"
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(read_verified(artifact), opts, providers=["CPUExecutionProvider"])
        self.threads = threads

    def embed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        emb, logits = self.session.run(None, {"images": np.ascontiguousarray(images, dtype=np.uint8)})
        return emb.astype(np.float32, copy=False), logits.astype(np.float32, copy=False)


class TorchRuntime:
    """Torch on CUDA (reduced precision) or CPU (float32). Inputs are uint8 NHWC: permuted to NCHW
    inside the model they are already channels_last in memory, so no copy is made for the layout."""

    name = "torch"

    _DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

    def __init__(self, spec: ModelSpec, device: str = "cuda", threads: int | None = None,
                 precision: str | None = None):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        if precision is None:
            precision = reduced_precision() if self.device.type == "cuda" else "fp32"
        if precision not in self._DTYPES:
            raise BadInput(f"precision must be one of {', '.join(self._DTYPES)}, got {precision!r}")
        self.precision = precision
        self.dtype = getattr(torch, self._DTYPES[precision])
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            if precision == "fp32":  # fp32 must mean fp32: TF32 convolutions keep 10-bit mantissas
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        elif threads:
            torch.set_num_threads(threads)
        self.model = Embedder(spec).to(self.device, dtype=self.dtype, memory_format=torch.channels_last)
        self.name = f"torch-{self.device.type}-{str(self.dtype).removeprefix('torch.')}"

    def to_device(self, images: np.ndarray):
        """Host uint8 -> device tensor; pinned + non-blocking on CUDA so the copy overlaps compute."""
        arr = np.ascontiguousarray(images, dtype=np.uint8)
        if not arr.flags.writeable:  # torch refuses to share a read-only buffer without a warning
            arr = arr.copy()
        t = self.torch.from_numpy(arr)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def embed(self, images) -> tuple[np.ndarray, np.ndarray]:
        x = images if isinstance(images, self.torch.Tensor) else self.to_device(images)
        with self.torch.inference_mode():
            emb, logits = self.model(x)
            emb, logits = emb.float().cpu(), logits.float().cpu()
        return emb.numpy(), logits.numpy()


class OpenVinoRuntime:
    """OpenVINO on CPU, reading the same ONNX artifact (the fp32 export, or the QDQ int8 one, which
    OpenVINO runs as int8). ``bf16`` is OpenVINO's inference-precision hint: weights stay fp32 in
    the file, the CPU plugin computes in bfloat16 (AMX or AVX512-BF16)."""

    def __init__(self, artifact: OnnxArtifact, threads: int = 1, precision: str = "fp32"):
        import openvino as ov

        if precision not in ("fp32", "bf16", "int8"):
            raise BadInput(f"OpenVINO runs fp32, bf16 or int8 here, not {precision!r}")
        core = ov.Core()
        data = read_verified(artifact)
        model = core.read_model(data, b"") if isinstance(data, bytes) else core.read_model(data)
        config = {"INFERENCE_NUM_THREADS": max(1, threads), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = precision
        self.name = f"openvino-{precision}"
        self.threads = threads

    def embed(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.request.infer({0: np.ascontiguousarray(images, dtype=np.uint8)})
        emb, logits = (np.asarray(out[self.compiled.output(i)]) for i in range(2))
        return emb.astype(np.float32, copy=False), logits.astype(np.float32, copy=False)


# -- the CPU runtime catalog -------------------------------------------------------------------

#: The quality gate, against ``ort-fp32`` on the calibration sample.
RECALL_MIN = 0.98
TOP1_MIN = 0.98


@dataclass(frozen=True)
class CatalogEntry:
    """A named CPU runtime: ``engine`` (onnx, openvino, torch), ``precision`` (fp32, bf16, int8),
    the ``key_engine`` the features key names for it (see :func:`jobs.embed.models.parse_key`),
    whether :mod:`jobs.embed.choose` measures it when selecting (``auto``), and what it needs."""

    name: str
    engine: str
    precision: str
    key_engine: str | None
    auto: bool = True
    needs_flags: tuple[str, ...] = ()  # any of these CPU flags
    needs_module: str | None = None
    why: str = ""


_BF16_FLAGS = ("amx_bf16", "avx512_bf16")

CATALOG: dict[str, CatalogEntry] = {e.name: e for e in [
    CatalogEntry("ort-fp32", "onnx", "fp32", None, why="the reference; fast on every x86 CPU (AVX2/AVX-512 kernels)"),
    CatalogEntry("ort-int8", "onnx", "int8", "ort",
                 why="static QDQ int8 (VNNI/AMX-INT8 kernels where present), calibrated on the lake's images"),
    CatalogEntry("openvino-fp32", "openvino", "fp32", None, needs_module="openvino"),
    CatalogEntry("openvino-bf16", "openvino", "bf16", "openvino", needs_flags=_BF16_FLAGS, needs_module="openvino",
                 why="bf16 matrix units (AMX) or AVX512-BF16"),
    CatalogEntry("openvino-int8", "openvino", "int8", "openvino", needs_module="openvino",
                 why="OpenVINO running the same calibrated QDQ model"),
    CatalogEntry("torch-bf16", "torch", "bf16", None, needs_flags=_BF16_FLAGS, needs_module="torch",
                 why="torch with the model cast to bfloat16 (oneDNN AMX/AVX512-BF16 kernels)"),
    CatalogEntry("torch-fp32", "torch", "fp32", None, auto=False, needs_module="torch",
                 why="eager fp32: several times slower than ONNX Runtime, for comparison and --runtime only"),
]}


def cpu_info() -> dict:
    """``{"model": ..., "flags": [...]}`` of this machine's CPU, from /proc/cpuinfo (Linux)."""
    model, flags = "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
                if model != "unknown" and flags:
                    break
    except OSError:
        pass
    return {"model": model, "flags": sorted(flags)}


#: The flags that decide which kernels a runtime gets; the machine id hashes these only.
_RELEVANT_FLAGS = re.compile(r"^(avx|avx2|fma|f16c|avx512.*|amx.*|avx_vnni.*)$")


def machine_id() -> tuple[str, str]:
    """``(description, 12-hex id)`` of this machine for the choice cache: CPU model, the vector and
    matrix flags (AVX2, AVX-512*, AMX*, VNNI), and the core count this process may use."""
    import hashlib

    info = cpu_info()
    flags = [f for f in info["flags"] if _RELEVANT_FLAGS.match(f)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    desc = f"{info['model']}; {cores} cores; {' '.join(flags)}"
    return desc, hashlib.sha256(desc.encode()).hexdigest()[:12]


def runtime_available(name: str, *, native: bool = True) -> tuple[bool, str]:
    """Whether catalog runtime ``name`` can run on this machine, and why not.

    ``native`` (auto-selection, ``--runtime``) also asks for the CPU's own bf16 units. With
    ``native=False`` (an upload that must match a key the lake already holds) torch's bf16 counts
    on any CPU: torch computes bfloat16 without those units too, slowly, as the embed job's torch
    engine does. OpenVINO's bf16 does not count (without the units it computes fp32)."""
    entry = CATALOG.get(name)
    if entry is None:
        raise BadInput(f"unknown runtime {name!r}; one of {', '.join(CATALOG)}")
    if entry.needs_flags and (native or entry.engine != "torch"):
        flags = set(cpu_info()["flags"])
        if not flags & set(entry.needs_flags):
            return False, f"the CPU has none of {', '.join(entry.needs_flags)}"
    if entry.needs_module:
        import importlib.util
        if importlib.util.find_spec(entry.needs_module) is None:
            return False, f"the {entry.needs_module!r} package is not installed"
    return True, ""


def build_runtime(name: str, spec: ModelSpec, artifact: OnnxArtifact | None, threads: int,
                  native: bool = True) -> Runtime:
    """A fresh runtime for catalog entry ``name``; ``artifact`` is the fp32 export for fp32/bf16
    ONNX-based entries and the int8 QDQ model for the int8 ones (torch needs none)."""
    entry = CATALOG.get(name)
    if entry is None:
        raise BadInput(f"unknown runtime {name!r}; one of {', '.join(CATALOG)}")
    ok, why = runtime_available(name, native=native)
    if not ok:
        raise BadInput(f"runtime {name} cannot run on this machine: {why}")
    if entry.engine == "torch":
        rt = TorchRuntime(spec, "cpu", threads, entry.precision)
    else:
        if artifact is None:
            raise BadInput(f"runtime {name} needs its ONNX artifact")
        cls = OnnxRuntime if entry.engine == "onnx" else OpenVinoRuntime
        rt = cls(artifact, threads, entry.precision)
    rt.catalog_name = name
    return rt


def recall_at_k(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |top-k neighbours by candidate embeddings ∩ by reference embeddings| / k
    (cosine, each image a query against all the others)."""
    def neighbours(x):
        x = x.astype(np.float64)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        kk = min(k, len(x) - 1)
        return np.argsort(-sim, axis=1, kind="stable")[:, :kk], kk

    ref, kk = neighbours(reference)
    cand, _ = neighbours(candidate)
    if kk <= 0:
        return 1.0
    return float(np.mean([len(set(a) & set(b)) / kk for a, b in zip(ref, cand)]))


def top1_agreement(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> float:
    """Share of images whose most probable concept is the same."""
    return float(np.mean(reference_logits.argmax(1) == candidate_logits.argmax(1)))


@dataclass
class Measurement:
    """One runtime on the calibration sample: ``img_s`` (model only, median of the timed batches),
    ``recall10`` and ``top1`` against ``ort-fp32``, ``cosine_min``, whether it ``passed``, or the
    ``error`` that kept it from running."""

    name: str
    precision: str
    img_s: float = 0.0
    recall10: float = 0.0
    top1: float = 0.0
    cosine_min: float = 0.0
    passed: bool = False
    error: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def gate(reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray]) -> dict:
    """The quality figures of ``candidate`` (embeddings, logits) against ``reference``."""
    (re_, rl), (ce, cl) = reference, candidate
    a = re_ / np.maximum(np.linalg.norm(re_, axis=1, keepdims=True), 1e-12)
    b = ce / np.maximum(np.linalg.norm(ce, axis=1, keepdims=True), 1e-12)
    r10, t1 = recall_at_k(re_, ce, 10), top1_agreement(rl, cl)
    return dict(recall10=r10, top1=t1, cosine_min=float(np.min(np.sum(a * b, axis=1))),
                passed=bool(r10 >= RECALL_MIN and t1 >= TOP1_MIN))


def _embed_all(runtime: Runtime, images: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    outs = [runtime.embed(images[i:i + batch]) for i in range(0, len(images), batch)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def measure(runtime: Runtime, images: np.ndarray, reference: tuple[np.ndarray, np.ndarray] | None,
            batch: int = 32, min_seconds: float = 1.0, reps: int = 3) -> tuple[Measurement, tuple]:
    """Time ``runtime`` on ``images`` (one warm-up batch, then at least ``reps`` timed batches and
    ``min_seconds``; the rate is the median batch's) and score it against ``reference`` (None: it
    is the reference). Returns the measurement and its (embeddings, logits) of all ``images``."""
    out = _embed_all(runtime, images, batch)  # also the warm-up
    pool = images[:batch]
    times, t_end = [], time.perf_counter() + min_seconds
    while len(times) < reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        runtime.embed(pool)
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    m = Measurement(getattr(runtime, "catalog_name", runtime.name), runtime.precision,
                    img_s=len(pool) / float(np.median(times)))
    figures = gate(reference, out) if reference is not None else dict(recall10=1.0, top1=1.0, cosine_min=1.0,
                                                                        passed=True)
    for k, v in figures.items():
        setattr(m, k, v)
    return m, out


_CACHE: dict[tuple, Runtime] = {}


def _task_gpu() -> str:
    """``cuda:<address>`` of the GPU Spark's resource scheduling gave this task, else ``cuda``."""
    try:
        from pyspark import TaskContext
    except ImportError:
        return "cuda"
    tc = TaskContext.get()
    gpus = tc.resources().get("gpu") if tc is not None else None
    return f"cuda:{gpus.addresses[0]}" if gpus is not None and gpus.addresses else "cuda"


def get_runtime(spec: ModelSpec, device: Literal["cpu", "cuda"], *, artifact: OnnxArtifact | None = None,
                threads: int = 1, engine: Literal["onnx", "torch"] | None = None,
                precision: str | None = None, runtime: str | None = None) -> Runtime:
    """The per-process runtime for ``spec`` on ``device`` (built on first use, then reused by
    every later task of this worker process: the model loads once per executor process).

    ``runtime`` names a :data:`CATALOG` entry (CPU; ``artifact`` is the ONNX file it reads);
    otherwise ``engine`` defaults to ONNX Runtime on CPU and torch on CUDA; the CPU ONNX engine
    needs the ``artifact`` the driver prepared. ``precision`` (None: the device's default, fp32 on
    CPU) other than fp32 needs the torch engine.
    """
    if runtime is not None:
        if device != "cpu":
            raise BadInput(f"runtime {runtime} is a CPU runtime; the CUDA path is --device cuda")
        key = (spec.key, "catalog", runtime, threads, artifact.sha256 if artifact else None, os.getpid())
        rt = _CACHE.get(key)
        if rt is None:
            _CACHE.clear()
            rt = _CACHE[key] = build_runtime(runtime, spec, artifact, threads)
        return rt
    engine = engine or ("torch" if device == "cuda" or precision not in (None, "fp32") else "onnx")
    if engine == "onnx" and precision not in (None, "fp32"):
        raise BadInput(f"the ONNX engine computes in fp32, not {precision}; use the torch engine")
    torch_device = _task_gpu() if device == "cuda" else device
    key = (spec.key, engine, torch_device, threads, artifact.sha256 if artifact else None, precision, os.getpid())
    runtime = _CACHE.get(key)
    if runtime is None:
        if engine == "onnx":
            if device != "cpu":
                raise BadInput("the ONNX engine runs on CPU here; use engine='torch' for CUDA")
            if artifact is None:
                raise BadInput("the ONNX engine needs the exported artifact; call ensure_onnx first")
            runtime = OnnxRuntime(artifact, threads)
        else:
            runtime = TorchRuntime(spec, torch_device, threads, precision)
        _CACHE.clear()  # one model per worker at a time: models are large, jobs use one
        _CACHE[key] = runtime
    return runtime
