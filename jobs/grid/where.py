"""``--where``: a metadata filter (JSON, :mod:`lake.metadata_filter`) or the operator's SQL predicate
over ``images`` columns, validated before it touches the lake.

Text that starts with ``{`` is the metadata filter language (images and metadata columns, bound
parameters). Anything else is kept, for operators' scripts, as a raw SQL predicate:

The text must parse as one SQL *expression* (DuckDB's expression parser: no statements, no
``;``-chained extras). It is then applied as a filter on a connection where ``images`` is the only
table, file and network access are off, and configuration is locked, under a time limit; the
result is the set of ``seq`` values it selects. The text itself is never pasted into other SQL.
"""

from __future__ import annotations

import threading

import duckdb
import numpy as np

from lake.catalog import TABLES, Lake
from lake.commit import open_table
from lake.errors import BadInput

__all__ = ["select_seqs"]


def select_seqs(lake: Lake, where: str, timeout_s: float = 30.0) -> np.ndarray:
    """The sorted ``seq`` values of the images for which ``where`` is true.

    Raises:
        BadInput: empty text, not a single expression, an unknown column or table, a query error,
            file access, or it ran longer than ``timeout_s``.
    """
    if where is None or not where.strip():
        raise BadInput("--where is empty; give a metadata filter, e.g. '{\"collection\": \"cats\"}', "
                       "or a predicate over images columns, e.g. \"collection = 'cats'\"")
    if where.lstrip().startswith("{"):
        from lake.metadata_filter import matching_seqs

        return matching_seqs(lake, where)
    try:
        expr = duckdb.SQLExpression(where)
    except duckdb.Error as e:
        raise BadInput(f"--where must be one SQL expression over images columns: {_first_line(e)}") from None
    images = open_table(lake, "images")
    con = duckdb.connect()
    timer = threading.Timer(timeout_s, con.interrupt)
    try:
        source = images.to_pyarrow_dataset() if images.file_uris() else TABLES["images"].schema.empty_table()
        con.register("images", source)
        con.execute("SET enable_external_access=false")
        con.execute("SET lock_configuration=true")
        timer.start()
        try:
            table = con.table("images").filter(expr).project("seq").order("seq").to_arrow_table()
        except duckdb.InterruptException:
            raise BadInput(f"--where ran longer than {timeout_s:g} s; simplify the predicate") from None
        except duckdb.Error as e:
            raise BadInput(f"--where {where!r} is not a valid predicate over images columns "
                           f"({', '.join(TABLES['images'].schema.names)}): {_first_line(e)}") from None
    finally:
        timer.cancel()
        con.close()
    return table.column("seq").to_numpy().astype(np.int64)


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
