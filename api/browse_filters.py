"""Browse filters: ``GET /images`` narrowed by folder, tag, bucket, cluster and a metadata /
capture filter, and ``GET /browse/filters``, the choices a filter bar offers (folders, tags,
buckets, clusters by name and size with preview images, cameras and the capture date range).

Without filters ``GET /images`` pages the per-version seq index (:mod:`api.browse_index`); with
any of ``folder``, ``tag``, ``bucket``, ``cluster`` or ``where`` the first page runs one DuckDB
query over the served views (every value bound as a parameter) for the matching seqs, kept per
filter and table versions (:class:`api.browse_index.FilteredIndexes`), so later pages, the
collection counts and a collection under the same filter are a slice and one range read:

- ``folder``: the image was seen at a path in that folder or below it (``sources.uri``);
- ``tag``: a current tag of any source (user, concept, learned by the last ``imagelake tag``);
- ``bucket``: a member of the bucket now (pending review excluded), from this process's fold of
  the curation log;
- ``cluster``: a member of the near-duplicate group or topic cluster (ids from ``/browse/filters``
  or ``GET /clusters``);
- ``where``: a filter of :mod:`lake.metadata_filter` (JSON) over images, metadata and capture
  columns, e.g. ``{"taken_at": {">=": "2020-01-01"}, "camera": "Canon EOS 5D", "has_gps": true}``;
- ``stack=dup``: each near-duplicate group of the current cluster run is one stack: its
  lowest-seq member stands for it (with ``stack: {cluster_id, size, members}``), the others are
  left out of the pages (the stacking is done before the other filters' paging: a stack whose
  first member is filtered out is not shown).

A cluster's name is the concept tag most of its members carry (summed concept probability), or
for a near-duplicate group the file name of its most central member.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
from typing import Any

import duckdb
import pyarrow as pa
from flask import Blueprint, jsonify, request

from api.auth import requires
from api.browse_index import FilteredIndexes, SeqIndex, seq_index
from api.request_limits import int_arg
from api.services import lake_reader
from jobs.tag.state import CURRENT_TAGS_SQL
from lake.errors import BadInput, NotFound
from lake.metadata_filter import FILTER_FROM, compile_filter, connection_columns, parse_filter
from lake.sql import jsonable

__all__ = ["FILTER_ARGS", "bp", "filtered_page", "has_filters"]

bp = Blueprint("browse_filters", __name__)

FILTER_ARGS = ("folder", "tag", "bucket", "cluster", "where", "stack")
_CLUSTER_ID = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
_BUCKET_ID = re.compile(r"[0-9a-f]{16}|discard")


_indexes: dict[str, FilteredIndexes] = {}  # per lake root: this process's recent filters' seq indexes
_indexes_lock = threading.Lock()


def _filtered_indexes(reader) -> FilteredIndexes:
    with _indexes_lock:
        return _indexes.setdefault(str(reader.lake.root), FilteredIndexes())


def _digest(values: list[str]) -> str:
    """A key for an id list bound into the filter (a bucket's or cluster's members, hidden stack members)."""
    h = hashlib.sha256()
    for v in values:
        h.update(v.encode())
        h.update(b"\n")
    return h.hexdigest()


def has_filters(args) -> bool:
    return any((args.get(name) or "").strip() for name in FILTER_ARGS)


def _text(args, name: str, limit: int = 1000) -> str | None:
    value = (args.get(name) or "").strip()
    if not value:
        return None
    if len(value) > limit:
        raise BadInput(f"{name} is longer than {limit} characters")
    return value


def _bucket_members(bucket_id: str) -> list[str]:
    from api.buckets import bucket_store

    if not _BUCKET_ID.fullmatch(bucket_id):
        raise BadInput(f"bucket must be a bucket id (16 hex characters, or discard), got {bucket_id[:40]!r}")
    with bucket_store().reading() as state:
        if bucket_id not in state.buckets:
            raise NotFound(f"no bucket {bucket_id}; GET /api/v1/buckets lists them")
        return state.member_ids(bucket_id, pending=False)


def _cluster_members(cluster_id: str) -> list[str]:
    from api.clusters import _lit, _rows

    if not _CLUSTER_ID.fullmatch(cluster_id):
        raise BadInput(f"malformed cluster id {cluster_id[:80]!r}; take ids from GET /browse/filters or /clusters")
    ids = [r[0] for r in _rows(f"SELECT DISTINCT image_id FROM clusters WHERE cluster_id = {_lit(cluster_id)}",
                               max_rows=10_000_000)]
    if not ids:
        raise NotFound(f"no cluster {cluster_id!r}; GET /api/v1/browse/filters lists them")
    return ids


_groups_cache: dict[str, dict[str, Any]] = {}  # per lake root
_groups_lock = threading.Lock()


def dup_groups() -> dict[str, list[str]]:
    """The current run's near-duplicate groups: cluster id -> member ids, lowest seq first. Kept per
    process for the versions of the tables they come from (clusters, job_runs, images), as this
    process's reader sees them: a new cluster run shows as soon as the reader sees its commit, and
    until then a group lookup is a dict read."""
    return _current_groups()["groups"]


def _current_groups() -> dict[str, Any]:
    from api.clusters import _lit, _rows, current_runs

    reader = lake_reader()
    cached = _groups_cache.setdefault(str(reader.lake.root), {"key": None, "groups": {}, "by_image": {}})
    versions = reader.refresh()
    key = tuple(versions.get(t) for t in ("clusters", "job_runs", "images"))
    if cached["key"] == key:
        return cached
    with _groups_lock:
        if cached["key"] == key:
            return cached
        reader.refresh_sql()  # the SQL below reads these versions, not an older snapshot
        run_id, _ = current_runs()
        groups: dict[str, list[str]] = {}
        if run_id is not None:
            for cluster_id, image_id in _rows(
                    f"SELECT c.cluster_id, c.image_id FROM clusters c JOIN images i USING (image_id) "
                    f"WHERE c.kind = 'dup' AND c.run_id = {_lit(run_id)} GROUP BY 1, 2 ORDER BY 1, min(i.seq)",
                    max_rows=10_000_000):
                groups.setdefault(cluster_id, []).append(image_id)
        by_image = {i: c for c, members in groups.items() if len(members) > 1 for i in members}
        cached.update(key=key, groups=groups, by_image=by_image)
        return cached


@bp.post("/dup-groups")
@requires("read")
def dup_groups_of():
    """``{"image_ids": [...]}`` → ``{"groups": {image_id: {cluster_id, size, members}}}``: the
    near-duplicate group (current cluster run, two or more images) of each given image that has
    one, members lowest seq first. Curate stacks a suggestion page with it."""
    from api.buckets import image_ids_arg, json_body

    ids = image_ids_arg(json_body(), "image_ids")
    current = _current_groups()
    out = {}
    for image_id in ids:
        cluster_id = current["by_image"].get(image_id)
        if cluster_id is not None:
            members = current["groups"][cluster_id]
            out[image_id] = {"cluster_id": cluster_id, "size": len(members), "members": members}
    return jsonify({"ok": True, "groups": out})


def filtered_page(args, *, limit: int, offset: int) -> dict[str, Any]:
    """``GET /images`` with filters: a page in seq order, the total, counts per collection (under
    the other filters) and the filters as understood."""
    collection = _text(args, "collection", 500)
    folder, tag = _text(args, "folder"), _text(args, "tag", 200)
    bucket, cluster = _text(args, "bucket", 40), _text(args, "cluster", 200)
    where = parse_filter(args.get("where"))
    stack = _text(args, "stack", 10)
    if stack not in (None, "dup"):
        raise BadInput(f"stack takes dup (near-duplicate groups as one stack), got {stack!r}")
    conds, params = [], []
    # id lists (a bucket's or cluster's members, hidden stack members) join as Arrow tables
    # registered on the cursor: ~10x faster than binding them as one list parameter (5,000 ids at
    # 70k images: 28 against 278 ms, tests/bench/bench_browse.py)
    id_lists: list[list[str]] = []
    stacks: dict[str, tuple[str, list[str]]] = {}  # a stack's first image -> (group, members)
    if stack:
        hidden = []
        for cluster_id, members in dup_groups().items():
            if len(members) > 1:
                stacks[members[0]] = (cluster_id, members)
                hidden.extend(members[1:])
        if hidden:
            conds.append(f"i.image_id NOT IN (SELECT image_id FROM @ids{len(id_lists)}@)")
            id_lists.append(hidden)
    if folder:
        prefix = folder.rstrip("/")
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"
        conds.append("i.image_id IN (SELECT image_id FROM sources WHERE uri LIKE ? ESCAPE '\\')")
        params.append(like)
    if tag:
        conds.append(f"i.image_id IN (SELECT image_id FROM ({CURRENT_TAGS_SQL}) WHERE tag = ?)")
        params.append(tag.lower())
    for ids in ([_bucket_members(bucket)] if bucket else []) + ([_cluster_members(cluster)] if cluster else []):
        conds.append(f"i.image_id IN (SELECT image_id FROM @ids{len(id_lists)}@)")
        id_lists.append(ids)
    reader = lake_reader()
    versions = tuple(sorted(reader.refresh().items()))
    key = (str(reader.lake.root), folder, tag, bucket, cluster, json.dumps(where, sort_keys=True, default=str), stack,
           versions, *(_digest(ids) for ids in id_lists))
    cur = reader.cursor()
    try:
        def build() -> SeqIndex:
            names = [f"_browse_ids_{uuid.uuid4().hex}" for _ in id_lists]
            for name, ids in zip(names, id_lists):
                cur.register(name, pa.table({"image_id": pa.array(ids, pa.string())}))
            conds_all, params_all = list(conds), list(params)
            for k, name in enumerate(names):
                conds_all = [c.replace(f"@ids{k}@", name) for c in conds_all]
            if where:
                sql, wparams = compile_filter(where, connection_columns(cur))
                conds_all.append(f"i.seq IN (SELECT i.seq FROM {FILTER_FROM} WHERE {sql})")
                params_all.extend(wparams)
            base = " AND ".join(conds_all) or "TRUE"
            try:
                got = cur.sql(f"SELECT i.seq, coalesce(i.collection, '') AS collection FROM images i WHERE {base} "
                                  "ORDER BY i.seq", params=params_all).to_arrow_table()
            except duckdb.Error as e:
                raise BadInput(f"the filter could not be applied: {str(e).splitlines()[0]}") from None
            finally:
                for name in names:
                    cur.unregister(name)
            return seq_index(None, got)

        index = _filtered_indexes(reader).get(key, build)
        seqs = index.page(offset, limit, collection)
        page = []
        if len(seqs):
            cur.execute("SELECT i.image_id, i.seq, i.collection, i.format, i.width, i.height FROM images i "
                        "WHERE i.seq BETWEEN ? AND ? AND i.seq IN (SELECT unnest(CAST(? AS BIGINT[]))) ORDER BY i.seq",
                        [int(seqs[0]), int(seqs[-1]), [int(x) for x in seqs]])
            cols = [d[0] for d in cur.description]
            page = [dict(zip(cols, row)) for row in cur.fetchall()]
    finally:
        cur.close()
    for row in page:
        if row["image_id"] in stacks:
            row["stack"] = {"cluster_id": stacks[row["image_id"]][0], "size": len(stacks[row["image_id"]][1]),
                            "members": stacks[row["image_id"]][1]}
    by_collection = {(c or None): n for c, n in index.counts.items()}
    total = index.total(collection)
    filters = {k: v for k, v in (("folder", folder), ("tag", tag), ("bucket", bucket), ("cluster", cluster),
                                 ("where", where), ("stack", stack)) if v}
    return {"images": page, "total": total, "collections": by_collection, "filters": filters}


# -- the choices ----------------------------------------------------------------------------------

def _folders(cur, limit: int) -> list[dict[str, Any]]:
    rows = cur.execute("SELECT regexp_replace(uri, '/[^/]*$', '') AS folder, count(DISTINCT image_id) AS n "
                       "FROM sources GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?", [limit]).fetchall()
    return [{"folder": f, "images": n} for f, n in rows]


def _tags(cur, limit: int) -> list[dict[str, Any]]:
    rows = cur.execute(f"SELECT tag, string_agg(DISTINCT source, ',' ORDER BY source) AS sources, "
                       f"count(DISTINCT image_id) AS n FROM ({CURRENT_TAGS_SQL}) GROUP BY 1 ORDER BY 3 DESC, 1 LIMIT ?",
                       [limit]).fetchall()
    return [{"tag": t, "sources": s.split(","), "images": n} for t, s, n in rows]


def _capture(cur) -> dict[str, Any]:
    (first, last, gps, dated), = cur.execute(
        "SELECT min(taken_at), max(taken_at), count(*) FILTER (WHERE has_gps), count(taken_at) FROM capture").fetchall()
    cameras = cur.execute("SELECT camera, count(*) FROM capture WHERE camera IS NOT NULL GROUP BY 1 "
                          "ORDER BY 2 DESC, 1 LIMIT 50").fetchall()
    return {"taken_from": first, "taken_to": last, "dated": dated, "with_gps": gps,
            "cameras": [{"camera": c, "images": n} for c, n in cameras]}


def cluster_choices(kind: str, limit: int) -> dict[str, Any]:
    """The largest clusters of the current run (topic: the coarsest cut), each with a name, its
    size and up to three preview image ids (most central first)."""
    from api.clusters import _lit, _rows, current_runs

    run_id, topic_model = current_runs()
    if run_id is None:
        return {"kind": kind, "level": None, "clusters": []}
    level = 0
    if kind == "dup":
        where = f"kind = 'dup' AND run_id = {_lit(run_id)}"
    else:
        levels = [r[0] for r in _rows(f"SELECT DISTINCT level FROM clusters WHERE kind = 'topic' AND "
                                      f"model_run = {_lit(topic_model or '')} ORDER BY 1")]
        if not levels:
            return {"kind": kind, "level": None, "clusters": []}
        level = levels[0]
        where = f"kind = 'topic' AND model_run = {_lit(topic_model)} AND level = {int(level)}"
    rows = _rows(f"""
        WITH c AS (SELECT cluster_id, image_id, max(score) AS score FROM clusters WHERE {where} GROUP BY 1, 2),
        sizes AS (SELECT cluster_id, count(*) AS n FROM c GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {int(limit)}),
        top AS (SELECT c.* FROM c JOIN sizes USING (cluster_id)),
        pv AS (SELECT cluster_id, list(image_id ORDER BY score DESC NULLS LAST, image_id) AS ids FROM top GROUP BY 1),
        nm AS (SELECT top.cluster_id, t.tag, sum(coalesce(t.score, 0)) AS w FROM top
               JOIN tags t ON t.image_id = top.image_id AND t.source = 'concept' GROUP BY 1, 2),
        best AS (SELECT cluster_id, arg_max(tag, w) AS name FROM nm GROUP BY 1)
        SELECT s.cluster_id, s.n, pv.ids[1:3], best.name, i.uri FROM sizes s
        JOIN pv USING (cluster_id) LEFT JOIN best USING (cluster_id)
        LEFT JOIN images i ON i.image_id = pv.ids[1]
        ORDER BY s.n DESC, s.cluster_id""", max_rows=limit)
    out = []
    for cluster_id, n, preview, name, uri in rows:
        if kind == "dup":
            label = f"copies of {(uri or '').rsplit('/', 1)[-1] or cluster_id}"
        else:
            label = name or f"topic {cluster_id.rsplit('.', 1)[-1]}"
        out.append({"cluster_id": cluster_id, "kind": kind, "name": label, "size": n, "preview": list(preview or [])})
    return {"kind": kind, "level": level, "clusters": out}


@bp.get("/browse/filters")
def filters():
    """What Browse can filter on: folders, tags, buckets, clusters (named, sized, with previews), capture."""
    from api.buckets import bucket_store

    limit = int_arg("limit", 100, 1, 500)
    cur = lake_reader().cursor()
    try:
        folders, tags, capture = _folders(cur, limit), _tags(cur, limit), _capture(cur)
    finally:
        cur.close()
    with bucket_store().reading() as state:
        buckets = [{"bucket_id": b["bucket_id"], "name": b["name"], "images": b["count"]} for b in state.listing()]
    return jsonify({"ok": True, **jsonable({
        "folders": folders, "tags": tags, "buckets": buckets, "capture": capture,
        "clusters": {"topic": cluster_choices("topic", min(limit, 60)), "dup": cluster_choices("dup", min(limit, 60))}})})


def openapi_paths(settings) -> dict:
    from api.openapi import errors, json_response

    cluster = {"type": "object", "properties": {
        "cluster_id": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
        "size": {"type": "integer"}, "preview": {"type": "array", "items": {"type": "string"}}}}
    group = {"type": "object", "properties": {"kind": {"type": "string"}, "level": {"type": ["integer", "null"]},
                                              "clusters": {"type": "array", "items": cluster}}}
    return {"/dup-groups": {"post": {
        "summary": "The near-duplicate group (members, size) of each given image that has one (read scope)",
        "operationId": "dupGroupsOf",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["image_ids"], "properties": {
                "image_ids": {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}}}}}},
        "responses": {"200": json_response({"type": "object", "required": ["ok", "groups"], "properties": {
            "ok": {"const": True}, "groups": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                "cluster_id": {"type": "string"}, "size": {"type": "integer"},
                "members": {"type": "array", "items": {"type": "string"}}}}}}}, "The groups, by image id"),
            **errors(400, 404, 413)}},
    }, "/browse/filters": {"get": {
        "summary": "Browse's filter choices: folders, tags, buckets, clusters (name, size, previews), capture range and cameras",
        "operationId": "browseFilters",
        "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}}],
        "responses": {"200": json_response({"type": "object", "required": ["ok", "folders", "tags", "buckets", "clusters"],
                                            "properties": {
            "ok": {"const": True},
            "folders": {"type": "array", "items": {"type": "object", "properties": {
                "folder": {"type": "string"}, "images": {"type": "integer"}}}},
            "tags": {"type": "array", "items": {"type": "object", "properties": {
                "tag": {"type": "string"}, "sources": {"type": "array", "items": {"type": "string"}},
                "images": {"type": "integer"}}}},
            "buckets": {"type": "array", "items": {"type": "object"}},
            "capture": {"type": "object"},
            "clusters": {"type": "object", "properties": {"topic": group, "dup": group}}}}, "The choices"),
            **errors(400)}}}}
