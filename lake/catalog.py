"""The table catalog: every table's Arrow schema, key and purpose, and where things live in a lake.

A lake root holds ``tables/<name>`` (Delta tables), ``artifacts/`` (index shards, map tiles; each
build in its own folder with a manifest), ``_staging/<run_id>/<table>/part-NNNNN.parquet`` (files
tasks write before the driver commits) and ``_locks/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa

from lake.errors import BadInput, NotFound

__all__ = ["TableSpec", "TABLES", "Lake", "table_spec"]

_TS = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    description: str
    sort_by: tuple[str, ...] = ()
    row_group_rows: int | None = None
    evolving: bool = False  # the schema holds the fixed columns; writes may add more (Delta schema evolution)


def _spec(name, key, description, fields, sort_by=(), row_group_rows=None, evolving=False) -> TableSpec:
    return TableSpec(name, pa.schema(fields), tuple(key), description, tuple(sort_by), row_group_rows, evolving)


TABLES: dict[str, TableSpec] = {t.name: t for t in (
    _spec("images", ["image_id"], "One row per distinct image content; seq is the dense int64 id FAISS uses.", [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("collection", pa.string()),
        pa.field("format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("bytes", pa.int64()),
        pa.field("mtime", _TS),
        pa.field("run_id", pa.string()),
        pa.field("ingested_at", _TS),
    ], sort_by=["image_id"], row_group_rows=8192),
    _spec("sources", ["uri", "image_id"], "Every path seen at ingest and the content it held (duplicates keep all paths).", [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("collection", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("mtime", _TS),
        pa.field("run_id", pa.string()),
        pa.field("ingested_at", _TS),
    ], sort_by=["uri"]),
    _spec("thumbnails", ["image_id", "size"], "JPEG thumbnails (longest side = size px), EXIF orientation applied.", [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("size", pa.int32(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("jpeg", pa.binary()),
    ], sort_by=["image_id", "size"], row_group_rows=512),
    _spec("rejects", ["uri", "bytes", "mtime", "stage"], "Inputs that could not be used, with the reason; a bad file never stops a run.", [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("collection", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("mtime", _TS),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("rejected_at", _TS),
    ]),
    _spec("features", ["image_id", "model"], "Embeddings and top-k concept probabilities per image and features key: model is name@version for float32 vectors, name@version+bf16 (or +fp16) for vectors computed in reduced precision; one key never mixes precisions.", [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("concept_ids", pa.list_(pa.int16())),
        pa.field("concept_probs", pa.list_(pa.float32())),
        pa.field("run_id", pa.string()),
        pa.field("created_at", _TS),
    ], sort_by=["image_id"]),
    _spec("index_builds", ["build_id"], "FAISS index builds; a build is served only once published here. An incremental build adds one delta folder to its base build.", [
        pa.field("build_id", pa.string(), nullable=False),
        pa.field("kind", pa.string()),
        pa.field("base_build_id", pa.string()),
        pa.field("model", pa.string()),
        pa.field("factory", pa.string()),
        pa.field("d", pa.int32()),
        pa.field("ntotal", pa.int64()),
        pa.field("faiss_version", pa.string()),
        pa.field("source_version", pa.int64()),
        pa.field("path", pa.string()),
        pa.field("shards", pa.list_(pa.struct([("file", pa.string()), ("sha256", pa.string()), ("ntotal", pa.int64())]))),
        pa.field("manifest_sha256", pa.string()),
        pa.field("params", pa.string()),
        pa.field("state", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("created_at", _TS),
    ]),
    _spec("clusters", ["run_id", "image_id", "kind", "level"], "Near-duplicate groups (kind=dup, level 0) and topic clusters (kind=topic, level = the number of clusters in that cut); model_run is the run whose centroids (topic) or grouping (dup) the row belongs to.", [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("cluster_id", pa.string()),
        pa.field("level", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("created_at", _TS),
        pa.field("model_run", pa.string()),
    ]),
    _spec("tags", ["image_id", "tag", "source", "run_id"], "Model tags (source concept or learned) and user tags, append-only: a user edit is a row with action add or remove; the latest row per image, tag and source wins.", [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("tag", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("score", pa.float32()),
        pa.field("model", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("created_at", _TS),
        pa.field("action", pa.string()),
        pa.field("actor", pa.string()),
    ]),
    _spec("bucket_events", ["event_id"], "Append-only log of curation actions in seq order (dense, assigned by the log's writer in Delta commit order); current bucket state is a fold over it (lake.buckets).", [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("bucket_id", pa.string()),
        pa.field("action", pa.string(), nullable=False),
        pa.field("image_ids", pa.list_(pa.string())),
        pa.field("payload", pa.string()),
        pa.field("actor", pa.string()),
        pa.field("at", _TS),
        pa.field("seq", pa.int64()),
        pa.field("rejected_ids", pa.list_(pa.string())),
        pa.field("from_bucket", pa.string()),
        pa.field("undo_of", pa.string()),
        pa.field("client_event_id", pa.string()),
        pa.field("actor_name", pa.string()),
    ]),
    _spec("grid", ["layout_id", "image_id"], "2D projection coordinates and grid cell per image and layout.", [
        pa.field("layout_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("x", pa.float32()),
        pa.field("y", pa.float32()),
        pa.field("gx", pa.int32()),
        pa.field("gy", pa.int32()),
        pa.field("created_at", _TS),
    ]),
    _spec("grid_layouts", ["layout_id"], "One row per finished grid layout: its size, inputs, quality and tile artifact; written after the grid rows and tiles, so a listed layout is complete.", [
        pa.field("layout_id", pa.string(), nullable=False),
        pa.field("model", pa.string()),
        pa.field("where_sql", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("n", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("method", pa.string()),
        pa.field("quality", pa.float32()),
        pa.field("quality_sample", pa.int64()),
        pa.field("features_version", pa.int64()),
        pa.field("tiles_path", pa.string()),
        pa.field("params", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("created_at", _TS),
    ]),
    _spec("tokens", ["token_id", "action"], "API tokens, append-only: a create row (scope, sha256 of the secret) and maybe a revoke row.", [
        pa.field("token_id", pa.string(), nullable=False),
        pa.field("action", pa.string(), nullable=False),
        pa.field("scope", pa.string()),
        pa.field("name", pa.string()),
        pa.field("secret_sha256", pa.string()),
        pa.field("at", _TS),
    ]),
    _spec("metadata", ["image_id"], "Imported per-image metadata (imagelake metadata import); the schema evolves: "
          "these fixed columns plus one column per imported field.", [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source_file", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("imported_at", _TS),
    ], evolving=True),
    _spec("metadata_rejects", ["run_id", "row_number"], "Metadata rows that were not imported (no matching image, "
          "ambiguous, bad value, ...), kept as JSON with the reason.", [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("row_number", pa.int64(), nullable=False),
        pa.field("source_file", pa.string()),
        pa.field("key", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("row", pa.string()),
        pa.field("rejected_at", _TS),
    ]),
    _spec("capture", ["image_id"], "Capture metadata read at ingest from EXIF, IPTC and XMP (jobs/capture): when "
          "(taken_at in UTC, taken_offset as recorded), with what (make, model, camera, lens, exposure) and where "
          "(GPS in decimal degrees and metres); a field the file lacks or that is malformed is null, and "
          "issues says why for malformed ones (<field>:<reason>).", [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("taken_at", _TS),
        pa.field("taken_offset", pa.string()),
        pa.field("make", pa.string()),
        pa.field("model", pa.string()),
        pa.field("camera", pa.string()),
        pa.field("lens", pa.string()),
        pa.field("focal_mm", pa.float64()),
        pa.field("exposure_s", pa.float64()),
        pa.field("f_number", pa.float64()),
        pa.field("iso", pa.int32()),
        pa.field("gps_lat", pa.float64()),
        pa.field("gps_lon", pa.float64()),
        pa.field("gps_alt", pa.float64()),
        pa.field("has_gps", pa.bool_()),
        pa.field("orientation", pa.int32()),
        pa.field("keywords", pa.list_(pa.string())),
        pa.field("title", pa.string()),
        pa.field("issues", pa.list_(pa.string())),
        pa.field("run_id", pa.string()),
        pa.field("created_at", _TS),
    ], sort_by=["image_id"]),
    _spec("image_quality", ["image_id"], "Image quality measures from the 256 px thumbnail (the pipeline's quality "
          "step, jobs/quality): blur = variance of the Laplacian of the grey image, brightness and contrast = mean "
          "and standard deviation of grey levels (0..1), entropy = bits of the grey histogram; one flag per issue "
          "(thresholds: settings quality_*), issues lists the flags set.", [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("blur", pa.float64()),
        pa.field("brightness", pa.float64()),
        pa.field("contrast", pa.float64()),
        pa.field("entropy", pa.float64()),
        pa.field("saturation", pa.float64()),
        pa.field("aspect", pa.float64()),
        pa.field("blurry", pa.bool_()),
        pa.field("dark", pa.bool_()),
        pa.field("bright", pa.bool_()),
        pa.field("low_contrast", pa.bool_()),
        pa.field("low_information", pa.bool_()),
        pa.field("grayscale", pa.bool_()),
        pa.field("odd_aspect", pa.bool_()),
        pa.field("tiny", pa.bool_()),
        pa.field("issues", pa.list_(pa.string())),
        pa.field("run_id", pa.string()),
        pa.field("created_at", _TS),
    ], sort_by=["image_id"]),
    _spec("outliers", ["build_id", "image_id"], "How unusual each image is (the pipeline's outliers step, jobs/outliers): "
          "score = 1 - the mean cosine similarity to its k nearest neighbours in index build build_id (k = "
          "setting outlier_k); rank 1 is the most unusual. The current scores are those of the newest build.", [
        pa.field("build_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("score", pa.float32()),
        pa.field("nearest", pa.float32()),
        pa.field("rank", pa.int64()),
        pa.field("k", pa.int32()),
        pa.field("run_id", pa.string()),
        pa.field("created_at", _TS),
    ], sort_by=["image_id"]),
    _spec("embedding_rejects", ["model", "source_file", "row_number", "reason"], "Rows of an embeddings file "
          "(imagelake embed --import) that were not imported, with the reason (unknown_key, duplicate_key, "
          "bad_dimension, not_finite, zero_vector, bad_probs, null); row_number counts from 1.", [
        pa.field("model", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("row_number", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("key", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("rejected_at", _TS),
    ]),
    _spec("job_runs", ["run_id", "state"], "One row when a job run starts and one when it ends (state running, then succeeded or failed; abandoned, written by a later run, when the run's process died without ending it). host, pid and process name the run's process (null in rows of older versions).", [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("job", pa.string(), nullable=False),
        pa.field("state", pa.string(), nullable=False),
        pa.field("started_at", _TS),
        pa.field("ended_at", _TS),
        pa.field("rows_in", pa.int64()),
        pa.field("rows_out", pa.int64()),
        pa.field("metrics", pa.string()),
        pa.field("error", pa.string()),
        pa.field("args", pa.string()),
        pa.field("host", pa.string()),
        pa.field("pid", pa.int64()),
        pa.field("process", pa.string()),
    ]),
)}


def table_spec(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise NotFound(f"no table {name!r}; tables are: {', '.join(TABLES)}") from None


@dataclass(frozen=True)
class Lake:
    """Where a lake's parts live. ``root`` is a local path or a URI (s3://, gs://, az://, file://)."""

    root: str

    @classmethod
    def at(cls, root: str | os.PathLike) -> "Lake":
        root = str(root)
        if not root:
            raise BadInput("the lake root is empty; pass --lake PATH")
        if "://" not in root:
            root = str(Path(root).expanduser().absolute())
        elif root.startswith("file://"):
            root = urlparse(root).path
        return cls(root.rstrip("/") or "/")

    @property
    def is_local(self) -> bool:
        return "://" not in self.root

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def table_uri(self, name: str) -> str:
        table_spec(name)
        return self.path("tables", name)

    def staging_dir(self, run_id: str) -> str:
        return self.path("_staging", run_id)

    def artifacts_dir(self, *parts: str) -> str:
        return self.path("artifacts", *parts)

    def locks_dir(self) -> str:
        return self.path("_locks")

    def ensure(self) -> "Lake":
        if self.is_local:
            for sub in ("tables", "artifacts", "_staging", "_locks"):
                os.makedirs(self.path(sub), exist_ok=True)
        return self


def markdown(names: list[str] | None = None) -> str:
    """The README's section for each table (``python -m lake.catalog`` prints them all)."""
    out = []
    for spec in (TABLES[n] for n in (names or TABLES)):
        rows = "\n".join(f"| `{f.name}` | {f.type}{'' if f.nullable else ', not null'} |" for f in spec.schema)
        out.append(f"**`{spec.name}`** — {spec.description} Key: {', '.join(spec.key)}.\n\n"
                   f"| column | type |\n|---|---|\n{rows}\n")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown())
