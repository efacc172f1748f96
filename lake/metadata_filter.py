"""A small, safe filter language over image and metadata columns, compiled to a DuckDB predicate.

A filter is a JSON object; its entries are ANDed::

    {"year": {">=": 1900, "<": 2000},          # comparisons (several operators: AND)
     "subjects": {"contains": "fish"},          # list column: an element contains it (any case)
     "collection": "amnh",                       # scalar: equality (list column: has the element)
     "format": ["jpeg", "png"],                  # array: IN
     "title": null,                              # null: IS NULL
     "$or": [{"year": {"<": 1900}}, {"$not": {"subjects": {"is_null": true}}}]}

Operators: ``=`` ``!=`` ``<`` ``<=`` ``>`` ``>=`` (also ``eq ne lt le gt ge``), ``in`` and
``not_in`` (arrays), ``contains`` (case-insensitive substring of a string, or of any element of a
list of strings; element equality for other lists), ``is_null`` (true/false; an empty list counts
as null). Combinators: ``$and`` / ``$or`` (arrays of filters) and ``$not`` (a filter). A row whose
column is NULL never satisfies a comparison (SQL semantics); ask for it with ``is_null``.

Column names are looked up in a whitelist built from the ``images`` schema and the current
``metadata`` schema (a name present in both means the metadata column; ``images.X`` and
``metadata.X`` say which explicitly). Every value becomes a bound parameter (``?``) after a type
check against its column, so quotes, semicolons or SQL in a value are only ever data. The
predicate refers to ``i`` (images), ``m`` (metadata) and ``c`` (capture: EXIF date, camera, GPS) as
joined in :data:`FILTER_FROM`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import duckdb
import numpy as np
import pyarrow as pa

from lake.catalog import TABLES, Lake
from lake.errors import BadInput
from lake.json_input import loads_bounded

__all__ = [
    "FILTER_FROM", "FilterColumn", "column_kind", "filter_columns", "connection_columns",
    "parse_filter", "compile_filter", "matching_seqs", "facet_counts", "lake_connection",
]

FILTER_FROM = ("images i LEFT JOIN metadata m ON m.image_id = i.image_id "
               "LEFT JOIN capture c ON c.image_id = i.image_id")

_MAX_DEPTH, _MAX_TERMS, _MAX_IN, _MAX_TEXT = 10, 200, 1000, 10_000
_ALIASES = {"eq": "=", "==": "=", "ne": "!=", "<>": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_COMPARE = ("=", "!=", "<", "<=", ">", ">=")
_OPERATORS = (*_COMPARE, "in", "not_in", "contains", "is_null")
_SCALAR_KINDS = ("string", "int", "float", "bool", "date", "timestamp")


def column_kind(t: pa.DataType) -> str:
    """The imagelake type name of an Arrow type: string, int, float, bool, date, timestamp,
    list<one of those>, or Arrow's own name for anything else (not filterable)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "float"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return f"list<{column_kind(t.value_type)}>"
    return str(t)


@dataclass(frozen=True)
class FilterColumn:
    """A column a filter may name: its SQL reference (already quoted) and its imagelake kind."""

    sql: str
    kind: str

    @property
    def is_list(self) -> bool:
        return self.kind.startswith("list<")

    @property
    def element_kind(self) -> str:
        return self.kind[5:-1] if self.is_list else self.kind


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_CAPTURE_HIDDEN = ("image_id", "run_id", "created_at")


def filter_columns(images_schema: pa.Schema, metadata_schema: pa.Schema,
                   capture_schema: pa.Schema | None = None) -> dict[str, FilterColumn]:
    """The whitelist for :func:`compile_filter`: every filterable column of images (``i``), capture
    (``c``: taken_at, camera, has_gps, ...) and metadata (``m``), by plain name (a clash goes to
    metadata, then capture) and as ``images.X`` / ``capture.X`` / ``metadata.X``."""
    columns: dict[str, FilterColumn] = {}
    capture = pa.schema([f for f in (capture_schema if capture_schema is not None else TABLES["capture"].schema)
                         if f.name not in _CAPTURE_HIDDEN])
    for alias, table, schema in (("i", "images", images_schema), ("c", "capture", capture),
                                 ("m", "metadata", metadata_schema)):
        for field in schema:
            kind = column_kind(field.type)
            if kind in _SCALAR_KINDS or (kind.startswith("list<") and kind[5:-1] in _SCALAR_KINDS):
                column = FilterColumn(f"{alias}.{_ident(field.name)}", kind)
                columns[field.name] = column
                columns[f"{table}.{field.name}"] = column
    return columns


