"""The read-only SQL sandbox: one DuckDB connection with every lake table as a view.

Each table in :data:`lake.catalog.TABLES` is queryable under its own name and always shows the
table's current Delta version (re-checked at most every ``settings.refresh_s`` seconds). A query
is one SELECT (DESCRIBE, SHOW, SUMMARIZE and WITH count as SELECT), runs on its own cursor under a
time limit and returns at most ``max_rows`` rows. File and network access, extensions and settings
are locked off, so SQL can read the lake's tables and nothing else.

Rows are fetched through Arrow: DuckDB's own conversion of TIMESTAMP WITH TIME ZONE needs ``pytz``,
which pandas 3 no longer installs. So MAP values arrive as lists of (key, value) pairs, INTERVAL
as ``MonthDayNano``, UUID as ``str`` and HUGEINT as ``Decimal``; :func:`jsonable` covers them all.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import duckdb
import pyarrow as pa
from deltalake import DeltaTable

from lake.catalog import TABLES, Lake
from lake.commit import ensure_tables
from lake.errors import BadInput, ImagelakeError, QueryTimeout
from lake.settings import Settings

__all__ = ["QueryResult", "SqlSandbox", "format_result", "jsonable"]

log = logging.getLogger(__name__)
_EMPTY = "imagelake_empty"  # schema holding a zero-row table per catalog table, for empty views


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    types: list[str]          # DuckDB type names
    rows: list[tuple]         # Python values (see the module docstring)
    truncated: bool           # more rows existed than the cap
    elapsed_ms: float


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class SqlSandbox:
    """Read-only SQL over a lake. Thread-safe: share one instance between request threads."""

    def __init__(self, lake: Lake, settings: Settings):
        ensure_tables(lake)
        self._lake, self._settings = lake, settings
        self._lock = threading.Lock()
        self._tables = {name: DeltaTable(lake.table_uri(name)) for name in TABLES}
        self._versions: dict[str, int] = {}
        self._registered: dict[str, Any] = {}   # non-local lakes: Arrow objects each cursor registers
        self._checked_at = -math.inf
        self._con: duckdb.DuckDBPyConnection | None = duckdb.connect()
        con = self._con
        con.execute(f"CREATE SCHEMA {_EMPTY}")
        for name, spec in TABLES.items():
            con.register("_schema", spec.schema.empty_table())
            con.execute(f'CREATE TABLE {_EMPTY}."{name}" AS SELECT * FROM _schema')
            con.unregister("_schema")
        con.execute(f"SET memory_limit={_quote(settings.sql_memory_limit)}")
        con.execute(f"SET threads={int(settings.sql_threads)}")
        con.execute("SET TimeZone='UTC'")
        con.execute("SET parquet_metadata_cache=true")   # Delta data files never change
        con.execute("SET autoinstall_known_extensions=false")
        con.execute("SET autoload_known_extensions=false")
        if lake.is_local:
            con.execute(f"SET allowed_directories=[{_quote(lake.path('tables') + '/')}]")
        con.execute("SET enable_external_access=false")   # after allowed_directories, or that SET fails
        con.execute("SET lock_configuration=true")
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> dict[str, int]:
        """Re-point views of tables whose Delta version changed; a no-op within ``refresh_s`` of the
        last check unless ``force``. Returns table name -> the Delta version queries now see.
        A table that cannot be read keeps its previous view (a warning is logged)."""
        with self._lock:
            self._check_open()
            now = time.monotonic()
            if force or now - self._checked_at >= self._settings.refresh_s:
                for name, table in self._tables.items():
                    try:
                        table.update_incremental()
                        if table.version() != self._versions.get(name):
                            self._bind(name, table)
                            self._versions[name] = table.version()
                    except Exception as e:  # noqa: BLE001 - keep serving the last good view
                        log.warning("could not refresh table %s: %s", name, e)
                self._checked_at = now
            return dict(self._versions)

    def _bind(self, name: str, table: DeltaTable) -> None:
        files = table.file_uris()
        if not files:
            source = f'{_EMPTY}."{name}"'
        elif self._lake.is_local:
            # an evolving table's older files lack the columns added since: match columns by name
            union = ", union_by_name=true" if TABLES[name].evolving else ""
            source = f"read_parquet([{', '.join(_quote(f) for f in files)}]{union})"
        else:  # registered on each query's cursor: such views are not shared between connections
            self._registered[name] = table.to_pyarrow_dataset()
            self._con.execute(f'DROP VIEW IF EXISTS "{name}"')
            return
        self._registered.pop(name, None)
        self._con.execute(f'CREATE OR REPLACE VIEW "{name}" AS SELECT * FROM {source}')

    def query(self, sql: str, *, max_rows: int | None = None,
              timeout_s: float | None = None) -> QueryResult:
        """Run one read-only SELECT and return at most ``max_rows`` rows.

        Args:
            max_rows: row cap (default ``settings.sql_max_rows``); more rows set ``truncated``.
            timeout_s: time limit (default ``settings.sql_timeout_s``) for running and fetching.
        Raises:
            BadInput: empty SQL, a parse error, more than one statement, anything but a SELECT,
                an unknown table or column, file or network access, or any other query error.
            QueryTimeout: the query ran past ``timeout_s`` and was stopped.
        """
        max_rows = self._settings.sql_max_rows if max_rows is None else int(max_rows)
        timeout_s = self._settings.sql_timeout_s if timeout_s is None else float(timeout_s)
        if max_rows < 0 or timeout_s <= 0:
            raise BadInput(f"max_rows must be >= 0 and timeout_s > 0, got {max_rows} and {timeout_s}")
        if not sql or not sql.strip():
            raise BadInput("the SQL is empty; send one SELECT statement")
        self.refresh()
        with self._lock:
            self._check_open()
            cursor = self._con.cursor()
            registered = dict(self._registered)
        try:
            for name, source in registered.items():
                cursor.register(name, source)
            return self._run(cursor, sql, max_rows, timeout_s)
        finally:
            cursor.close()

    def _run(self, cursor: duckdb.DuckDBPyConnection, sql: str, max_rows: int,
             timeout_s: float) -> QueryResult:
        started = time.perf_counter()
        try:
            statements = cursor.extract_statements(sql)
        except duckdb.Error as e:
            raise BadInput(f"SQL syntax error: {e}") from None
        if not statements:
            raise BadInput("the SQL is empty; send one SELECT statement")
        if len(statements) != 1:
            raise BadInput(f"send exactly one SQL statement, got {len(statements)}")
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            what = "PIVOT or other multi-part" if kind.name == "MULTI" else kind.name
            raise BadInput(f"only read-only SELECT queries are allowed, not {what} statements")
        done, fired = threading.Event(), threading.Event()

        def watchdog() -> None:  # repeats the interrupt in case one lands before execution starts
            if done.wait(timeout_s):
                return
            fired.set()
            while True:
                try:
                    cursor.interrupt()
                except duckdb.Error:
                    return
                if done.wait(0.1):
                    return
        watcher = threading.Thread(target=watchdog, name="sql-timeout", daemon=True)
        watcher.start()
        try:
            relation = cursor.sql(statements[0].query)
            columns, types = list(relation.columns), [str(t) for t in relation.types]
            rows = _fetch(relation.to_arrow_reader(min(max_rows + 1, 4096)), max_rows + 1)
        except duckdb.InterruptException:
            if fired.is_set():
                raise QueryTimeout(f"query ran past the {timeout_s:g} s limit and was stopped; "
                                   "add a LIMIT or a WHERE") from None
            raise BadInput("the query was interrupted") from None
        except duckdb.PermissionException:
            raise BadInput("file and network access are disabled in SQL queries; query the "
                           f"lake's views instead: {', '.join(TABLES)}") from None
        except duckdb.CatalogException as e:
            message = str(e).splitlines()[0]
            if "Table with name" in message:  # DuckDB's "did you mean" names system tables
                raise BadInput(f"{message} The lake's tables are: {', '.join(TABLES)}") from None
            raise BadInput(f"query failed: {e}") from None
        except duckdb.Error as e:
            raise BadInput(f"query failed: {e}") from None
        finally:
            done.set()
            watcher.join()
        truncated = len(rows) > max_rows
        return QueryResult(columns, types, rows[:max_rows], truncated,
                           (time.perf_counter() - started) * 1000)

    def _check_open(self) -> None:
        if self._con is None:
            raise ImagelakeError("the SQL sandbox is closed; make a new SqlSandbox")

    def close(self) -> None:
        """Close the connection; later calls raise. Safe to call twice."""
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None


def _fetch(reader: pa.RecordBatchReader, limit: int) -> list[tuple]:
    rows: list[tuple] = []
    try:
        for batch in reader:
            batch = batch.slice(0, limit - len(rows))
            rows.extend(zip(*(column.to_pylist() for column in batch.columns)))
            if len(rows) >= limit:
                break
    finally:
        reader.close()
    return rows


def jsonable(value: Any) -> Any:
    """A JSON-ready copy of a query value: datetimes/dates/times -> ISO 8601, timedeltas -> seconds,
    bytes -> ``{"$bytes": length}`` (never the content), Decimal -> float, UUID -> str,
    non-finite floats -> None; lists, tuples and dicts (structs) recursively."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": len(value)}
    if isinstance(value, decimal.Decimal):
        return jsonable(float(value))
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    value = jsonable(value)
    return value if isinstance(value, str) else json.dumps(value)


