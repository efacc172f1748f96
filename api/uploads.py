"""Uploaded images: limits and checks, and on-the-fly embedding with exactly the embed job's model.

Reuse it from any route that takes an image (``POST /search/similar``, tagging, adding images)::

    from api.uploads import read_upload, upload_embedder

    upload = read_upload()                  # the multipart field "image" of this request, checked
    upload.data, upload.sha256, upload.format, upload.width, upload.height, upload.filename
    embedded = upload_embedder().embed(upload.data, model_key)   # model_key: "name@version"
    embedded.vector     # float32 (d,), as the features table stores it (not normalised)
    embedded.logits     # float32 (classes,);  embedded.concepts(k) -> (class ids, probabilities)

:func:`read_upload` answers (by raising :mod:`lake.errors` exceptions the error funnel turns into
JSON): 413 for a body over ``upload_max_bytes`` (Flask's ``MAX_CONTENT_LENGTH``) or an image
with more than ``upload_max_pixels`` pixels (decompression bombs: the header is read, no pixel is
decoded); 415 for an image in a format that is not accepted (accepted: JPEG, PNG, WebP, GIF, BMP,
TIFF — what ingest accepts); 400 for a missing field, an empty file, or bytes that are no image.

:class:`UploadEmbedder` decodes and preprocesses with :func:`jobs.embed.decode.decode_image` and
runs the runtime the features key names (:func:`runtime_for_key`: ``name@version`` -> ONNX Runtime
fp32 on the verified export, ``+int8.ort`` -> ONNX Runtime on the lake's own calibrated int8 QDQ
model, ``+int8.openvino`` / ``+bf16.openvino`` -> OpenVINO, ``+bf16`` -> torch bf16) — the same
code path and files as ``imagelake embed`` — so an upload's vector equals the stored one for the
same file. Each runtime is built once per process and key, on first use. A key whose runtime
cannot run in this process (OpenVINO not installed, no AMX/AVX512-BF16 for bf16, a GPU-only
``+fp16`` key, the lake's int8 model missing) is a 503 naming the key and the runtime: nothing is
embedded with another runtime and stored under that key.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from flask import Flask, current_app, request
from PIL import Image, UnidentifiedImageError

from lake.catalog import Lake
from lake.errors import BadInput, Conflict, CorruptArtifact, TooLarge, Unavailable, Unsupported
from lake.settings import Settings

__all__ = ["ACCEPTED_FORMATS", "Upload", "Embedded", "UploadEmbedder", "check_image", "read_upload",
           "read_embedding", "is_imported_key", "upload_embedder", "init_app"]

ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Image formats PIL here cannot open, recognised by their first bytes, so they get a 415 and not a 400.
_SIGNATURES = (
    (4, b"ftypheic", "HEIC"), (4, b"ftypheix", "HEIC"), (4, b"ftypmif1", "HEIF"), (4, b"ftypavif", "AVIF"),
    (0, b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (0, b"\xff\x0a", "JPEG XL"), (0, b"<svg", "SVG"),
    (0, b"%PDF", "PDF"), (0, b"8BPS", "PSD"), (0, b"II*\x00\x10\x00\x00\x00CR", "RAW (CR2)"),
)


@dataclass(frozen=True)
class Upload:
    data: bytes
    sha256: str
    format: str
    width: int
    height: int
    filename: str


def _sniff_unsupported(data: bytes) -> str | None:
    head = data[:64].lstrip() if data[:1] in (b" ", b"\n", b"\r", b"\t") else data[:64]
    if head.startswith(b"<?xml") and b"<svg" in data[:1024]:
        return "SVG"
    for offset, magic, name in _SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return name
    return None


def check_image(data: bytes, *, max_pixels: int, max_bytes: int | None = None) -> tuple[str, int, int]:
    """Check an uploaded file's bytes; return (format, width, height).

    Raises:
        TooLarge: more than ``max_bytes`` bytes or ``max_pixels`` pixels (read from the header).
        Unsupported: an image format that is not accepted.
        BadInput: empty, not an image, or truncated/corrupt.
    """
    if not data:
        raise BadInput("the uploaded file is empty")
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLarge(f"the upload has {len(data)} bytes; the limit is {max_bytes} (upload_max_bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format or "", im.size
                if w * h > max_pixels:
                    raise TooLarge(f"the image has {w}x{h} = {w * h} pixels; the limit is {max_pixels} "
                                   "(upload_max_pixels)")
                if fmt not in ACCEPTED_FORMATS:
                    raise Unsupported(f"image format {fmt or 'unknown'} is not accepted; send one of "
                                      f"{', '.join(f for f in ACCEPTED_FORMATS if f != 'MPO')}")
                im.load()
    except Image.DecompressionBombError as e:
        raise TooLarge(f"the image has too many pixels (decompression bomb guard): {e}") from None
    except UnidentifiedImageError:
        other = _sniff_unsupported(data)
        if other:
            raise Unsupported(f"image format {other} is not accepted; send one of "
                              f"{', '.join(f for f in ACCEPTED_FORMATS if f != 'MPO')}") from None
        raise BadInput("the uploaded file is not an image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadInput(f"the uploaded image is truncated or corrupt ({type(e).__name__}: {e})") from None
    return ("JPEG" if fmt == "MPO" else fmt), w, h


def read_upload(field: str = "image", settings: Settings | None = None) -> Upload:
    """The image in this request's multipart field ``field``, checked (see :func:`check_image`).

    Raises:
        BadInput: not a multipart request, or no such field. TooLarge / Unsupported: as above.
    """
    settings = settings or current_app.config["IMAGELAKE_SETTINGS"]
    if not (request.mimetype or "").startswith("multipart/form-data"):
        raise BadInput(f"send the image as multipart/form-data with a file field {field!r} "
                       f"(got content type {request.mimetype or 'none'})")
    storage = request.files.get(field)  # a body over MAX_CONTENT_LENGTH raises 413 here
    if storage is None:
        raise BadInput(f"no file field {field!r} in the multipart form")
    data = storage.read(settings.upload_max_bytes + 1)
    fmt, w, h = check_image(data, max_pixels=settings.upload_max_pixels, max_bytes=settings.upload_max_bytes)
    return Upload(data, hashlib.sha256(data).hexdigest(), fmt, w, h, storage.filename or "")


@dataclass(frozen=True)
class Embedded:
    model: str
    vector: np.ndarray          # float32 (d,)
    logits: np.ndarray | None   # float32 (classes,); None for a vector the client sent (no concepts)

    def concepts(self, k: int = 50) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` class ids and softmax probabilities, as the features table stores them."""
        from jobs.embed.partition import top_concepts

        ids, probs = top_concepts(self.logits.reshape(1, -1), k)
        return ids[0], probs[0]


