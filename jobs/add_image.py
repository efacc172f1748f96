"""Add one uploaded image to the lake: store it, ingest it, embed it, fold it into the index.

``POST /api/v1/images`` calls :func:`add_image` with the checked upload and its vector (the API has
already embedded it with :class:`api.uploads.UploadEmbedder`, the embed job's own CPU/ONNX path).

Steps, each skipped when already done, so a retry after a crash finishes the job and a second
upload of the same bytes adds nothing:

1. **store** — ``<lake>/uploads/<sha256[:2]>/<sha256>.<ext>``: on a local lake written to a
   temporary name in the same folder and renamed (readers never see half a file); on an object
   store one conditional PUT (``If-None-Match: *``) of that key through :mod:`lake.store`, so every
   node reads the original from the store.
2. **ingest** — :func:`jobs.ingest.single.ingest_file`: the ingest job's per-file functions in this
   process (``images``, ``sources``, ``thumbnails`` and ``capture`` rows as for any ingested file;
   collection ``uploads`` unless the caller names one), each table one deltalake commit; no job,
   listing, staging or runner (the one-file ingest job took 3.7 s of a 4.7 s upload at 100k).
3. **embed** — one ``features`` row committed under an ``embed`` run id, built from the upload's
   vector and logits exactly as :func:`jobs.embed.partition.embed_partition` builds its rows (same
   model key, float32 embedding, top-50 concepts). Running the embed job instead would decode the
   image again and pick up every other pending image of the lake.

The ingest and embed runs are recorded in ``job_runs`` as ``succeeded`` rows in one commit when the
upload ends (:class:`UploadRuns`), not as the jobs' running/ended pairs.
4. **index** — :func:`jobs.index.driver.run_index` (incremental: the image goes into the delta
   folder encoded with the base build's trained index; the job's rebuild rule may choose a full
   build). Skipped while the lake has no published build of the model (``imagelake index`` makes
   the first one).

Concurrency: uploads of one lake run one at a time (the lake lock ``upload``, waited for up to
``UPLOAD_LOCK_S``); every commit is serialised by the ``commit`` lock. An upload does **not** wait
for a running pipeline (``imagelake run`` / ``ingest``): it conflicts with a running *ingest*
(409, nothing stored in tables — retry later), and when an *index* build is running the image is
added and embedded but ``indexed`` is false: the next ``imagelake index`` folds it in.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from lake.catalog import TABLES, Lake
from lake.commit import commit_rows, open_table, rows_by_key
from lake.errors import BadInput, LockHeld
from lake.lock import LakeLock
from lake.settings import Settings

__all__ = ["AddResult", "UploadRuns", "add_image", "upload_key", "upload_path", "store_upload", "remove_upload",
           "ingest_upload", "UPLOAD_LOCK_S",
           "DEFAULT_COLLECTION"]

UPLOAD_LOCK_S = 120.0
DEFAULT_COLLECTION = "uploads"
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


@dataclass
class AddResult:
    image_id: str
    created: bool                 # the images table gained the row in this call
    uri: str
    collection: str | None
    embedded: bool                # a features row was committed in this call
    indexed: bool                 # the image is in the newest published build of the model
    build_id: str | None
    index_action: str | None      # run_index's action (incremental/full/up_to_date), None if not run
    note: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "created": self.created, "uri": self.uri,
                "collection": self.collection, "embedded": self.embedded, "indexed": self.indexed,
                "build_id": self.build_id, "index_action": self.index_action, "note": self.note,
                "seconds": self.seconds}


def upload_key(sha256: str, fmt: str) -> str:
    """The key of an upload with these bytes: ``uploads/<sha[:2]>/<sha>.<ext>`` (content-addressed)."""
    return f"uploads/{sha256[:2]}/{sha256}.{_EXTENSIONS.get(fmt, 'img')}"


def upload_path(lake: Lake, sha256: str, fmt: str) -> str:
    """Where an upload with these bytes is stored: ``<lake>/uploads/<sha[:2]>/<sha>.<ext>`` (a path
    on a local lake, an ``s3://…`` URI on an object-store one)."""
    return lake.path(*upload_key(sha256, fmt).split("/"))


def store_upload(lake: Lake, sha256: str, fmt: str, data: bytes) -> tuple[str, bool]:
    """Store the upload's bytes in the lake; (its URI, whether this call created it).

    Local lakes: a temporary name in the same folder, fsynced, renamed. Object stores: one
    conditional PUT (``If-None-Match: *``) through :class:`lake.store.LakeStore`: the name is the
    bytes' sha256, so an object already there holds these bytes and is kept."""
    path = upload_path(lake, sha256, fmt)
    if lake.is_local:
        fresh = not os.path.exists(path)
        _store(path, data)
        return path, fresh
    from lake.store import LakeStore

    return path, LakeStore.for_lake(lake).put_if_absent(upload_key(sha256, fmt), data) is not None


def remove_upload(lake: Lake, uri: str) -> None:
    """Remove a stored upload nothing refers to (ingest failed or rejected it)."""
    if lake.is_local:
        try:
            os.remove(uri)
        except FileNotFoundError:
            pass
        return
    from lake.store import LakeStore

    LakeStore.for_lake(lake).delete(uri[len(lake.root.rstrip("/")) + 1:])


def _store(path: str, data: bytes) -> None:
    if os.path.isfile(path) and os.path.getsize(path) == len(data):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _image_row(lake: Lake, image_id: str) -> dict | None:
    rows = rows_by_key(open_table(lake, "images"), "image_id", [image_id],
                       ["image_id", "seq", "uri", "collection"]).to_pylist()
    return rows[0] if rows else None


def _has_features(lake: Lake, image_id: str, model_key: str) -> bool:
    got = rows_by_key(open_table(lake, "features"), "image_id", [image_id], ["model"]).column("model")
    return model_key in got.to_pylist()


def _embed(lake: Lake, image_id: str, model_key: str, vector: np.ndarray, logits: np.ndarray | None) -> JobRun:
    """Commit the upload's ``features`` row under a new ``embed`` run; the run, to record."""
    from jobs.embed.partition import EmbedJob, top_concepts
    from jobs.runs import JobRun, new_run_id

    top_k = EmbedJob.__dataclass_fields__["top_k"].default
    if logits is None:   # a vector the client sent (imported embeddings): no concepts, as the importer
        concept_ids, concept_probs = [None], [None]
    else:
        ids, probs = top_concepts(np.asarray(logits, np.float32).reshape(1, -1), top_k)
        concept_ids, concept_probs = [ids[0].astype(np.int16).tolist()], [probs[0].astype(np.float32).tolist()]
    schema = TABLES["features"].schema
    run = JobRun(new_run_id("embed"), "embed", rows_in=1)
    row = pa.table({
        "image_id": pa.array([image_id], pa.string()),
        "model": pa.array([model_key], pa.string()),
        "embedding": pa.array([np.asarray(vector, np.float32).tolist()], pa.list_(pa.float32())),
        "concept_ids": pa.array(concept_ids, pa.list_(pa.int16())),
        "concept_probs": pa.array(concept_probs, pa.list_(pa.float32())),
        "run_id": pa.array([run.run_id], pa.string()),
        "created_at": pa.array([dt.datetime.now(dt.timezone.utc)], schema.field("created_at").type),
    })
    result = commit_rows(lake, "features", row, run_id=run.run_id, dedupe=True)
    run.rows_out = result.rows
    run.metrics.update(embedded=result.rows, pending=1, source="upload",
                       runtimes=["onnx-upload" if logits is not None else "client-vector"])
    return run


def _in_build(lake: Lake, row: dict, image_id: str) -> bool:
    import io

    from jobs.index.build import read_manifest, read_manifest_from_store
    from lake.store import LakeStore

    digest = np.frombuffer(bytes.fromhex(image_id), np.uint8)
    if lake.is_local:
        folder = os.path.join(lake.artifacts_dir(), row["path"])
        manifest, read_ids = read_manifest(folder), lambda f: np.load(os.path.join(f, "ids.npy"), mmap_mode="r")
        base = os.path.join(os.path.dirname(folder), manifest.get("base_build_id") or "")
    else:   # the build's keys in the store: its manifest and ids.npy (N x 32 bytes), read once here
        store = LakeStore.for_lake(lake)
        folder = f"artifacts/{row['path']}"
        manifest = read_manifest_from_store(store, folder)
        read_ids = lambda f: np.load(io.BytesIO(store.read_bytes(f"{f}/ids.npy")))  # noqa: E731
        base = f"{folder.rsplit('/', 1)[0]}/{manifest.get('base_build_id') or ''}"
    folders = [base, folder] if manifest.get("kind") == "incremental" else [folder]
    for f in folders:
        ids = read_ids(f)
        if len(ids) and np.any(np.all(np.asarray(ids) == digest, axis=1)):
            return True
    return False


def _index(lake: Lake, settings: Settings, model_key: str, image_id: str, result: AddResult) -> None:
    from jobs.index.driver import latest_build, run_index
    from jobs.runner import LocalRunner

    base = latest_build(lake, model_key)
    if base is None:
        result.note = "no index build of this model is published yet; `imagelake index` makes one"
        return
    if _in_build(lake, base, image_id):
        result.indexed, result.build_id = True, base["build_id"]
        return
    try:
        summary = run_index(lake, settings, model_key, runner=LocalRunner())
    except LockHeld:
        result.build_id = base["build_id"]
        result.note = ("an index build is running; the image is stored and embedded and the next "
                       "`imagelake index` makes it searchable")
        return
    result.index_action, result.build_id, result.indexed = summary["action"], summary["build_id"], True


class UploadRuns:
    """The runs of one upload's steps, recorded in ``job_runs`` in one commit when the upload ends
    (:func:`jobs.runs.record_finished_runs`), whether it succeeded or not."""

    def __init__(self, lake: Lake, args: dict[str, Any]):
        self.lake, self.args, self.runs = lake, args, []
        self.seconds = 0.0   # the recording commit's

    def add(self, run, started: dt.datetime) -> None:
        self.runs.append((run, started, self.args))

    def __enter__(self) -> "UploadRuns":
        return self

    def __exit__(self, *exc) -> None:
        from jobs.runs import record_finished_runs

        if self.runs:
            t0 = time.perf_counter()
            record_finished_runs(self.lake, self.runs, commit_id=f"{self.runs[0][0].run_id}:end")
            self.seconds = round(time.perf_counter() - t0, 3)


@contextmanager
def _no_ingest_job(lake: Lake) -> Iterator[None]:
    """Holds the lake's ``ingest`` lock: an upload never runs beside an ingest job (409 when one runs)."""
    lock = LakeLock(lake, "ingest", timeout=0, holder="api upload")
    try:
        lock.__enter__()
    except LockHeld as e:
        raise LockHeld(f"an ingest job is running on this lake ({e}); retry the upload when it is done") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def ingest_upload(lake: Lake, settings: Settings, sha256: str, fmt: str, data: bytes, collection: str,
                  runs: UploadRuns) -> dict:
    """Steps 1 and 2: store the bytes (:func:`store_upload`) and ingest that one file in this process
    (:func:`jobs.ingest.single.ingest_file`: no job, no runner); its ``images`` row. A stored file
    that ends up referenced by nothing (ingest failed or rejected it) is removed.

    Raises:
        BadInput: ingest rejected the file (the reason).
        LockHeld: an ingest job is running.
    """
    from jobs.ingest.decode import Rejected
    from jobs.ingest.single import ingest_file

    with _no_ingest_job(lake):
        started = dt.datetime.now(dt.timezone.utc)
        uri, fresh = store_upload(lake, sha256, fmt, data)
        try:
            runs.add(ingest_file(lake, settings, uri, data, collection), started)
        except Rejected as r:
            remove_upload(lake, uri)
            raise BadInput(f"the image could not be ingested ({r.reason}: {r.detail})") from None
        except BaseException:
            if fresh and _image_row(lake, sha256) is None:
                remove_upload(lake, uri)  # nothing refers to it; a retry stores it again
            raise
    row = _image_row(lake, sha256)
    if row is None:   # another sha: the stored name and the bytes disagree (cannot happen for checked bytes)
        raise BadInput("the image could not be ingested (its id differs from its sha256)")
    return row


def add_image(lake: Lake, settings: Settings, data: bytes, sha256: str, fmt: str, model_key: str,
              vector: np.ndarray, logits: np.ndarray, collection: str | None = None) -> AddResult:
    """Store, ingest, embed and index one image (see the module docstring); idempotent per bytes.

    Args:
        data, sha256, fmt: the checked upload (:class:`api.uploads.Upload`).
        model_key: ``name@version`` the vector was computed with (the served index's model).
        vector, logits: the upload's embedding and class logits under ``model_key``.
        collection: the ``collection`` column of a new image (default ``uploads``).
    Raises:
        StoreUnavailable: an object-store lake's store cannot be reached.
        LockHeld (409): another upload held the lake past ``UPLOAD_LOCK_S``, or an ingest is running.
        BadInput: ingest rejected the file.
    """
    collection = collection or DEFAULT_COLLECTION
    # no ensure_tables (6 creates "if absent", 0.34 s a request here): open_table creates a missing table
    timings: dict[str, float] = {}
    with LakeLock(lake, "upload", timeout=UPLOAD_LOCK_S, holder="api upload"), \
            UploadRuns(lake, {"source": "upload", "image_id": sha256, "model": model_key}) as runs:
        t0 = time.perf_counter()
        existing = _image_row(lake, sha256)
        created = existing is None
        if created:
            existing = ingest_upload(lake, settings, sha256, fmt, data, collection, runs)
        timings["ingest"] = round(time.perf_counter() - t0, 3)
        result = AddResult(sha256, created, existing["uri"], existing.get("collection"), False, False, None, None)
        t0 = time.perf_counter()
        if not _has_features(lake, sha256, model_key):
            runs.add(_embed(lake, sha256, model_key, vector, logits), dt.datetime.now(dt.timezone.utc))
            result.embedded = True
        timings["embed"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        _index(lake, settings, model_key, sha256, result)
        timings["index"] = round(time.perf_counter() - t0, 3)
    result.seconds = dict(timings, runs=runs.seconds)
    return result
