"""Which CPU runtime an embed run uses: by measurement on first use per machine and model, cached.

:func:`choose_runtime` is called by the embed driver (it imports deltalake; workers never import
this module). For ``auto`` it

1. returns the cached choice when ``artifacts/runtimes/<model key>/<machine id>.json`` exists for
   this machine (:func:`jobs.embed.runtime.machine_id`: CPU model, vector/matrix flags, cores) and
   the same library versions;
2. else decodes a calibration sample of the lake's own images (up to :data:`CALIBRATION_N`, evenly
   spread over ``images`` by ``seq``), runs ``ort-fp32`` on it as the reference, then every other
   available catalog runtime (:data:`jobs.embed.runtime.CATALOG` entries with ``auto``), scores
   each with the quality gate (recall@10 of its embeddings against fp32 >= 0.98 and top-1 concept
   agreement >= 0.98), keeps the fastest that passes, and writes the cache file with every figure.

The int8 runtimes read a static QDQ model (:mod:`jobs.embed.quantize`) calibrated on up to 256
other images of the lake (held out from the gate's sample where the lake has enough), stored next to the
fp32 export (``int8-qdq.onnx`` + ``int8-manifest.json``, checksummed), made once per lake and
model and never recalibrated unless deleted, so every run of the key ``+int8.ort`` uses the same
int8 model.

``IMAGELAKE_EMBED_RUNTIME=<name>`` (environment) pins the runtime wherever ``auto`` would
measure: a fleet that wants one features key whatever the machine, or a test suite that wants the
fp32 reference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from jobs.embed.artifact import OnnxArtifact, artifact_dir, ensure_onnx, read_verified
from jobs.embed.decode import ImageRejected, load_image
from jobs.embed.models import ModelSpec
from jobs.embed.quantize import INT8_CALIBRATION_N, quantize_int8
from jobs.embed.runtime import CATALOG, Measurement, build_runtime, machine_id, measure, runtime_available
from lake.artifacts import write_text_atomic
from lake.catalog import Lake
from lake.commit import open_table
from lake.errors import BadInput, CorruptArtifact
from lake.lock import LakeLock
from lake.staging import filesystem_for

__all__ = ["Choice", "choose_runtime", "calibration_images", "int8_calibration_images", "ensure_int8", "measure_all",
           "CALIBRATION_N",
           "ENV_PIN", "check_runtime_name"]

log = logging.getLogger("imagelake.jobs.embed")

CALIBRATION_N = 64
#: Least time each runtime is timed for (after a warm-up batch), seconds.
MEASURE_SECONDS = 1.0
ENV_PIN = "IMAGELAKE_EMBED_RUNTIME"


@dataclass
class Choice:
    """The runtime a run uses: catalog ``name``, its ``precision``, the features ``key``, the
    ``artifact`` its tasks load (None for torch), ``source`` (``requested``, ``pinned``, ``cached``,
    ``measured``) and the ``measurements`` behind it (empty unless measured or cached)."""

    name: str
    precision: str
    key: str
    key_engine: str | None
    artifact: OnnxArtifact | None
    source: str
    machine: str = ""
    measurements: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return dict(runtime=self.name, runtime_source=self.source, machine=self.machine,
                    runtime_measurements=self.measurements)


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("onnxruntime", "openvino", "torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _image_uris(lake: Lake) -> list[str]:
    table = open_table(lake, "images")
    return table.to_pyarrow_table(columns=["seq", "uri"]).sort_by("seq").column("uri").to_pylist() \
        if table.file_uris() else []


def _spread(rows: list[str], n: int) -> list[str]:
    return list(dict.fromkeys(rows[int(i)] for i in np.linspace(0, len(rows) - 1, min(len(rows), n)).round())) \
        if rows else []


def _decode_some(uris: list[str], spec: ModelSpec, n: int, max_pixels: int) -> list[np.ndarray]:
    out = []
    for uri in uris:
        try:
            out.append(load_image(uri, spec.input_size, spec.crop_fraction, max_pixels=max_pixels))
        except ImageRejected:
            continue
        if len(out) == n:
            break
    return out


def calibration_images(lake: Lake, spec: ModelSpec, n: int | None = None, max_pixels: int = 100_000_000) -> np.ndarray:
    """The quality gate's sample: up to ``n`` decoded images of the lake, evenly spread over
    ``images`` in ``seq`` order (the same sample on every call while the table is unchanged);
    unreadable files are skipped.

    Raises:
        BadInput: the lake has no image that decodes.
    """
    n = n or CALIBRATION_N
    out = _decode_some(_spread(_image_uris(lake), 4 * n), spec, n, max_pixels)
    if not out:
        raise BadInput("choosing a runtime needs images to calibrate on: the lake has none that decode; "
                       "ingest some first, or pass --runtime ort-fp32")
    return np.stack(out)


def int8_calibration_images(lake: Lake, spec: ModelSpec, n: int | None = None,
                            max_pixels: int = 100_000_000) -> tuple[np.ndarray, bool]:
    """Up to ``n`` (default :data:`jobs.embed.quantize.INT8_CALIBRATION_N`) decoded images to
    calibrate the int8 model on, evenly spread over the images the gate's sample
    (:func:`calibration_images`) cannot pick, so the gate scores int8 on images it was not
    calibrated on. A lake too small for that (fewer than 16 other images) calibrates on all of its
    images. Returns the images and whether they are held out from the gate's sample.

    Raises:
        BadInput: the lake has no image that decodes.
    """
    n = n or INT8_CALIBRATION_N
    rows = _image_uris(lake)
    gate = set(_spread(rows, 4 * CALIBRATION_N))
    others = [u for u in rows if u not in gate]
    held_out = len(others) >= 16
    out = _decode_some(_spread(others if held_out else rows, 2 * n), spec, n, max_pixels)
    if not out:
        raise BadInput("the int8 model needs images to calibrate on: the lake has none that decode; "
                       "ingest some first, or pass --runtime ort-fp32")
    return np.stack(out), held_out


def _read(uri: str) -> bytes:
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def ensure_int8(lake: Lake, spec: ModelSpec, fp32: OnnxArtifact, calibration: np.ndarray | None = None) -> OnnxArtifact:
    """The lake's static int8 QDQ model of ``spec`` (made from ``fp32`` on first use with this CPU's
    :func:`jobs.embed.quantize.default_recipe`, calibrated on ``calibration`` or on
    :func:`int8_calibration_images`), verified against its manifest. An existing model is kept
    whatever recipe made it (its manifest says which), so a key's vectors come from one model."""
    folder = artifact_dir(lake.artifacts_dir(), spec)
    uri, manifest_uri = f"{folder}/int8-qdq.onnx", f"{folder}/int8-manifest.json"
    try:
        manifest = json.loads(_read(manifest_uri))
        art = OnnxArtifact(uri, manifest["sha256"], spec.key)
        read_verified(art)
        return art
    except (FileNotFoundError, OSError, ValueError, KeyError):
        pass
    except CorruptArtifact as e:
        log.warning("int8 model of %s is corrupt (%s); quantizing again", spec.key, e)
    held_out = False
    if calibration is None:
        calibration, held_out = int8_calibration_images(lake, spec)
    with tempfile.TemporaryDirectory(prefix="imagelake-int8-") as tmp:
        src, out = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        with open(src, "wb") as f:
            f.write(read_verified(fp32))
        recipe = quantize_int8(src, out, calibration)
        with open(out, "rb") as f:
            data = f.read()
    sha = hashlib.sha256(data).hexdigest()
    write_text_atomic(uri, data)
    write_text_atomic(manifest_uri, json.dumps({
        "model": spec.key, "from_sha256": fp32.sha256, "sha256": sha, "bytes": len(data),
        "calibration_images": int(len(calibration)), "calibration_held_out_from_gate": held_out,
        "format": recipe.describe(), "recipe": dataclasses.asdict(recipe),
    }, indent=2, sort_keys=True).encode())
    return OnnxArtifact(uri, sha, spec.key)


