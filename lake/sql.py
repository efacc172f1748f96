"""The read-only SQL sandbox: one DuckDB connection with every lake table as a view.

Each table in :data:`SQL_TABLES` (every catalog table but ``tokens``, whose rows hold the hashes of
the API secrets) is queryable under its own name and always shows the table's current Delta version
(re-checked at most every ``settings.refresh_s`` seconds). A query is one SELECT (DESCRIBE, SHOW,
SUMMARIZE and WITH count as SELECT) whose whole parse tree reads only (:mod:`lake.sql_guard`), runs
on its own cursor under a time limit and returns at most ``max_rows`` rows and ``sql_max_bytes``
bytes. File and network access, extensions and settings are locked off, so SQL can read the lake's
tables and nothing else.

Nothing in the connection is writable: a table with data is a view over its Parquet files, an empty
one a view over a typed ``SELECT CAST(NULL AS ...) ... WHERE false``. DuckDB spills to a private
folder (``tempfile.mkdtemp``) capped at ``sql_max_temp_size`` and removed on :meth:`SqlSandbox.close`.

The time limit covers fetching and converting rows, not only DuckDB's execution: the watchdog
interrupts DuckDB, and the fetch loop checks the deadline between batches (Python conversion of
a million decimals takes seconds after DuckDB has finished). ``as_json`` encodes the rows inside
the same limits, so the API's response is bounded in time and bytes too.

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
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import duckdb
import pyarrow as pa
from deltalake import DeltaTable

from lake.catalog import TABLES, Lake
from lake.commit import ensure_tables
from lake.errors import BadInput, ImagelakeError, QueryTimeout, TooLarge
from lake.remote import retry_log_gap
from lake.settings import Settings
from lake.store import open_delta
from lake.sql_guard import FILE_ACCESS, check_statement

__all__ = ["QueryResult", "SQL_TABLES", "SqlSandbox", "format_result", "jsonable"]

log = logging.getLogger(__name__)
SQL_TABLES = tuple(name for name in TABLES if name != "tokens")  # tokens: secrets' hashes, never in SQL
_BATCH_ROWS = 128   # rows per Arrow batch: the byte cap and the deadline are checked between batches
_CHECK_EVERY = 64   # rows JSON-encoded between deadline checks


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    types: list[str]          # DuckDB type names
    rows: list[tuple]         # Python values (see the module docstring)
    truncated: bool           # more rows existed than the cap
    elapsed_ms: float
    rows_json: str | None = None   # with as_json: the rows as one JSON array (jsonable values)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _too_large(max_bytes: int) -> TooLarge:
    return TooLarge(f"the query's result is larger than the {_size(max_bytes)} limit (setting "
                    "sql_max_bytes); select fewer rows or columns (a LIMIT, a WHERE) or raise sql_max_bytes")


def _timed_out(timeout_s: float) -> QueryTimeout:
    return QueryTimeout(f"query ran past the {timeout_s:g} s limit and was stopped; add a LIMIT or a WHERE")


class SqlSandbox:
    """Read-only SQL over a lake. Thread-safe: share one instance between request threads."""

    def __init__(self, lake: Lake, settings: Settings):
        ensure_tables(lake)
        self._lake, self._settings = lake, settings
        self._lock = threading.Lock()
        self._tables = {name: open_delta(lake, name) for name in SQL_TABLES}  # bounded store timeouts
        self._versions: dict[str, int] = {}
        self._registered: dict[str, Any] = {}   # non-local lakes: Arrow objects each cursor registers
        self._checked_at = -math.inf
        self._temp_dir = tempfile.mkdtemp(prefix="imagelake-sql-")   # mode 0700, this sandbox's only
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._temp_dir, ignore_errors=True)
        self._con: duckdb.DuckDBPyConnection | None = duckdb.connect()
        con = self._con
        self._empty = {name: self._empty_select(con, name) for name in SQL_TABLES}
        try:
            con.execute(f"SET memory_limit={_quote(settings.sql_memory_limit)}")
            con.execute(f"SET max_temp_directory_size={_quote(settings.sql_max_temp_size)}")
        except duckdb.Error as e:
            self.close()
            raise BadInput(f"bad sql_memory_limit or sql_max_temp_size (sizes like '2GB', '1GiB'): "
                           f"{str(e).splitlines()[0]}") from None
        con.execute(f"SET temp_directory={_quote(self._temp_dir)}")
        con.execute(f"SET threads={int(settings.sql_threads)}")
        con.execute("SET TimeZone='UTC'")
        con.execute("SET parquet_metadata_cache=true")   # Delta data files never change
        con.execute("SET autoinstall_known_extensions=false")
        con.execute("SET autoload_known_extensions=false")
        if lake.is_local:   # each served table's own folder: never tokens/, never the lake root
            folders = ", ".join(_quote(lake.table_uri(name) + "/") for name in SQL_TABLES)
            con.execute(f"SET allowed_directories=[{folders}]")
        # after allowed_directories and temp_directory, or those SETs fail; DuckDB adds the temp
        # folder to allowed_directories here, which is why lake.sql_guard refuses file functions
        con.execute("SET enable_external_access=false")
        con.execute("SET lock_configuration=true")
        self.refresh(force=True)

    @staticmethod
    def _empty_select(con: duckdb.DuckDBPyConnection, name: str) -> str:
        """A zero-row SELECT with the table's columns and DuckDB types: an empty table's view
        source that, unlike an in-memory table, nothing can insert into."""
        schema = TABLES[name].schema
        types = con.from_arrow(schema.empty_table()).types
        columns = ", ".join(f"CAST(NULL AS {t}) AS {_ident(f.name)}" for f, t in zip(schema, types))
        return f"SELECT {columns} WHERE false"

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
                        retry_log_gap(table.update_incremental)
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
            select = self._empty[name]
        elif self._lake.is_local:
            # an evolving table's older files lack the columns added since: match columns by name
            union = ", union_by_name=true" if TABLES[name].evolving else ""
            select = f"SELECT * FROM read_parquet([{', '.join(_quote(f) for f in files)}]{union})"
        else:  # registered on each query's cursor: such views are not shared between connections
            self._registered[name] = table.to_pyarrow_dataset()
            self._con.execute(f'DROP VIEW IF EXISTS "{name}"')
            return
        self._registered.pop(name, None)
        self._con.execute(f'CREATE OR REPLACE VIEW "{name}" AS {select}')

    def query(self, sql: str, *, max_rows: int | None = None, timeout_s: float | None = None,
              max_bytes: int | None = None, as_json: bool = False) -> QueryResult:
        """Run one read-only SELECT and return at most ``max_rows`` rows.

        Args:
            max_rows: row cap (default ``settings.sql_max_rows``); more rows set ``truncated``.
            timeout_s: time limit (default ``settings.sql_timeout_s``) for running, fetching,
                converting and (``as_json``) encoding the rows.
            max_bytes: cap (default ``settings.sql_max_bytes``) on the fetched Arrow data and on the
                JSON text of the rows; checked while fetching, so a huge result stops early.
            as_json: also fill ``rows_json`` (what the HTTP API sends), inside both limits.
        Raises:
            BadInput: empty SQL, a parse error, more than one statement, anything but a read-only
                SELECT, an unknown table or column, file or network access, or any other query error.
            QueryTimeout: the query ran past ``timeout_s`` and was stopped.
            TooLarge: the result is larger than ``max_bytes``.
        """
        max_rows = self._settings.sql_max_rows if max_rows is None else int(max_rows)
        timeout_s = self._settings.sql_timeout_s if timeout_s is None else float(timeout_s)
        max_bytes = self._settings.sql_max_bytes if max_bytes is None else int(max_bytes)
        if max_rows < 0 or timeout_s <= 0 or max_bytes <= 0:
            raise BadInput(f"max_rows must be >= 0, timeout_s and max_bytes > 0, got {max_rows}, "
                           f"{timeout_s} and {max_bytes}")
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
            return self._run(cursor, sql, max_rows, timeout_s, max_bytes, as_json)
        finally:
            cursor.close()

    def _run(self, cursor: duckdb.DuckDBPyConnection, sql: str, max_rows: int,
             timeout_s: float, max_bytes: int, as_json: bool) -> QueryResult:
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
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
        check_statement(cursor, statements[0].query, list(SQL_TABLES))
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
            reader = relation.to_arrow_reader(min(max_rows + 1, _BATCH_ROWS))
            rows = _fetch(reader, max_rows + 1, max_bytes, deadline, timeout_s)
            rows_json = _encode(rows[:max_rows], max_bytes, deadline, timeout_s) if as_json else None
        except duckdb.InterruptException:
            if fired.is_set():
                raise _timed_out(timeout_s) from None
            raise BadInput("the query was interrupted") from None
        except duckdb.PermissionException:
            raise BadInput(f"{FILE_ACCESS}: {', '.join(SQL_TABLES)}") from None
        except duckdb.CatalogException as e:
            message = str(e).splitlines()[0]
            if "Table with name" in message:  # DuckDB's "did you mean" names system tables
                raise BadInput(f"{message} The lake's tables are: {', '.join(SQL_TABLES)}") from None
            raise BadInput(f"query failed: {e}") from None
        except duckdb.Error as e:
            raise BadInput(f"query failed: {e}") from None
        finally:
            done.set()
            watcher.join()
        truncated = len(rows) > max_rows
        return QueryResult(columns, types, rows[:max_rows], truncated,
                           (time.perf_counter() - started) * 1000, rows_json)

    def _check_open(self) -> None:
        if self._con is None:
            raise ImagelakeError("the SQL sandbox is closed; make a new SqlSandbox")

    def close(self) -> None:
        """Close the connection and remove its spill folder; later calls raise. Safe to call twice."""
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None
            self._cleanup()


def _fetch(reader: pa.RecordBatchReader, limit: int, max_bytes: int, deadline: float,
           timeout_s: float) -> list[tuple]:
    """Up to ``limit`` rows as Python tuples, batch by batch: the Arrow bytes are counted before a
    batch is converted, and the deadline is checked after each conversion."""
    rows: list[tuple] = []
    size = 0
    try:
        for batch in reader:
            batch = batch.slice(0, limit - len(rows))
            size += batch.nbytes
            if size > max_bytes:
                raise _too_large(max_bytes)
            rows.extend(zip(*(column.to_pylist() for column in batch.columns)))
            if time.monotonic() > deadline:
                raise _timed_out(timeout_s)
            if len(rows) >= limit:
                break
    finally:
        reader.close()
    return rows


def _encode(rows: list[tuple], max_bytes: int, deadline: float, timeout_s: float) -> str:
    """``rows`` as one JSON array of :func:`jsonable` values (ASCII, so characters are bytes),
    refused once it passes ``max_bytes`` or the deadline."""
    parts: list[str] = []
    size = 2
    for i, row in enumerate(rows):
        text = json.dumps(jsonable(list(row)), separators=(",", ":"))
        size += len(text) + 1
        if size > max_bytes:
            raise _too_large(max_bytes)
        parts.append(text)
        if i % _CHECK_EVERY == 0 and time.monotonic() > deadline:
            raise _timed_out(timeout_s)
    if time.monotonic() > deadline:
        raise _timed_out(timeout_s)
    return "[" + ",".join(parts) + "]"


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