class UploadEmbedder:
    """Embeds uploaded image bytes with a registered model on CPU (ONNX Runtime), once loaded per process."""

    def __init__(self, settings: Settings, threads: int = 1):
        self.settings = settings
        self.lake = Lake.at(settings.lake)
        self.threads = threads
        self._lock = threading.Lock()
        self._runtimes: dict[tuple[int, str], object] = {}

    def _runtime(self, model_key: str):
        """The model spec and the runtime that computes vectors of ``model_key``, built once per
        process and key (see :func:`runtime_for_key`)."""
        import os

        from jobs.embed.models import get_model, parse_key

        base, precision, engine = parse_key(model_key)
        if is_imported_key(model_key):
            raise Conflict(f"the index holds embeddings imported under {model_key} (`imagelake embed --import`); "
                           "this server has no model that computes them, so it cannot embed an uploaded image. "
                           "POST /images takes the image's vector, computed where the others were, as the form "
                           "field `embedding` (a JSON array of floats); search by `image_id` instead of by file")
        spec = get_model(base.split("@", 1)[0])
        if spec.key != base:
            raise Conflict(f"the index was built from {model_key}, but this server's {spec.name} is {spec.key}; "
                           "re-embed and re-index (`imagelake embed`, `imagelake index`)")
        cache_key = (os.getpid(), model_key)
        with self._lock:
            runtime = self._runtimes.get(cache_key)
            if runtime is None:
                runtime = self._runtimes[cache_key] = self._build(spec, model_key, precision, engine)
            return spec, runtime

    def _build(self, spec, model_key: str, precision: str, engine: str | None):
        from jobs.embed.artifact import OnnxArtifact, artifact_dir, ensure_onnx, read_verified
        from jobs.embed.runtime import CATALOG, build_runtime, runtime_available
        from lake.lock import LakeLock

        name = runtime_for_key(precision, engine)
        if name is None:
            raise Unavailable(f"the index's features key is {model_key}: {precision} vectors of that engine are "
                              "computed on a GPU (`imagelake embed --device cuda`), and this server embeds on CPU; "
                              "add images with `imagelake ingest` + `imagelake embed` there")
        ok, why = runtime_available(name, native=False)  # the key decides, not speed
        if not ok:
            raise Unavailable(f"the index's features key is {model_key}, computed by runtime {name}, which cannot "
                              f"run in this server ({why}); uploads would get vectors of another runtime, so none "
                              f"is stored. Serve from a machine that has {name}, or add images with "
                              "`imagelake ingest` + `imagelake embed`")
        with LakeLock(self.lake, f"export-{spec.name}", timeout=600, holder="api upload"):
            artifact = ensure_onnx(self.lake.artifacts_dir(), spec)
        if precision == "int8":
            # the lake's own calibrated int8 model, the one `imagelake embed` used for this key:
            # never recalibrated here (another calibration would give other vectors)
            folder = artifact_dir(self.lake.artifacts_dir(), spec)
            try:
                manifest = json.loads(_read_bytes(f"{folder}/int8-manifest.json"))
                artifact = OnnxArtifact(f"{folder}/int8-qdq.onnx", manifest["sha256"], spec.key)
                read_verified(artifact)
            except (OSError, ValueError, KeyError, CorruptArtifact) as e:
                raise Unavailable(f"the index's features key is {model_key}, but the lake's calibrated int8 model "
                                  f"of {spec.key} is missing or unreadable ({type(e).__name__}); run "
                                  f"`imagelake embed --runtime {name}` to make it") from None
        elif CATALOG[name].engine == "torch":
            artifact = None
        return build_runtime(name, spec, artifact, self.threads, native=False)

    def embed(self, data: bytes, model_key: str) -> Embedded:
        """The embedding of image ``data`` under ``model_key`` (``name@version``).

        Raises:
            TooLarge: too many pixels. BadInput: undecodable. NotFound: unknown model.
            Conflict: the registered model has another version than ``model_key``.
        """
        from jobs.embed.decode import ImageRejected, decode_image

        spec, runtime = self._runtime(model_key)
        try:
            pixels = decode_image(data, spec.input_size, spec.crop_fraction, max_pixels=self.settings.upload_max_pixels)
        except ImageRejected as e:
            if e.reason == "too_large":
                raise TooLarge(f"the image has too many pixels: {e}") from None
            raise BadInput(f"the image cannot be decoded: {e}") from None
        emb, logits = runtime.embed(pixels[None])
        return Embedded(model_key, emb[0].astype(np.float32), logits[0].astype(np.float32))