def _artifact_for(lake: Lake, spec: ModelSpec, name: str, fp32: OnnxArtifact,
                  calibration: np.ndarray | None = None) -> OnnxArtifact | None:
    entry = CATALOG[name]
    if entry.engine == "torch":
        return None
    return ensure_int8(lake, spec, fp32, calibration) if entry.precision == "int8" else fp32


def _choice(spec: ModelSpec, name: str, artifact, source: str, machine: str = "", measurements=()) -> Choice:
    entry = CATALOG[name]
    return Choice(name=name, precision=entry.precision, key=spec.key_for(entry.precision, entry.key_engine),
                  key_engine=entry.key_engine, artifact=artifact, source=source, machine=machine,
                  measurements=list(measurements))


def measure_all(lake: Lake, spec: ModelSpec, fp32: OnnxArtifact, images: np.ndarray, threads: int,
                names: list[str] | None = None, batch: int = 32, min_seconds: float | None = None) -> list[Measurement]:
    """Every runtime of ``names`` (default: the catalog's ``auto`` entries) on ``images``, the
    reference ``ort-fp32`` first; one that is unavailable or fails gets its ``error``."""
    names = names or [n for n, e in CATALOG.items() if e.auto]
    min_seconds = MEASURE_SECONDS if min_seconds is None else min_seconds
    names = ["ort-fp32"] + [n for n in names if n != "ort-fp32"]
    ref_m, ref = measure(build_runtime("ort-fp32", spec, fp32, threads), images, None, batch, min_seconds)
    out = [ref_m]
    for name in names[1:]:
        ok, why = runtime_available(name)
        if not ok:
            out.append(Measurement(name, CATALOG[name].precision, error=why))
            continue
        try:
            rt = build_runtime(name, spec, _artifact_for(lake, spec, name, fp32), threads)
            m, _ = measure(rt, images, ref, batch, min_seconds)
        except Exception as e:  # a runtime that cannot load or run this model is not a candidate
            m = Measurement(name, CATALOG[name].precision, error=f"{type(e).__name__}: {e}"[:300])
        out.append(m)
        log.info("runtime %s: %.1f img/s, recall@10 %.3f, top-1 %.3f%s", m.name, m.img_s, m.recall10, m.top1,
                 f" ({m.error})" if m.error else "")
    return out


