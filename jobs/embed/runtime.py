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
"""

from __future__ import annotations

import os
from typing import Literal, Protocol

import numpy as np

from jobs.embed.artifact import OnnxArtifact, read_verified
from jobs.embed.models import Embedder, ModelSpec
from lake.errors import BadInput

__all__ = ["Runtime", "OnnxRuntime", "TorchRuntime", "get_runtime", "resolve_device", "cuda_available",
           "reduced_precision"]

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
    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, artifact: OnnxArtifact, threads: int = 1):
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
        t = self.torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def embed(self, images) -> tuple[np.ndarray, np.ndarray]:
        x = images if isinstance(images, self.torch.Tensor) else self.to_device(images)
        with self.torch.inference_mode():
            emb, logits = self.model(x)
            emb, logits = emb.float().cpu(), logits.float().cpu()
        return emb.numpy(), logits.numpy()


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
                precision: str | None = None) -> Runtime:
    """The per-process runtime for ``spec`` on ``device`` (built on first use, then reused).

    ``engine`` defaults to ONNX Runtime on CPU and torch on CUDA; the CPU ONNX engine needs the
    ``artifact`` the driver prepared. ``precision`` (None: the device's default, fp32 on CPU)
    other than fp32 needs the torch engine.
    """
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
