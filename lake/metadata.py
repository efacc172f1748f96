"""Bring your own metadata: import a CSV, JSON-lines or Parquet file into the ``metadata`` table.

Each row of the file names an image by a key — its file name, its URI, or its image id — and its
other columns become columns of ``metadata`` (one row per ``image_id``). Re-importing updates the
rows it keys (an upsert on ``image_id``: the file's columns are overwritten, other columns kept)
and a column the table lacks is added (Delta schema evolution). Rows that match no image, match
several, repeat an image, or hold a value of the wrong type go to ``metadata_rejects`` with the
reason and the row as JSON; nothing is dropped silently.

Types: ``string``, ``int`` (int64), ``float`` (double), ``bool``, ``date``, ``timestamp`` (UTC) and
``list<one of those>``. CSV cells are inferred (a column is int when every value is an integer
without leading zeros, then float (likewise), bool, date, timestamp, else string; a column whose every value is
a JSON array is ``list<string>``); JSON lines and Parquet keep their own types (nested objects are
stored as JSON text). ``--type COL=TYPE`` overrides; a column already in the lake keeps its type.

The filter language and facets live in :mod:`lake.metadata_filter` and are re-exported here.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import duckdb
import pyarrow as pa
from deltalake import CommitProperties, Transaction, WriterProperties, write_deltalake

from lake.catalog import TABLES, Lake
from lake.commit import commit_rows, now_utc, open_table
from lake.errors import BadInput
from lake.lock import LakeLock
from lake.metadata_types import (TYPES, _convert, _infer_csv, _lit, _native_kind, _q, normalise_column,
                                 parse_type_overrides)
from lake.metadata_filter import (FILTER_FROM, FilterColumn, column_kind, compile_filter, facet_counts,
                                  filter_columns, lake_connection, matching_seqs, parse_filter)

__all__ = [
    "KEY_KINDS", "FORMATS", "TYPES", "ImportSummary", "import_metadata", "metadata_columns",
    "parse_type_overrides", "normalise_column",
    "FILTER_FROM", "FilterColumn", "compile_filter", "facet_counts", "filter_columns", "matching_seqs",
    "parse_filter",
]

KEY_KINDS = ("filename", "uri", "image_id")
FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
           ".parquet": "parquet", ".pq": "parquet"}
_DEFAULT_KEY_COLUMNS = {"filename": ("filename", "file_name", "file", "id", "name"),
                        "uri": ("uri", "path", "url", "file"),
                        "image_id": ("image_id", "sha256", "id")}
_FIXED = tuple(TABLES["metadata"].schema.names)  # image_id, source_file, run_id, imported_at
_EXAMPLES = 5


@dataclass
class ImportSummary:
    """What one import did. ``examples`` are the first rejects: row, key, reason, detail."""

    run_id: str
    source_file: str
    rows: int = 0
    imported: int = 0
    inserted: int = 0
    updated: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)       # imported column -> type
    new_columns: list[str] = field(default_factory=list)        # added to the table by this import

    def lines(self) -> list[str]:
        out = [f"metadata {self.run_id}: {self.rows} rows read from {self.source_file}, {self.imported} imported "
               f"({self.inserted} new, {self.updated} updated), {self.rejected} rejected"]
        if self.new_columns:
            out.append("new columns: " + ", ".join(f"{c} ({self.columns[c]})" for c in self.new_columns))
        if self.rejected:
            out.append("rejected: " + ", ".join(f"{r} {n}" for r, n in sorted(self.reasons.items())))
            for e in self.examples:
                out.append(f"  row {e['row_number']} key {e['key']!r}: {e['reason']}: {e['detail']}")
            out.append(f"all of them: imagelake sql \"SELECT * FROM metadata_rejects WHERE run_id = '{self.run_id}'\"")
        return out


def _read(con: duckdb.DuckDBPyConnection, path: str, fmt: str) -> pa.Table:
    source = _lit(path)
    reader = {"csv": f"read_csv({source}, header=true, all_varchar=true, sample_size=-1)",
              "jsonl": f"read_json({source}, format='newline_delimited', records=true, sample_size=-1)",
              "parquet": f"read_parquet({source})"}[fmt]
    try:
        return con.sql(f"SELECT * FROM {reader}").to_arrow_table()
    except duckdb.Error as e:
        raise BadInput(f"cannot read {path} as {fmt}: {str(e).splitlines()[0]} "
                       "(pass --format csv|jsonl|parquet if the extension misleads)") from None


def _key_sql(kind: str, collection: str | None) -> tuple[str, list[Any]]:
    """CTEs ending in ``hits(_key, ids)``: the distinct image ids each key value matches."""
    where = "WHERE collection = ?" if collection is not None else ""
    params = [collection, collection] if collection is not None else []
    cand = f"cand AS (SELECT image_id, uri FROM images {where} UNION SELECT image_id, uri FROM sources {where})"
    keys = "keys AS (SELECT DISTINCT _key FROM keyed WHERE _key IS NOT NULL)"
    if kind == "filename":
        return (f"{cand}, {keys}, "
                r"names AS (SELECT DISTINCT image_id, regexp_extract(uri, '[^/\\]*$') AS name FROM cand), "
                r"stems AS (SELECT DISTINCT image_id, regexp_replace(name, '\.[^.]*$', '') AS stem FROM names), "
                "by_name AS (SELECT k._key, list(DISTINCT n.image_id ORDER BY n.image_id) AS ids FROM keys k "
                "JOIN names n ON n.name = k._key GROUP BY 1), "
                "by_stem AS (SELECT k._key, list(DISTINCT n.image_id ORDER BY n.image_id) AS ids FROM keys k "
                "JOIN stems n ON n.stem = k._key GROUP BY 1), "
                "hits AS (SELECT k._key, coalesce(a.ids, b.ids) AS ids FROM keys k "
                "LEFT JOIN by_name a ON a._key = k._key LEFT JOIN by_stem b ON b._key = k._key)"), params
    if kind == "uri":
        return (f"{cand}, {keys}, hits AS (SELECT k._key, list(DISTINCT c.image_id ORDER BY c.image_id) AS ids "
                "FROM keys k JOIN cand c ON c.uri = k._key GROUP BY 1)"), params
    where = "AND i.collection = ?" if collection is not None else ""
    return (f"{keys}, hits AS (SELECT k._key, [i.image_id] AS ids FROM keys k JOIN images i "
            f"ON i.image_id = k._key {where})"), params[:1]


def _key_expr(kind: str, ref: str) -> str:
    v = f"NULLIF(trim(CAST({ref} AS VARCHAR)), '')"
    if kind == "filename":
        return rf"NULLIF(regexp_extract({v}, '[^/\\]*$'), '')"
    if kind == "uri":
        return f"CASE WHEN starts_with({v}, 'file://') THEN {v}[8:] ELSE {v} END"
    return f"lower({v})"


def _choose_key_column(kind: str, key_column: str | None, names: dict[str, str]) -> str:
    """The file column holding the key (original name): --key-column, else the first default present."""
    if key_column is not None:
        for original, normal in names.items():
            if key_column in (original, normal):
                return original
        raise BadInput(f"no column {key_column!r} in the file; columns: {', '.join(names)}")
    for wanted in _DEFAULT_KEY_COLUMNS[kind]:
        for original, normal in names.items():
            if normal == wanted:
                return original
    raise BadInput(f"no key column for --key {kind}: the file has none of "
                   f"{', '.join(_DEFAULT_KEY_COLUMNS[kind])}; name it with --key-column (columns: {', '.join(names)})")


def _existing_kinds(lake: Lake) -> dict[str, str]:
    schema = pa.schema(open_table(lake, "metadata").schema().to_arrow())
    return {f.name: column_kind(f.type) for f in schema}


def import_metadata(lake: Lake, path: str | os.PathLike, *, key: str, key_column: str | None = None,
                    collection: str | None = None, types: Mapping[str, str] | None = None,
                    lists: Sequence[str] = (), list_sep: str = ";", fmt: str | None = None,
                    run_id: str) -> ImportSummary:
    """Import one metadata file into ``metadata`` (upsert on image_id); rejects to ``metadata_rejects``.

    Args:
        key: how a row names its image: ``filename`` (the last path segment of an image's URI, with
            or without its extension; exact, case-sensitive), ``uri`` (exactly as ingested; a
            ``file://`` prefix is ignored) or ``image_id`` (sha256 hex).
        key_column: the file's column holding the key (default: the first of filename, file_name,
            file, id, name / uri, path, url, file / image_id, sha256, id that exists).
        collection: only images of this collection can match.
        types: column -> type name (``int``, ``list<string>``, ...) overriding inference.
        lists: CSV columns whose cells are ``list_sep``-separated lists (JSON-array cells are parsed as JSON).
        fmt: ``csv``, ``jsonl`` or ``parquet``; by default from the file's extension.
        run_id: this run's id (Delta transaction id of both commits, ``run_id`` of its rows).
    Raises:
        BadInput: a missing or unreadable file, an unknown key kind, format, column or type, a
            reserved or clashing column name, or a type override that contradicts the lake.
    """
    path = os.path.abspath(os.fspath(path))
    if key not in KEY_KINDS:
        raise BadInput(f"unknown --key {key!r}; use one of {', '.join(KEY_KINDS)}")
    if not os.path.isfile(path):
        raise BadInput(f"no such metadata file: {path}")
    if fmt is None:
        fmt = FORMATS.get(os.path.splitext(path)[1].lower())
        if fmt is None:
            raise BadInput(f"cannot tell the format of {path} from its extension; pass --format csv|jsonl|parquet")
    elif fmt not in ("csv", "jsonl", "parquet"):
        raise BadInput(f"unknown format {fmt!r}; use csv, jsonl or parquet")
    if not list_sep:
        raise BadInput("--list-sep must not be empty")
    summary = ImportSummary(run_id=run_id, source_file=path)
    con = duckdb.connect(config={"threads": 2})
    try:
        con.execute("SET TimeZone='UTC'")
        raw = _read(con, path, fmt)
        summary.rows = raw.num_rows
        names = {c: normalise_column(c, i) for i, c in enumerate(raw.column_names)}
        clash = [n for n, k in Counter(names.values()).items() if k > 1]
        if clash:
            same = [c for c in names if names[c] in clash]
            raise BadInput(f"columns {', '.join(map(repr, same))} all become {clash[0]!r} (names are lower-case "
                           "snake case in the lake); rename one")
        key_original = _choose_key_column(key, key_column, names)
        overrides = _resolve_names(dict(types or {}), names, "--type")
        list_columns = set(_resolve_names({c: "" for c in lists}, names, "--list"))
        user = [c for c in raw.column_names if not (key == "image_id" and c == key_original)]
        reserved = [c for c in user if names[c] in _FIXED]
        if reserved:
            raise BadInput(f"column {reserved[0]!r} is reserved in the metadata table ({', '.join(_FIXED)}); rename it")
        con.register("src", raw.append_column("_row", pa.array(range(1, raw.num_rows + 1), pa.int64())))
        inferred = _infer_csv(con, [c for c in user if c not in overrides and c not in list_columns
                                    and c != key_original]) if fmt == "csv" else {}
        existing = _existing_kinds(lake)
        kinds: dict[str, str] = {}
        for c in user:
            wanted = overrides.get(c) or ("list<string>" if c in list_columns else None)
            natural = "string" if c == key_original else inferred.get(c) or _native_kind(raw.schema.field(c).type)
            have = existing.get(names[c])
            if have is not None and wanted is not None and wanted != have:
                raise BadInput(f"column {names[c]!r} is {have} in the lake; a Delta column cannot change type, "
                               f"so --type/--list {c}={wanted} is refused (import it under another column name)")
            kinds[c] = have or wanted or natural
        summary.columns = {names[c]: kinds[c] for c in user}
        summary.new_columns = [names[c] for c in user if names[c] not in existing]
        accepted, rejects = _resolve(con, lake, raw, names, key, key_original, collection, kinds, list_sep)
    finally:
        con.close()
    summary.imported = accepted.num_rows
    if not summary.imported:
        summary.new_columns = []   # nothing written, so no column added
    summary.rejected = len(rejects)
    summary.reasons = dict(Counter(r["reason"] for r in rejects))
    summary.examples = [{k: r[k] for k in ("row_number", "key", "reason", "detail")} for r in rejects[:_EXAMPLES]]
    now = now_utc()
    ts = TABLES["metadata"].schema.field("imported_at").type
    accepted = (accepted.append_column("source_file", pa.array([path] * accepted.num_rows, pa.string()))
                .append_column("run_id", pa.array([run_id] * accepted.num_rows, pa.string()))
                .append_column("imported_at", pa.array([now] * accepted.num_rows, ts)))
    summary.inserted, summary.updated = _merge(lake, accepted, run_id)
    for r in rejects:
        r.update(run_id=run_id, source_file=path, rejected_at=now)
    commit_rows(lake, "metadata_rejects", rejects, run_id=run_id)
    return summary


def _resolve_names(given: dict[str, str], names: dict[str, str], flag: str) -> dict[str, str]:
    out = {}
    for column, value in given.items():
        match = [o for o, n in names.items() if column in (o, n)]
        if not match:
            raise BadInput(f"{flag} names {column!r}, which is not a column of the file; columns: {', '.join(names)}")
        out[match[0]] = value
    return out


def _resolve(con, lake: Lake, raw: pa.Table, names: dict[str, str], key: str, key_original: str,
             collection: str | None, kinds: dict[str, str], list_sep: str) -> tuple[pa.Table, list[dict]]:
    """Match keys to images and convert values; returns (accepted rows, reject rows)."""
    for table in ("images", "sources"):
        dt_ = open_table(lake, table)
        con.register(table, dt_.to_pyarrow_dataset() if dt_.file_uris() else TABLES[table].schema.empty_table())
    converted, bads = [], []
    for c, kind in kinds.items():
        conv, bad = _convert(f"s.{_q(c)}", raw.schema.field(c).type, kind, list_sep)
        converted.append(f"{conv} AS {_q(names[c])}")
        shown = f"CAST(s.{_q(c)} AS VARCHAR)" if not pa.types.is_nested(raw.schema.field(c).type) else f"to_json(s.{_q(c)})::VARCHAR"
        bads.append(f"CASE WHEN {bad} THEN {_lit(names[c] + ': ')} || left({shown}, 80) || {_lit(' is not ' + kind)} END")
    ctes, params = _key_sql(key, collection)
    scope = f" in collection {collection!r}" if collection is not None else ""
    malformed = "NOT regexp_full_match(_key, '[0-9a-f]{64}')" if key == "image_id" else "FALSE"
    bad_detail = f"concat_ws('; ', {', '.join(bads)})" if bads else "''"
    select_user = "".join(f", {c}" for c in converted)
    con.execute(f"CREATE TEMP VIEW keyed AS SELECT *, {_key_expr(key, 's.' + _q(key_original))} AS _key FROM src s")
    sql = f"""
        CREATE TEMP TABLE resolved AS
        WITH {ctes},
        base AS (
            SELECT s._row, s._key, h.ids, {bad_detail} AS bad{select_user}
            FROM keyed s LEFT JOIN hits h ON h._key = s._key),
        judged AS (
            SELECT *, CASE WHEN _key IS NULL THEN 'missing_key'
                           WHEN {malformed} THEN 'malformed_key'
                           WHEN ids IS NULL OR len(ids) = 0 THEN 'no_match'
                           WHEN len(ids) > 1 THEN 'ambiguous'
                           WHEN bad <> '' THEN 'bad_value' END AS reason,
                   CASE WHEN len(ids) = 1 THEN ids[1] END AS image_id
            FROM base)
        SELECT *, CASE WHEN reason IS NULL AND row_number() OVER (PARTITION BY reason, image_id ORDER BY _row DESC) > 1
                       THEN 'duplicate' ELSE reason END AS outcome,
                  max(_row) OVER (PARTITION BY reason, image_id) AS winner
        FROM judged"""
    try:
        con.execute(sql, params)
        user_cols = "".join(f", {_q(names[c])}" for c in kinds)
        accepted = con.sql(f"SELECT image_id{user_cols} FROM resolved WHERE outcome IS NULL ORDER BY image_id").to_arrow_table()
        rejected = con.sql(f"""
            SELECT _row, _key, outcome,
                   CASE outcome
                     WHEN 'missing_key' THEN 'the key column is empty'
                     WHEN 'malformed_key' THEN 'not an image id (64 hex characters)'
                     WHEN 'no_match' THEN {_lit(f'no image matches this {key}{scope}')}
                     WHEN 'ambiguous' THEN 'matches ' || len(ids) || ' images: ' || array_to_string(ids[1:5], ', ')
                     WHEN 'bad_value' THEN bad
                     WHEN 'duplicate' THEN 'image ' || image_id || ' is keyed again by row ' || winner || ', which wins'
                   END AS detail
            FROM resolved WHERE outcome IS NOT NULL ORDER BY _row""").to_arrow_table().to_pylist()
    except duckdb.Error as e:
        raise BadInput(f"cannot import the file: {str(e).splitlines()[0]}") from None
    rejects = []
    if rejected:
        originals = raw.take(pa.array([r["_row"] - 1 for r in rejected], pa.int64())).to_pylist()
        for r, original in zip(rejected, originals):
            rejects.append({"row_number": r["_row"], "key": r["_key"], "reason": r["outcome"],
                            "detail": r["detail"], "row": json.dumps(original, default=_json_default)})
    return accepted, rejects


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _merge(lake: Lake, rows: pa.Table, run_id: str) -> tuple[int, int]:
    """Upsert ``rows`` into ``metadata`` on image_id, adding new columns; once per run id.

    Not ``DeltaTable.merge``: in deltalake 1.6.6 MERGE writes Parquet whose Arrow schema says
    ``string_view``, and ``DeltaTable.to_pyarrow_dataset()`` then fails any filter on those columns
    (pyarrow: no kernel for string vs string_view). So the new table is computed here (a full outer
    join in DuckDB: the file's columns from the file, other columns kept) and written as one
    overwrite with ``schema_mode="merge"`` — one atomic commit, O(table) per import.
    Returns (inserted, updated).
    """
    with LakeLock(lake, "commit", timeout=600, holder=f"commit metadata {run_id}"):
        table = open_table(lake, "metadata")
        if rows.num_rows == 0 or table.transaction_version(run_id) is not None:
            return 0, 0
        old = list(pa.schema(table.schema().to_arrow()).names)
        new = [c for c in rows.column_names if c != "image_id"]
        picks = ["coalesce(n.image_id, e.image_id) AS image_id"]
        for c in old[1:] + [c for c in new if c not in old]:
            if c in new and c in old:
                picks.append(f"CASE WHEN n.image_id IS NOT NULL THEN n.{_q(c)} ELSE e.{_q(c)} END AS {_q(c)}")
            else:
                picks.append(f"{'n' if c in new else 'e'}.{_q(c)} AS {_q(c)}")
        con = duckdb.connect(config={"threads": 2})
        try:
            con.execute("SET TimeZone='UTC'")
            con.register("incoming", rows)
            con.register("existing", table.to_pyarrow_dataset() if table.file_uris()
                         else TABLES["metadata"].schema.empty_table())
            counts = con.sql("SELECT count(*) FILTER (WHERE e.image_id IS NULL), count(e.image_id) FROM incoming n "
                             "LEFT JOIN existing e ON e.image_id = n.image_id").fetchall()[0]
            merged = con.sql(f"SELECT {', '.join(picks)} FROM existing e FULL OUTER JOIN incoming n "
                             "ON e.image_id = n.image_id ORDER BY 1").to_arrow_table()
        finally:
            con.close()
        merged = merged.cast(pa.schema([pa.field("image_id", pa.string(), nullable=False), *list(merged.schema)[1:]]))
        write_deltalake(table, merged, mode="overwrite", schema_mode="merge",
                        writer_properties=WriterProperties(compression="ZSTD"),
                        commit_properties=_commit_properties(run_id))
    return int(counts[0]), int(counts[1])


def _commit_properties(run_id: str) -> CommitProperties:
    """Like every imagelake commit: the run id as a Delta transaction, so a repeated commit is a no-op."""
    return CommitProperties(
        custom_metadata={"imagelake.run_id": run_id, "imagelake.table": "metadata"},
        app_transactions=[Transaction(app_id=run_id, version=1, last_updated=int(now_utc().timestamp() * 1000))])


def metadata_columns(lake: Lake) -> list[dict[str, Any]]:
    """The ``metadata`` table's columns now: name, type, whether fixed, and how many rows have a value."""
    con = lake_connection(lake, ("metadata",))
    try:
        schema = con.sql("SELECT * FROM metadata LIMIT 0").to_arrow_table().schema
        counts = con.sql("SELECT " + ", ".join(f"count({_q(n)})" for n in schema.names) + " FROM metadata"
                         ).to_arrow_table().to_pylist()[0] if len(schema) else {}
    finally:
        con.close()
    values = list(counts.values())
    return [{"name": f.name, "type": column_kind(f.type), "fixed": f.name in _FIXED, "values": values[i]}
            for i, f in enumerate(schema)]
