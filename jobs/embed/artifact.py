"""The ONNX export of a model, cached in the lake as a checksummed artifact.

``artifacts/models/<model name>/<recipe sha>/model.onnx`` plus ``manifest.json`` (written last,
atomically). The recipe sha is a hash of everything the export depends on (model key, the weights'
sha256, opset, input contract, torch version), so workers find the artifact without exporting, and
a change to any of those lands in a new folder instead of overwriting a build in use. Loaders check
the file's sha256 against the manifest before they load it; the driver re-exports a corrupt or
half-written artifact (:func:`ensure_onnx`), a worker refuses it (:func:`read_verified`).

This module must not import deltalake (workers import it); torch is imported only to export.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass

from lake.errors import CorruptArtifact
from lake.artifacts import read_text, write_text_atomic
from jobs.embed.models import Embedder, ModelSpec, file_sha256

__all__ = ["OnnxArtifact", "ensure_onnx", "read_verified", "export_onnx", "artifact_dir", "OPSET"]

OPSET = 17
_CONTRACT = "uint8-NHWC-RGB -> (embedding f32[N,D], logits f32[N,C]) v1"


@dataclass(frozen=True)
class OnnxArtifact:
    """A verified export: where it is and the sha256 its bytes must have."""

    uri: str
    sha256: str
    model: str


def _recipe(spec: ModelSpec) -> dict:
    import torch

    return {"model": spec.key, "weights_sha256": file_sha256(spec.weights_path) if spec.weights_path else "",
            "opset": OPSET, "contract": _CONTRACT, "input_size": spec.input_size, "torch": torch.__version__}


def artifact_dir(artifacts_root: str, spec: ModelSpec) -> str:
    recipe = json.dumps(_recipe(spec), sort_keys=True).encode()
    return f"{artifacts_root}/models/{spec.name}/{hashlib.sha256(recipe).hexdigest()[:16]}"


def export_onnx(spec: ModelSpec, path: str) -> None:
    """Export ``spec``'s :func:`Embedder` to ``path`` (dynamic batch, outputs embedding and logits)."""
    import torch

    module = Embedder(spec)
    example = torch.zeros(2, spec.input_size, spec.input_size, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        # The TorchScript-based exporter warns about its own deprecation and about tracing; neither
        # affects this fixed-shape, control-flow-free graph.
        warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\._internal")
        warnings.filterwarnings("ignore", message=r"Constant folding - Only steps=1", category=UserWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        with torch.no_grad():
            torch.onnx.export(module, (example,), path, input_names=["images"],
                              output_names=["embedding", "logits"], opset_version=OPSET,
                              dynamic_axes={"images": {0: "n"}, "embedding": {0: "n"}, "logits": {0: "n"}},
                              do_constant_folding=True, dynamo=False)


def _read(uri: str) -> bytes:
    data = read_text(uri)  # local file or object store (lake.store.LakeStore)
    if data is None:
        raise FileNotFoundError(uri)
    return data


_write_atomic = write_text_atomic  # temp name and rename locally; one PUT on an object store


def _manifest(folder: str) -> dict | None:
    try:
        return json.loads(_read(f"{folder}/manifest.json"))
    except (FileNotFoundError, OSError, ValueError):
        return None


def read_verified(artifact: OnnxArtifact) -> bytes:
    """The artifact's bytes, after checking their sha256.

    Raises:
        CorruptArtifact: the file is missing or its bytes do not match; run the embed job's driver
            again (it re-exports), or delete the folder.
    """
    try:
        data = _read(artifact.uri)
    except (FileNotFoundError, OSError) as e:
        raise CorruptArtifact(f"ONNX artifact {artifact.uri} is missing ({e}); re-run embed to re-export it") from None
    if hashlib.sha256(data).hexdigest() != artifact.sha256:
        raise CorruptArtifact(f"ONNX artifact {artifact.uri} does not match its manifest's sha256; "
                              "re-run embed to re-export it")
    return data


def ensure_onnx(artifacts_root: str, spec: ModelSpec) -> OnnxArtifact:
    """The verified ONNX artifact of ``spec``, exporting it first if absent or corrupt.

    Callers that may race (two drivers) should hold a lake lock; a loser's export only replaces
    identical content, because the folder is determined by the recipe.
    """
    folder = artifact_dir(artifacts_root, spec)
    uri = f"{folder}/model.onnx"
    manifest = _manifest(folder)
    if manifest is not None:
        art = OnnxArtifact(uri, manifest["files"]["model.onnx"]["sha256"], spec.key)
        try:
            read_verified(art)
            return art
        except CorruptArtifact:
            pass
    with tempfile.TemporaryDirectory(prefix="imagelake-onnx-") as tmp:
        local = os.path.join(tmp, "model.onnx")
        export_onnx(spec, local)
        with open(local, "rb") as f:
            data = f.read()
    sha = hashlib.sha256(data).hexdigest()
    _write_atomic(uri, data)
    manifest = {"model": spec.key, "recipe": _recipe(spec),
                "files": {"model.onnx": {"sha256": sha, "bytes": len(data)}}}
    _write_atomic(f"{folder}/manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    return OnnxArtifact(uri, sha, spec.key)
