"""Runtimes: one interface, ``embed(images_uint8_nhwc) -> (embeddings, logits)``, two engines.

* :class:`OnnxRuntime` — CPU. onnxruntime on the model exported once to ONNX (see
  :mod:`jobs.embed.artifact`); measured several times faster than torch eager on CPU. Threads are
  matched to the cores one task owns (``spark.task.cpus``; all cores in process).
* :class:`TorchRuntime` — CUDA (bf16, or fp16 where bf16 is unsupported; channels_last; pinned
  host memory and non-blocking copies). Also runs on CPU in float32, which is how its code path is
  tested on machines without a GPU.

Runtimes are built once per worker process and cached here by (model, engine, device, threads):
Spark reuses Python workers across tasks, so the model loads once per executor core, not per task.
"""

from __future__ import annotations

import os
from typing import Literal, Protocol

import numpy as np

from jobs.embed.artifact import OnnxArtifact, read_verified
from jobs.embed.models import Embedder, ModelSpec
from lake.errors import BadInput

__all__ = ["Runtime", "OnnxRuntime", "TorchRuntime", "get_runtime", "resolve_device", "cuda_available"]

Device = Literal["auto", "cpu", "cuda"]


class Runtime(Protocol):
    name: str

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


class OnnxRuntime:
    name = "onnxruntime"

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

    def __init__(self, spec: ModelSpec, device: str = "cuda", threads: int | None = None):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            torch.backends.cudnn.benchmark = True
        else:
            self.dtype = torch.float32
            if threads:
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
                threads: int = 1, engine: Literal["onnx", "torch"] | None = None) -> Runtime:
    """The per-process runtime for ``spec`` on ``device`` (built on first use, then reused).

    ``engine`` defaults to ONNX Runtime on CPU and torch on CUDA; the CPU ONNX engine needs the
    ``artifact`` the driver prepared.
    """
    engine = engine or ("torch" if device == "cuda" else "onnx")
    torch_device = _task_gpu() if device == "cuda" else device
    key = (spec.key, engine, torch_device, threads, artifact.sha256 if artifact else None, os.getpid())
    runtime = _CACHE.get(key)
    if runtime is None:
        if engine == "onnx":
            if device != "cpu":
                raise BadInput("the ONNX engine runs on CPU here; use engine='torch' for CUDA")
            if artifact is None:
                raise BadInput("the ONNX engine needs the exported artifact; call ensure_onnx first")
            runtime = OnnxRuntime(artifact, threads)
        else:
            runtime = TorchRuntime(spec, torch_device, threads)
        _CACHE.clear()  # one model per worker at a time: models are large, jobs use one
        _CACHE[key] = runtime
    return runtime