def is_imported_key(model_key: str) -> bool:
    """True for a features key whose model is not in this process's registry: vectors brought in by
    ``imagelake embed --import`` (the importer refuses registry names), which no runtime here computes."""
    from jobs.embed.models import MODELS, parse_key

    base = parse_key(model_key)[0]
    return base.split("@", 1)[0] not in MODELS


def read_embedding(field: str, model_key: str, dim: int) -> Embedded | None:
    """The vector sent as the form field ``field`` (a JSON array of ``dim`` floats), or None when the
    request has no such field. Checked as ``imagelake embed --import`` checks a row.

    Raises:
        BadInput: not a JSON array of numbers, another dimension than ``dim``, not finite, all zero.
    """
    text = request.form.get(field)
    if text is None:
        return None
    try:
        values = json.loads(text)
        vector = np.asarray(values, np.float64)
    except (ValueError, TypeError):
        raise BadInput(f"form field {field!r} must be a JSON array of {dim} numbers") from None
    if vector.ndim != 1 or vector.dtype.kind not in "fiu":
        raise BadInput(f"form field {field!r} must be a JSON array of {dim} numbers")
    if len(vector) != dim:
        raise BadInput(f"form field {field!r} has {len(vector)} numbers; the index of {model_key} has dimension {dim}")
    if not np.isfinite(vector).all():
        raise BadInput(f"form field {field!r} holds a value that is not finite (NaN or infinity)")
    if not np.any(vector):
        raise BadInput(f"form field {field!r} is the zero vector; cosine similarity is undefined for it")
    return Embedded(model_key, vector.astype(np.float32), None)


#: features-key (precision, engine) -> the CPU catalog runtime that computes it (jobs.embed.runtime.CATALOG)
KEY_RUNTIMES = {("fp32", None): "ort-fp32", ("int8", "ort"): "ort-int8", ("int8", "openvino"): "openvino-int8",
                ("bf16", "openvino"): "openvino-bf16", ("bf16", None): "torch-bf16"}


def runtime_for_key(precision: str, engine: str | None) -> str | None:
    """The CPU runtime whose vectors a features key of ``precision``/``engine`` holds (None: a
    GPU-only key, ``+fp16``). Every fp32 runtime agrees to float rounding, so fp32 is ``ort-fp32``."""
    return KEY_RUNTIMES.get((precision, engine if engine != "torch" else None))


def _read_bytes(uri: str) -> bytes:
    from lake.staging import filesystem_for

    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions["imagelake.uploads"] = UploadEmbedder(settings)


def upload_embedder() -> UploadEmbedder:
    """The current app's embedder (per process; the model loads on first use)."""
    return current_app.extensions["imagelake.uploads"]
