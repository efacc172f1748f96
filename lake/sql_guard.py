"""What a sandbox query may contain, decided on DuckDB's own parse tree before it runs.

DuckDB's statement type alone is not enough: ``WITH x AS (INSERT ... RETURNING *) SELECT ...`` is a
SELECT statement whose CTE writes. So the statement is serialised with ``json_serialize_sql`` (which
itself refuses anything but SELECT statements) and the whole tree is walked:

* every query node must be a SELECT, a set operation or a CTE, so INSERT/UPDATE/DELETE/MERGE nodes
  are refused wherever they sit;
* table functions must be on an allow-list of generators and catalog introspection. Everything
  that reads files or runs SQL given as a string (``read_text``, ``read_parquet``, ``glob``,
  ``query``, ``query_table``, ``json_execute_serialized_sql``, ...) is refused. This is also what
  keeps DuckDB's spill folder unreadable: DuckDB adds ``temp_directory`` to ``allowed_directories``
  by itself when external access is turned off, and that entry cannot be removed;
* a table name that is a path (``FROM '/x/y.csv'``, a replacement scan) is refused;
* scalar functions with side effects (checkpoints, logging, profiling, sleeping, executing
  serialised SQL) are refused.

The file-access settings of the connection stay on underneath as a second wall.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import duckdb

from lake.errors import BadInput

__all__ = ["check_statement", "FILE_ACCESS"]

FILE_ACCESS = "file and network access are disabled in SQL queries; query the lake's views instead"

_QUERY_NODES = frozenset({"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"})
_TABLE_FUNCTIONS = frozenset({
    "range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree",
    "summary", "pg_timezone_names", "icu_calendar_names",
})
_TABLE_FUNCTION_PREFIXES = ("duckdb_", "pragma_")      # read-only catalog introspection
_SCALAR_DENIED = frozenset({
    "json_execute_serialized_sql", "force_checkpoint", "enable_checkpoint_on_shutdown",
    "disable_checkpoint_on_shutdown", "enable_profile", "disable_profile", "write_log",
    "pg_sleep", "sleep_ms",
})
_PATH_CHARS = ("/", "\\", ":")


def _dicts(node: Any) -> Iterator[dict]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _statement_kind(node_type: str) -> str:
    return node_type.removesuffix("_NODE").removesuffix("_QUERY") or node_type


def check_statement(cursor: duckdb.DuckDBPyConnection, sql: str, tables: list[str]) -> None:
    """Refuse ``sql`` (one statement DuckDB already typed as SELECT) unless its whole tree reads only.

    Raises:
        BadInput: DML anywhere in the tree, a table function outside the allow-list, a file path
            as a table, a side-effecting function, or a statement DuckDB cannot serialise.
    """
    try:
        ((text,),) = cursor.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()
        tree = json.loads(text)
    except (duckdb.Error, ValueError, TypeError) as e:
        raise BadInput(f"the query could not be checked: {str(e).splitlines()[0]}") from None
    if tree.get("error"):
        message = str(tree.get("error_message") or "")
        if "Only SELECT" in message:
            raise BadInput("only read-only SELECT queries are allowed, not this kind of statement")
        raise BadInput(f"SQL syntax error: {message}")
    views = ", ".join(tables)
    for node in _dicts(tree.get("statements", [])):
        kind = node.get("type")
        if not isinstance(kind, str):
            continue
        if kind.endswith("_NODE") and kind not in _QUERY_NODES:
            raise BadInput(f"only read-only SELECT queries are allowed, not {_statement_kind(kind)} "
                           "statements (found inside the query)")
        if kind == "TABLE_FUNCTION":
            function = node.get("function") or {}
            name = str(function.get("function_name", "")).lower()
            if name not in _TABLE_FUNCTIONS and not name.startswith(_TABLE_FUNCTION_PREFIXES):
                raise BadInput(f"{FILE_ACCESS}: {views} (table function {name}() is not available)")
        elif kind in ("BASE_TABLE", "SHOW_REF"):
            name = str(node.get("table_name") or "")
            if any(c in name for c in _PATH_CHARS):
                raise BadInput(f"{FILE_ACCESS}: {views}")
        if node.get("class") == "FUNCTION":
            name = str(node.get("function_name", "")).lower()
            if name in _SCALAR_DENIED:
                raise BadInput(f"function {name}() is not available in SQL queries")
