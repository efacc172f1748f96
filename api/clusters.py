"""Near-duplicate groups and topic clusters, as the last ``imagelake cluster`` run left them.

Reads go through the per-process SQL sandbox (views over every table, refreshed within
``refresh_s``) with ids validated before they are written into the statement.
"""

from __future__ import annotations

import json
import re

from flask import Blueprint, jsonify, request

from api.request_limits import int_arg
from api.services import check_image_id, lake_reader
from lake.errors import BadInput, NotFound

bp = Blueprint("clusters", __name__)

_CLUSTER_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")


def _rows(sql: str, max_rows: int = 10_000) -> list[tuple]:
    return lake_reader().query(sql, max_rows=max_rows).rows


def current_runs() -> tuple[str | None, str | None]:
    """(the last succeeded cluster run, its topic model run)."""
    rows = _rows("SELECT run_id, metrics FROM job_runs WHERE job = 'cluster' AND state = 'succeeded' "
                 "ORDER BY ended_at DESC, run_id DESC LIMIT 1")
    if not rows:
        return None, None
    metrics = json.loads(rows[0][1] or "{}")
    return rows[0][0], metrics.get("topic_model")


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@bp.get("/clusters")
def list_clusters():
    """``?kind=dup|topic`` (default dup), ``?level=`` (topic: number of clusters in the cut; default
    the coarsest), ``?limit=`` (1..500, 50), ``?offset=``: clusters with their sizes, largest first."""
    kind = request.args.get("kind", "dup")
    if kind not in ("dup", "topic"):
        raise BadInput(f"kind must be dup or topic, got {kind!r}")
    limit, offset = int_arg("limit", 50, 1, 500), int_arg("offset", 0, 0, 2**62)
    run_id, topic_model = current_runs()
    out = {"ok": True, "kind": kind, "run_id": run_id, "level": None, "levels": [], "total": 0, "clusters": []}
    if run_id is None:
        return jsonify(out)
    if kind == "dup":
        where = f"kind = 'dup' AND run_id = {_lit(run_id)}"
        out["level"] = 0
    else:
        out["run_id"] = topic_model
        levels = [r[0] for r in _rows(f"SELECT DISTINCT level FROM clusters WHERE kind = 'topic' AND "
                                      f"model_run = {_lit(topic_model)} ORDER BY 1")]
        out["levels"] = levels
        if not levels:
            return jsonify(out)
        level = int_arg("level", levels[0], 0, 2**31 - 1)
        if level not in levels:
            raise BadInput(f"level {level} is not a cut of the current topic model; levels are {levels}")
        out["level"] = level
        where = f"kind = 'topic' AND model_run = {_lit(topic_model)} AND level = {int(level)}"
    rows = _rows(f"SELECT cluster_id, count(DISTINCT image_id) AS size, count(*) OVER () AS total FROM clusters "
                 f"WHERE {where} GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {limit} OFFSET {offset}", max_rows=limit)
    out["total"] = rows[0][2] if rows else _rows(f"SELECT count(DISTINCT cluster_id) FROM clusters WHERE {where}")[0][0]
    out["clusters"] = [{"cluster_id": r[0], "size": r[1]} for r in rows]
    return jsonify(out)


@bp.get("/clusters/<cluster_id>")
def cluster(cluster_id: str):
    """Members of one cluster (any run's ids stay readable), most similar first, paged."""
    if not _CLUSTER_ID.fullmatch(cluster_id):
        raise BadInput(f"malformed cluster id {cluster_id[:80]!r}; take ids from GET /clusters")
    limit, offset = int_arg("limit", 100, 1, 500), int_arg("offset", 0, 0, 2**62)
    head = _rows(f"SELECT any_value(kind), any_value(level), count(DISTINCT image_id) FROM clusters "
                 f"WHERE cluster_id = {_lit(cluster_id)}")
    if not head or not head[0][2]:
        raise NotFound(f"no cluster {cluster_id!r}; take ids from GET /clusters")
    kind, level, total = head[0]
    rows = _rows(f"SELECT image_id, max(score) AS score FROM clusters WHERE cluster_id = {_lit(cluster_id)} "
                 f"GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {limit} OFFSET {offset}", max_rows=limit)
    return jsonify({"ok": True, "cluster_id": cluster_id, "kind": kind, "level": level, "size": total,
                    "members": [{"image_id": r[0], "score": r[1]} for r in rows]})