def format_result(result: QueryResult, fmt: Literal["table", "csv", "json"]) -> str:
    """Render a result for ``imagelake sql --format``. ``table`` is aligned text with a row-count
    footer (NULL shown as ``NULL``, cells cut at 60 characters); ``csv`` has a header row and NULL
    as an empty field; ``json`` is one object with columns, types, rows, truncated and elapsed_ms.

    Raises:
        BadInput: an unknown ``fmt``.
    """
    if fmt == "json":
        return json.dumps({"columns": result.columns, "types": result.types,
                           "rows": jsonable(result.rows), "truncated": result.truncated,
                           "elapsed_ms": round(result.elapsed_ms, 3)})
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows([_cell(v) for v in row] for row in result.rows)
        return out.getvalue()
    if fmt != "table":
        raise BadInput(f"unknown format {fmt!r}; use table, csv or json")
    cells = [[("NULL" if v is None else _cell(v)) for v in row] for row in result.rows]
    cells = [[c.replace("\n", "\\n") for c in row] for row in cells]
    cells = [[c if len(c) <= 60 else c[:59] + "…" for c in row] for row in cells]
    widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(result.columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [result.columns, *cells]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    n = len(result.rows)
    lines.append(f"({n} row{'' if n == 1 else 's'}" +
                 (", truncated: more rows exist; add a LIMIT)" if result.truncated else ")"))
    return "\n".join(lines) + "\n"