def connection_columns(con: duckdb.DuckDBPyConnection) -> dict[str, FilterColumn]:
    """:func:`filter_columns` for a connection with ``images``, ``metadata`` and ``capture`` views."""
    schemas = [con.sql(f"SELECT * FROM {t} LIMIT 0").to_arrow_table().schema for t in ("images", "metadata", "capture")]
    return filter_columns(*schemas)


def parse_filter(value: Any) -> dict | None:
    """A filter from JSON text (a query parameter, a CLI flag) or an already-decoded object.

    Returns None for no filter (None, empty text, ``{}``). Raises BadInput for anything but a JSON object.
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        if not value.strip():
            return None
        try:
            value = loads_bounded(value)
        except ValueError as e:
            raise BadInput(f"the filter is not valid JSON ({e}); send an object like "
                           '{"year": {">=": 1900}, "subjects": {"contains": "fish"}}') from None
    if not isinstance(value, dict):
        raise BadInput(f"a filter is a JSON object of column conditions, got {type(value).__name__}")
    return value or None


class _Compiler:
    def __init__(self, columns: Mapping[str, FilterColumn | pa.DataType]):
        self.columns = {name: c if isinstance(c, FilterColumn) else FilterColumn(_ident(name), column_kind(c))
                        for name, c in columns.items()}
        self.params: list[Any] = []
        self.terms = 0

    def filter(self, node: Any, depth: int) -> str:
        if depth > _MAX_DEPTH:
            raise BadInput(f"the filter nests deeper than {_MAX_DEPTH} levels")
        if not isinstance(node, dict):
            raise BadInput(f"a filter (or a $and/$or item, or $not) is a JSON object, got {json.dumps(node)[:80]}")
        parts = []
        for key, value in node.items():
            self.terms += 1
            if self.terms > _MAX_TERMS:
                raise BadInput(f"the filter has more than {_MAX_TERMS} conditions")
            if key in ("$and", "$or"):
                if not isinstance(value, list) or not value:
                    raise BadInput(f"{key} takes a non-empty array of filters")
                joined = f" {key[1:].upper()} ".join(self.filter(v, depth + 1) for v in value)
                parts.append(f"({joined})")
            elif key == "$not":
                parts.append(f"(NOT {self.filter(value, depth + 1)})")
            else:
                parts.append(self.condition(key, value))
        return "(" + " AND ".join(parts) + ")" if parts else "TRUE"

    def column(self, name: str) -> FilterColumn:
        column = self.columns.get(name) if isinstance(name, str) else None
        if column is None:
            known = sorted(n for n in self.columns if "." not in n)
            shown = ", ".join(known[:40]) + (", ..." if len(known) > 40 else "")
            raise BadInput(f"unknown filter column {str(name)[:80]!r}; columns: {shown}")
        return column

    def condition(self, name: str, cond: Any) -> str:
        column = self.column(name)
        if isinstance(cond, dict):
            if not cond:
                raise BadInput(f"the condition on {name!r} is empty; use an operator such as "
                               f"{{\">=\": 1900}}; operators: {', '.join(_OPERATORS)}")
            return "(" + " AND ".join(self.operator(name, column, _ALIASES.get(op, op), v)
                                      for op, v in cond.items()) + ")"
        if isinstance(cond, list):
            return self.operator(name, column, "in", cond)
        return self.operator(name, column, "=", cond)

    def operator(self, name: str, column: FilterColumn, op: str, value: Any) -> str:
        ref = column.sql
        if op not in _OPERATORS:
            raise BadInput(f"unknown operator {str(op)[:40]!r} on {name!r}; use one of {', '.join(_OPERATORS)}")
        if op == "is_null" or value is None:
            if op not in ("is_null", "=", "!="):
                raise BadInput(f"{op!r} on {name!r} needs a value, not null; use is_null for missing values")
            wanted = bool(value) if op == "is_null" else op == "="
            if op == "is_null" and not isinstance(value, bool):
                raise BadInput(f"is_null on {name!r} takes true or false")
            empty = f"({ref} IS NULL OR len({ref}) = 0)" if column.is_list else f"({ref} IS NULL)"
            return empty if wanted else f"(NOT {empty})"
        if op in ("in", "not_in"):
            if not isinstance(value, list):
                raise BadInput(f"{op} on {name!r} takes an array of values")
            if len(value) > _MAX_IN:
                raise BadInput(f"{op} on {name!r} has {len(value)} values; at most {_MAX_IN}")
            if not value:
                return "FALSE" if op == "in" else "TRUE"
            marks = ", ".join(self.bind(name, column, v) for v in value)
            if column.is_list:
                test = f"list_has_any({ref}, [{marks}])"
            else:
                test = f"{ref} IN ({marks})"
            return f"({test})" if op == "in" else f"(NOT {test})"
        if op == "contains":
            if column.element_kind != "string":
                if column.is_list:
                    return f"list_contains({ref}, {self.bind(name, column, value)})"
                raise BadInput(f"contains works on text and list columns; {name!r} is {column.kind}")
            mark = self.bind(name, column, value)
            if column.is_list:
                return f"(len(list_filter({ref}, lambda x: contains(lower(x), lower({mark})))) > 0)"
            return f"contains(lower({ref}), lower({mark}))"
        mark = self.bind(name, column, value)
        if column.is_list:
            if op == "=":
                return f"list_contains({ref}, {mark})"
            if op == "!=":
                return f"(NOT list_contains({ref}, {mark}))"
            raise BadInput(f"{op!r} does not apply to the list column {name!r}; use =, !=, in, contains or is_null")
        return f"({ref} {'<>' if op == '!=' else op} {mark})"

    def bind(self, name: str, column: FilterColumn, value: Any) -> str:
        """Check ``value`` against the column's (element) kind, add it as a parameter, return its marker."""
        kind = column.element_kind
        wrong = BadInput(f"the value {json.dumps(value)[:80]} does not fit column {name!r} ({column.kind})")
        if kind == "string":
            if not isinstance(value, str):
                raise wrong
            if len(value) > _MAX_TEXT:
                raise BadInput(f"a filter value for {name!r} is longer than {_MAX_TEXT} characters")
            self.params.append(value)
            return "?"
        if kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise wrong
            if isinstance(value, int) and not -2**63 <= value < 2**63:
                raise BadInput(f"the value {value} for {name!r} is out of the int64 range")
            self.params.append(value)
            return "?"
        if kind == "bool":
            if not isinstance(value, bool):
                raise wrong
            self.params.append(value)
            return "?"
        if kind in ("date", "timestamp"):
            if not isinstance(value, str):
                raise wrong
            try:
                parsed = dt.date.fromisoformat(value) if kind == "date" else dt.datetime.fromisoformat(value)
            except ValueError:
                raise BadInput(f"the value {value[:80]!r} for {name!r} is not an ISO 8601 {kind} "
                               "(e.g. 2020-01-31 or 2020-01-31T12:00:00Z)") from None
            if kind == "timestamp" and parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.timezone.utc)
            self.params.append(parsed.isoformat())
            return "CAST(? AS DATE)" if kind == "date" else "CAST(? AS TIMESTAMPTZ)"
        raise BadInput(f"column {name!r} ({column.kind}) cannot be filtered on")