@bp.get("/images/<image_id>/clusters")
def image_clusters(image_id: str):
    """The image's near-duplicate group (current run) and its topic cluster at every level."""
    check_image_id(image_id)
    lake_reader().image(image_id)  # 404 for an unknown image
    run_id, topic_model = current_runs()
    clusters = []
    if run_id is not None:
        rows = _rows(f"SELECT kind, cluster_id, level, score FROM clusters WHERE image_id = {_lit(image_id)} AND "
                     f"((kind = 'dup' AND run_id = {_lit(run_id)}) OR "
                     f"(kind = 'topic' AND model_run = {_lit(topic_model or '')})) ORDER BY kind, level")
        clusters = [{"kind": r[0], "cluster_id": r[1], "level": r[2], "score": r[3]} for r in rows]
    return jsonify({"ok": True, "image_id": image_id, "clusters": clusters})


def openapi_paths(settings) -> dict:
    from api.openapi import IMAGE_ID_PARAM, errors, json_response

    page = [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
            {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}}]
    return {
        "/clusters": {"get": {
            "summary": "Near-duplicate groups (kind=dup) or topic clusters at one level (kind=topic), largest first",
            "operationId": "listClusters",
            "parameters": [
                {"name": "kind", "in": "query", "schema": {"type": "string", "enum": ["dup", "topic"], "default": "dup"}},
                {"name": "level", "in": "query", "description": "topic cut: its number of clusters (default the coarsest)",
                 "schema": {"type": "integer", "minimum": 0}}, *page],
            "responses": {"200": json_response({"type": "object", "required": ["ok", "kind", "clusters", "total"], "properties": {
                "ok": {"const": True}, "kind": {"type": "string"}, "run_id": {"type": ["string", "null"]},
                "level": {"type": ["integer", "null"]}, "levels": {"type": "array", "items": {"type": "integer"}},
                "total": {"type": "integer"},
                "clusters": {"type": "array", "items": {"type": "object", "properties": {
                    "cluster_id": {"type": "string"}, "size": {"type": "integer"}}}}}}, "One page of clusters"),
                **errors(400)},
        }},
        "/images/{image_id}/clusters": {"get": {
            "summary": "The image's near-duplicate group and its topic cluster at each level",
            "operationId": "getImageClusters",
            "parameters": [IMAGE_ID_PARAM],
            "responses": {"200": json_response({"type": "object", "required": ["ok", "image_id", "clusters"], "properties": {
                "ok": {"const": True}, "image_id": {"type": "string"},
                "clusters": {"type": "array", "items": {"type": "object", "properties": {
                    "kind": {"type": "string"}, "cluster_id": {"type": "string"}, "level": {"type": ["integer", "null"]},
                    "score": {"type": ["number", "null"]}}}}}}, "The image's clusters"),
                **errors(400, 404)},
        }},
        "/clusters/{cluster_id}": {"get": {
            "summary": "Members of a cluster (image ids with their similarity score), paged",
            "operationId": "getCluster",
            "parameters": [{"name": "cluster_id", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,200}$"}}, *page],
            "responses": {"200": json_response({"type": "object", "required": ["ok", "cluster_id", "members"], "properties": {
                "ok": {"const": True}, "cluster_id": {"type": "string"}, "kind": {"type": "string"},
                "level": {"type": "integer"}, "size": {"type": "integer"},
                "members": {"type": "array", "items": {"type": "object", "properties": {
                    "image_id": {"type": "string"}, "score": {"type": ["number", "null"]}}}}}}, "The members"),
                **errors(400, 404)},
        }},
    }
