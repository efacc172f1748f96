"""Column names and types of imported metadata: the normalised names, the type names users write
(``int``, ``list<string>``, ...), CSV type inference and the SQL that converts a source column to
its kind (split out of :mod:`lake.metadata`, which imports and merges)."""

from __future__ import annotations

import re
from typing import Iterable

import duckdb
import pyarrow as pa

from lake.errors import BadInput
from lake.metadata_filter import column_kind

__all__ = ["TYPES", "normalise_column", "parse_type_overrides"]

TYPES = {"string": "VARCHAR", "int": "BIGINT", "float": "DOUBLE", "bool": "BOOLEAN", "date": "DATE",
         "timestamp": "TIMESTAMPTZ"}
_TYPE_ALIASES = {"str": "string", "text": "string", "varchar": "string", "integer": "int", "int64": "int",
                 "bigint": "int", "double": "float", "float64": "float", "number": "float", "boolean": "bool",
                 "datetime": "timestamp"}
def normalise_column(name: str, position: int = 0) -> str:
    """Column names become lower-case snake case (``Scientific Name`` -> ``scientific_name``) so they
    are plain identifiers in SQL and filters; a leading digit gets a ``_`` prefix."""
    out = re.sub(r"[^0-9a-z]+", "_", str(name).strip().lower()).strip("_")
    if not out:
        return f"column_{position + 1}"
    return f"_{out}" if out[0].isdigit() else out


def _type_name(text: str) -> str:
    raw = text.strip().lower().replace(" ", "")
    inner = raw[5:-1] if raw.startswith("list<") and raw.endswith(">") else None
    name = _TYPE_ALIASES.get(inner if inner is not None else raw, inner if inner is not None else raw)
    if name not in TYPES:
        raise BadInput(f"unknown type {text!r}; use one of {', '.join(TYPES)} or list<TYPE> (e.g. list<string>)")
    return f"list<{name}>" if inner is not None else name


def parse_type_overrides(items: Iterable[str] | None) -> dict[str, str]:
    """``["year=int", "tags=list<string>"]`` -> ``{"year": "int", "tags": "list<string>"}``.

    Raises:
        BadInput: an item without ``=`` or an unknown type.
    """
    out: dict[str, str] = {}
    for item in items or ():
        column, sep, type_ = item.partition("=")
        if not sep or not column.strip():
            raise BadInput(f"--type takes COLUMN=TYPE (e.g. year=int), got {item!r}")
        out[column.strip()] = _type_name(type_)
    return out


def _duck(kind: str) -> str:
    return f"{TYPES[kind[5:-1]]}[]" if kind.startswith("list<") else TYPES[kind]


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _infer_csv(con: duckdb.DuckDBPyConnection, columns: list[str]) -> dict[str, str]:
    """Kinds of all-VARCHAR CSV columns: the narrowest kind every non-empty value fits."""
    if not columns:
        return {}
    checks = {
        "int": "regexp_full_match(%s, '-?(0|[1-9][0-9]*)') AND TRY_CAST(%s AS BIGINT) IS NOT NULL",
        "float": "regexp_full_match(%s, '-?(0|[1-9][0-9]*)?([.][0-9]*)?([eE][-+]?[0-9]+)?') "
                 "AND TRY_CAST(%s AS DOUBLE) IS NOT NULL",
        "bool": "lower(%s) IN ('true', 'false')",
        "date": "regexp_full_match(%s, '[0-9]{4}-[0-9]{2}-[0-9]{2}') AND TRY_CAST(%s AS DATE) IS NOT NULL",
        "timestamp": "regexp_matches(%s, '^[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}') "
                     "AND TRY_CAST(%s AS TIMESTAMPTZ) IS NOT NULL",
        "list<string>": "starts_with(%s, '[') AND CASE WHEN json_valid(%s) THEN json_type(%s::JSON) = 'ARRAY' END",
    }
    selects = []
    for i, c in enumerate(columns):
        v = f"NULLIF(trim({_q(c)}), '')"
        selects.append(f"count({v}) AS n{i}")
        selects += [f"count(*) FILTER (WHERE {cond.replace('%s', v)}) AS c{i}_{k}"
                    for k, cond in enumerate(checks.values())]
    row = con.sql(f"SELECT {', '.join(selects)} FROM src").to_arrow_table().to_pylist()[0]
    kinds = {}
    for i, c in enumerate(columns):
        n = row[f"n{i}"]
        fits = [kind for k, kind in enumerate(checks) if n and row[f"c{i}_{k}"] == n]
        kinds[c] = fits[0] if fits else "string"
    return kinds


def _native_kind(t: pa.DataType) -> str:
    """Where a JSON-lines or Parquet column lands: its own kind when storable, else string (JSON text)."""
    kind = column_kind(t)
    if kind in TYPES:
        return kind
    if kind.startswith("list<") and kind[5:-1] in TYPES:
        return kind
    return "string"


def _convert(ref: str, source: pa.DataType, kind: str, list_sep: str) -> tuple[str, str]:
    """SQL converting column ``ref`` of Arrow type ``source`` to ``kind``, and SQL that is true
    when a present value did not survive the conversion."""
    text = pa.types.is_string(source) or pa.types.is_large_string(source)
    nested = pa.types.is_nested(source) or column_kind(source) not in TYPES and not text
    if kind.startswith("list<"):
        element = TYPES[kind[5:-1]]
        if pa.types.is_list(source) or pa.types.is_large_list(source):
            items = ref if not pa.types.is_nested(source.value_type) else f"list_transform({ref}, lambda v: to_json(v)::VARCHAR)"
        elif text:
            v = f"trim({ref})"
            items = (f"CASE WHEN starts_with({v}, '[') AND json_valid({v}) THEN from_json({v}, '[\"VARCHAR\"]') "
                     f"WHEN NULLIF({v}, '') IS NULL THEN NULL "
                     f"ELSE list_filter(list_transform(string_split({v}, {_lit(list_sep)}), lambda v: trim(v)), "
                     f"lambda v: v <> '') END")
        else:
            items = f"CASE WHEN {ref} IS NULL THEN NULL ELSE [{ref}] END"
        conv = f"list_transform({items}, lambda v: TRY_CAST(v AS {element}))"
        return conv, f"(list_count({items}) <> list_count({conv}))"
    target = TYPES[kind]
    if kind == "string":
        if nested:
            return f"CASE WHEN {ref} IS NULL THEN NULL ELSE to_json({ref})::VARCHAR END", "FALSE"
        if column_kind(source) == "string":
            return ref, "FALSE"
        return f"CAST({ref} AS VARCHAR)", "FALSE"
    value = f"NULLIF(trim({ref}), '')" if text else ref
    if nested:
        value = f"to_json({ref})::VARCHAR"
    conv = f"TRY_CAST({value} AS {target})"
    bad = f"({value} IS NOT NULL AND {conv} IS NULL)"
    if kind == "int" and column_kind(source) != "int":  # DuckDB rounds '1.5' to 2: refuse lossy casts
        bad = f"({bad} OR TRY_CAST({value} AS DOUBLE) <> {conv})"
    return conv, bad