def compile_filter(filter: Mapping[str, Any] | str | None,
                   columns: Mapping[str, FilterColumn | pa.DataType]) -> tuple[str, list[Any]]:
    """Compile a filter to a DuckDB boolean expression with ``?`` markers and its parameters.

    Args:
        filter: a filter object (see the module docstring), its JSON text, or None (matches all).
        columns: the whitelist: name -> :class:`FilterColumn` (see :func:`filter_columns`), or
            name -> Arrow type for a single table queried by plain, quoted column names.
    Returns:
        ``(sql, params)``: use as ``... WHERE {sql}`` with ``params`` bound, in that order.
    Raises:
        BadInput: an unknown column or operator, a value of the wrong type, too deep or too large.
    """
    parsed = parse_filter(filter)
    if parsed is None:
        return "TRUE", []
    compiler = _Compiler(columns)
    return compiler.filter(parsed, 0), compiler.params


def lake_connection(lake: Lake, tables: tuple[str, ...] = ("images", "metadata", "capture")) -> duckdb.DuckDBPyConnection:
    """A private DuckDB connection with ``tables`` of the lake's current versions as views.

    Uses deltalake's datasets, which present an evolving table's older files with its current schema.
    """
    from lake.commit import open_table

    con = duckdb.connect(config={"threads": 2})
    con.execute("SET TimeZone='UTC'")
    for name in tables:
        table = open_table(lake, name)
        source = table.to_pyarrow_dataset() if table.file_uris() else TABLES[name].schema.empty_table()
        con.register(name, source)
    return con


