"""A bucket's members as a download, now or at a point of its log, and what changed between two
points: ``GET /buckets/<id>/export`` and ``GET /buckets/<id>/diff`` (see :mod:`lake.bucket_export`)."""

from __future__ import annotations

import re

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context

from api.buckets import BUCKET_ID_PARAM, bucket_store
from lake.bucket_export import (FORMATS, MAX_ZIP_BYTES, bucket_diff, check_zip_size, manifest, manifest_bytes,
                                parse_point, point_arg, snapshot, zip_chunks)
from lake.buckets import check_bucket_id
from lake.errors import BadInput
from lake.sql import jsonable

__all__ = ["bp", "openapi_paths"]

bp = Blueprint("bucket_export", __name__)

_TYPES = {"csv": "text/csv; charset=utf-8", "json": "application/json", "parquet": "application/vnd.apache.parquet",
          "zip": "application/zip"}


def _filename(bucket: dict, log_version, fmt: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", bucket.get("name") or "bucket").strip("._")[:60] or "bucket"
    return f"{name}-{bucket['bucket_id']}-v{log_version if log_version is not None else 0}.{fmt}"


@bp.get("/buckets/<bucket_id>/export")
def export_bucket(bucket_id: str):
    """``?format=csv|json|parquet|zip`` (default csv), ``?version=N`` or ``?as_of=ISO-8601``."""
    check_bucket_id(bucket_id)
    fmt = request.args.get("format", "csv")
    if fmt not in FORMATS:
        raise BadInput(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    point = parse_point(request.args.get("version"), request.args.get("as_of"))
    lake = bucket_store().lake
    snap = snapshot(lake, bucket_id, point)
    table = manifest(lake, snap)
    headers = {"Content-Disposition": f'attachment; filename="{_filename(snap.bucket, snap.log_version, fmt)}"',
               "X-Bucket-Log-Version": str(snap.log_version if snap.log_version is not None else ""),
               "X-Bucket-Members": str(table.num_rows)}
    if fmt == "zip":
        check_zip_size(table, current_app.config.get("IMAGELAKE_EXPORT_ZIP_MAX_BYTES", MAX_ZIP_BYTES))
        return Response(stream_with_context(zip_chunks(table)), mimetype=_TYPES[fmt], headers=headers)
    return Response(manifest_bytes(table, fmt), content_type=_TYPES[fmt], headers=headers)


@bp.get("/buckets/<bucket_id>/diff")
def diff_bucket(bucket_id: str):
    """``?from=`` and ``?to=`` (each a version of bucket_events or an ISO 8601 time; ``to`` defaults
    to the latest): the images that joined and those that left in between."""
    check_bucket_id(bucket_id)
    start = point_arg(request.args.get("from"), what="from")
    end = point_arg(request.args.get("to"), what="to") if request.args.get("to") not in (None, "") else parse_point()
    out = bucket_diff(bucket_store().lake, bucket_id, start, end)
    return jsonify({"ok": True, **jsonable(out)})


def openapi_paths(settings) -> dict:
    from api.openapi import errors, json_response

    point = [{"name": "version", "in": "query", "description": "a Delta version of bucket_events",
              "schema": {"type": "integer", "minimum": 0}},
             {"name": "as_of", "in": "query", "description": "the newest version committed at or before this time",
              "schema": {"type": "string", "format": "date-time"}}]
    ids = {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}
    when = {"oneOf": [{"type": "integer", "minimum": 0}, {"type": "string", "format": "date-time"}]}
    return {
        "/buckets/{bucket_id}/export": {"get": {
            "summary": "The bucket's members (now or at a point of its log) as a manifest or a zip of originals",
            "description": "Manifest columns: image_id, path, file_name, collection, width, height, bytes, label "
                           "(the bucket's name), user_tags, bucket_id, joined_seq, log_version. A zip holds the "
                           f"originals and manifest.csv; above {MAX_ZIP_BYTES // 2**20} MiB of originals it is "
                           "refused with 413.",
            "operationId": "exportBucket",
            "parameters": [BUCKET_ID_PARAM,
                           {"name": "format", "in": "query",
                            "schema": {"type": "string", "enum": list(FORMATS), "default": "csv"}}, *point],
            "responses": {"200": {"description": "The export as an attachment", "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/json": {"schema": {"type": "object", "properties": {
                    "columns": {"type": "array", "items": {"type": "string"}},
                    "rows": {"type": "array", "items": {"type": "object"}}}}},
                "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}},
                "application/zip": {"schema": {"type": "string", "format": "binary"}}}},
                **errors(400, 404, 413)}}},
        "/buckets/{bucket_id}/diff": {"get": {
            "summary": "Images that joined and left the bucket between two points of its log",
            "operationId": "diffBucket",
            "parameters": [BUCKET_ID_PARAM,
                           {"name": "from", "in": "query", "required": True, "schema": when,
                            "description": "a version of bucket_events or an ISO 8601 time"},
                           {"name": "to", "in": "query", "schema": when, "description": "default: the latest"}],
            "responses": {"200": json_response({"type": "object", "properties": {
                "ok": {"const": True}, "bucket_id": {"type": "string"},
                "from_version": {"type": ["integer", "null"]}, "to_version": {"type": ["integer", "null"]},
                "joined": ids, "left": ids, "from_count": {"type": "integer"}, "to_count": {"type": "integer"}}},
                "What changed"), **errors(400, 404)}}},
    }
