"""TEMPORARY stand-in for ``lake/sql.py`` (written on the ``sql`` branch), so the API's tests run.

Only the agreed surface lives here: :class:`QueryResult`, :class:`SqlSandbox` (``query``,
``refresh``, ``close``) and :func:`jsonable`. Replace this file with the real module on merge.
"""

from __future__ import annotations

import datetime as dt
import decimal
import threading
import time
from dataclasses import dataclass

import duckdb
from deltalake import DeltaTable

from lake.catalog import TABLES, Lake
from lake.commit import ensure_tables
from lake.errors import BadInput, QueryTimeout
from lake.settings import Settings

__all__ = ["QueryResult", "SqlSandbox", "jsonable"]


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    types: list[str]
    rows: list[tuple]
    truncated: bool
    elapsed_ms: float


class SqlSandbox:
    """Read-only, single-statement SQL over every catalog table (one connection, serialized)."""

    def __init__(self, lake: Lake, settings: Settings):
        self.lake, self.settings = lake, settings
        self._lock = threading.Lock()
        self._con = duckdb.connect()
        self._con.execute(f"SET threads={int(settings.sql_threads)}")
        self._versions: dict[str, int] = {}
        ensure_tables(lake)
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> dict[str, int]:
        with self._lock:
            for name in TABLES:
                table = DeltaTable(self.lake.table_uri(name))
                if force or self._versions.get(name) != table.version():
                    self._con.register(name, table.to_pyarrow_dataset())
                    self._versions[name] = table.version()
            return dict(self._versions)

    def query(self, sql: str, *, max_rows: int | None = None, timeout_s: float | None = None) -> QueryResult:
        max_rows = self.settings.sql_max_rows if max_rows is None else max_rows
        timeout_s = self.settings.sql_timeout_s if timeout_s is None else timeout_s
        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as e:
            raise BadInput(f"bad SQL: {e}") from None
        if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
            raise BadInput("only one read-only SELECT statement is allowed")
        with self._lock:
            timer = threading.Timer(timeout_s, self._con.interrupt)
            start = time.perf_counter()
            timer.start()
            try:
                cur = self._con.execute(sql)
                rows = cur.fetchmany(max_rows + 1)
                columns = [d[0] for d in cur.description]
                types = [str(d[1]) for d in cur.description]
            except duckdb.InterruptException:
                raise QueryTimeout(f"query ran past {timeout_s} s and was stopped") from None
            except duckdb.Error as e:
                raise BadInput(f"bad SQL: {e}") from None
            finally:
                timer.cancel()
        return QueryResult(columns, types, rows[:max_rows], len(rows) > max_rows,
                           (time.perf_counter() - start) * 1000)

    def close(self) -> None:
        self._con.close()


def jsonable(value):
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": len(value)}
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