def matching_seqs(source: Lake | duckdb.DuckDBPyConnection, filter: Mapping[str, Any] | str | None) -> np.ndarray:
    """The ``seq`` of every image matching ``filter`` (sorted, unique int64; FAISS ids).

    Args:
        source: a lake (its current tables are read), or a DuckDB connection that has ``images``
            and ``metadata`` views (e.g. the API's reader; it is not closed).
        filter: see :func:`compile_filter`; None matches every image.
    Raises:
        BadInput: a bad filter.
    """
    con = lake_connection(source) if isinstance(source, Lake) else source
    try:
        sql, params = compile_filter(filter, connection_columns(con))
        table = con.sql(f"SELECT DISTINCT i.seq FROM {FILTER_FROM} WHERE {sql} ORDER BY 1",
                        params=params).to_arrow_table()
    except duckdb.Error as e:
        raise BadInput(f"the filter could not be applied: {str(e).splitlines()[0]}") from None
    finally:
        if isinstance(source, Lake):
            con.close()
    return table.column(0).to_numpy().astype(np.int64, copy=False)


def facet_counts(con: duckdb.DuckDBPyConnection, column: str, *, limit: int = 50,
                 filter: Mapping[str, Any] | str | None = None) -> dict[str, Any]:
    """Counts of images per value of ``column`` (list columns: per element), most frequent first.

    Args:
        con: a connection with ``images`` and ``metadata`` views.
        column: an images or metadata column (see :func:`filter_columns`); validated, never interpolated.
        limit: how many values to return (1..10000).
        filter: only images matching this filter are counted.
    Returns:
        ``{"column", "type", "values": [{"value", "count"}], "images", "missing", "distinct", "truncated"}``:
        ``images`` matched the filter, ``missing`` of them have no value, ``distinct`` values exist.
    Raises:
        NotFound: an unknown column. BadInput: a bad limit or filter, or a column that cannot be faceted.
    """
    from lake.errors import NotFound

    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
        raise BadInput(f"limit must be an integer from 1 to 10000, got {limit!r}")
    columns = connection_columns(con)
    if column not in columns:
        known = ", ".join(sorted(n for n in columns if "." not in n))
        raise NotFound(f"no column {str(column)[:80]!r} to facet on; columns: {known}")
    target = columns[column]
    where, params = compile_filter(filter, columns)
    missing = f"({target.sql} IS NULL OR len({target.sql}) = 0)" if target.is_list else f"({target.sql} IS NULL)"
    sql = f"""
        WITH chosen AS (SELECT i.image_id, {target.sql} AS v, {missing} AS missing FROM {FILTER_FROM} WHERE {where}),
             pairs AS (SELECT DISTINCT image_id, {'unnest(v)' if target.is_list else 'v'} AS value FROM chosen WHERE NOT missing),
             counted AS (SELECT value, count(*) AS n FROM pairs WHERE value IS NOT NULL GROUP BY value)
        SELECT value, n, count(*) OVER () AS distinct_values,
               (SELECT count(*) FROM chosen) AS images, (SELECT count(*) FROM chosen WHERE missing) AS missing
        FROM counted ORDER BY n DESC, value LIMIT ?"""
    try:
        table = con.sql(sql, params=[*params, limit]).to_arrow_table()
        if table.num_rows == 0:
            totals = con.sql(f"SELECT count(*), count(*) FILTER (WHERE {missing}) FROM {FILTER_FROM} WHERE {where}",
                             params=params).to_arrow_table()
            images, n_missing = totals.column(0)[0].as_py(), totals.column(1)[0].as_py()
        else:
            images, n_missing = table.column("images")[0].as_py(), table.column("missing")[0].as_py()
    except duckdb.Error as e:
        raise BadInput(f"facets of {column!r} failed: {str(e).splitlines()[0]}") from None
    rows = table.select(["value", "n"]).to_pylist()
    distinct = table.column("distinct_values")[0].as_py() if table.num_rows else 0
    return {"column": column, "type": target.kind,
            "values": [{"value": r["value"], "count": r["n"]} for r in rows],
            "images": images, "missing": n_missing, "distinct": distinct, "truncated": distinct > len(rows)}