def check_runtime_name(name: str) -> None:
    """Raises BadInput unless ``name`` is ``auto`` or a catalog runtime (cheap; before any work)."""
    if name != "auto" and name not in CATALOG:
        raise BadInput(f"unknown runtime {name!r}; one of auto, {', '.join(CATALOG)}")


def choose_runtime(lake: Lake, spec: ModelSpec, requested: str = "auto", threads: int = 1, *,
                   remeasure: bool = False, max_pixels: int = 100_000_000) -> Choice:
    """The CPU runtime of this run (see the module doc).

    Raises:
        BadInput: an unknown runtime name, or one that cannot run here (with the reason).
    """
    if requested == "auto" and os.environ.get(ENV_PIN, "") not in ("", "auto"):
        requested, source = os.environ[ENV_PIN], "pinned"
    else:
        source = "requested"
    check_runtime_name(requested)
    if requested != "auto":
        ok, why = runtime_available(requested)
        if not ok:
            raise BadInput(f"runtime {requested} cannot run on this machine: {why}")
    with LakeLock(lake, f"export-{spec.name}", timeout=600, holder=f"embed runtime {requested}"):
        fp32 = ensure_onnx(lake.artifacts_dir(), spec)
        if requested != "auto":
            return _choice(spec, requested, _artifact_for(lake, spec, requested, fp32), source)
        desc, mid = machine_id()
        cache_uri = lake.artifacts_dir("runtimes", spec.key.replace("/", "_"), f"{mid}.json")
        versions = _versions()
        if not remeasure:
            try:
                cached = json.loads(_read(cache_uri))
                if cached.get("versions") == versions and cached.get("threads") == threads \
                        and runtime_available(cached["choice"])[0]:
                    return _choice(spec, cached["choice"], _artifact_for(lake, spec, cached["choice"], fp32),
                                   "cached", desc, cached["measurements"])
            except (FileNotFoundError, OSError, ValueError, KeyError):
                pass
        images = calibration_images(lake, spec, max_pixels=max_pixels)
        ms = measure_all(lake, spec, fp32, images, threads)
        passed = [m for m in ms if m.passed and not m.error]
        best = max(passed, key=lambda m: m.img_s)  # ort-fp32 always passes (it is the reference)
        record = dict(machine=desc, machine_id=mid, model=spec.key, threads=threads, versions=versions,
                      calibration_images=int(len(images)), choice=best.name,
                      gate={"recall10_min": 0.98, "top1_min": 0.98},
                      measurements=[m.as_dict() for m in ms])
        write_text_atomic(cache_uri, json.dumps(record, indent=2, sort_keys=True).encode())
        log.info("embed runtime for %s on %s: %s (%.1f img/s)", spec.key, desc, best.name, best.img_s)
        return _choice(spec, best.name, _artifact_for(lake, spec, best.name, fp32), "measured", desc,
                       record["measurements"])

