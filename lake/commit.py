"""Driver-side commits to Delta tables: once per job run and table, idempotent.

Two guarantees hold whatever happens to tasks or to the driver:

* **Once per run.** Each commit records a Delta transaction (``txn``) whose app id is the run id; a
  repeated commit of the same run and table finds it and writes nothing.
* **Insert if absent.** Rows whose key is already in the table, or that repeat within the commit,
  are dropped, so a re-run after a crash (new run id, same inputs) adds only what is missing.

``images.seq`` is assigned here, densely, continuing from the table's current maximum; commits hold
the lake's commit lock so two writers never hand out the same seq.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import TableNotFoundError
from deltalake.transaction import AddAction

from lake.catalog import TABLES, Lake, TableSpec, table_spec
from lake.lock import LakeLock
from lake.remote import delta_options, retry_log_gap
from lake.staging import filesystem_for

__all__ = ["CommitResult", "ensure_tables", "open_table", "commit_staged", "commit_rows", "rows_by_key", "now_utc",
           "KEY_LOOKUP_ROWS"]


@dataclass(frozen=True)
class CommitResult:
    table: str
    rows: int
    version: int | None
    skipped: bool = False


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def ensure_tables(lake: Lake, names: Iterable[str] | None = None) -> None:
    """Create every catalog table that does not exist yet (empty, with its schema)."""
    lake.ensure()
    for name in names or TABLES:
        spec = table_spec(name)
        DeltaTable.create(lake.table_uri(name), spec.schema, mode="ignore", name=name,
                          description=spec.description, storage_options=delta_options(lake))


def open_table(lake: Lake, name: str) -> DeltaTable:
    """The lake's table ``name`` (created empty when missing), read again if its log listing raced
    a commit (:func:`lake.remote.retry_log_gap`)."""
    def read() -> DeltaTable:
        return DeltaTable(lake.table_uri(name), storage_options=delta_options(lake))

    try:
        return retry_log_gap(read)
    except TableNotFoundError:
        ensure_tables(lake, [name])
        return retry_log_gap(read)


def _sources_dataset(paths: list[str]) -> pads.Dataset:
    fs, _ = filesystem_for(paths[0])
    return pads.dataset([filesystem_for(p)[1] for p in paths], format="parquet", filesystem=fs)


def _commit_query(spec: TableSpec, dedupe: bool, assign_seq: bool, has_existing: bool) -> str:
    cols = list(spec.schema.names)
    key = ", ".join(f"s.{k}" for k in spec.key)
    where = ""
    if dedupe and has_existing:
        match = " AND ".join(f"e.{k} IS NOT DISTINCT FROM s.{k}" for k in spec.key)
        where = f"WHERE NOT EXISTS (SELECT 1 FROM existing e WHERE {match})"
    qualify = f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY s.{cols[0]}, s.{cols[-1]}) = 1" if dedupe else ""
    select = ", ".join(f"s.{c}" for c in cols if c != "seq")
    inner = f"SELECT {select} FROM staged s {where} {qualify}"
    order = ", ".join(spec.sort_by) if spec.sort_by else ""
    if assign_seq:
        start = "(SELECT coalesce(max(seq), -1) FROM existing)" if has_existing else "-1"
        seq_expr = f"{start} + row_number() OVER (ORDER BY n.image_id)"
        outer = ", ".join(f"{seq_expr} AS seq" if c == "seq" else f"n.{c}" for c in cols)
        return f"SELECT {outer} FROM ({inner}) n" + (f" ORDER BY {order}" if order else "")
    return inner + (f" ORDER BY {order}" if order else "")


def commit_staged(lake: Lake, table: str, files: list[str], *, run_id: str, dedupe: bool = True,
                  assign_seq: bool = False) -> CommitResult:
    """Commit the staged Parquet ``files`` (written by tasks of run ``run_id``) to ``table``.

    Args:
        files: exactly the files the tasks reported; orphans of failed attempts are never globbed in.
        dedupe: drop rows whose key is already in the table or repeats among ``files``.
        assign_seq: fill the ``seq`` column densely (the ``images`` table).
    Returns:
        How many rows were committed and the new table version (``skipped`` if this run's commit to
        this table had already happened).
    """
    spec = table_spec(table)
    files = sorted(set(f for f in files if f))
    with LakeLock(lake, "commit", timeout=600, holder=f"commit {table} {run_id}"):
        dt_ = open_table(lake, table)
        if dt_.transaction_version(run_id) is not None:
            return CommitResult(table, 0, dt_.version(), skipped=True)
        if not files:
            return CommitResult(table, 0, dt_.version())
        con = duckdb.connect()
        try:
            con.execute("SET threads=2")
            con.register("staged", _sources_dataset(files))
            has_existing = bool(dt_.file_uris())
            if has_existing:
                con.register("existing", dt_.to_pyarrow_dataset())
            if lake.is_local and not assign_seq and _conflicts(con, spec, has_existing) == 0:
                stats = {f: _file_stats(pq.ParquetFile(f).metadata, spec) for f in files}
                if all(v is not None for v in stats.values()):
                    return _adopt(lake, dt_, spec, files, run_id, stats)
            sql = _commit_query(spec, dedupe, assign_seq, has_existing)
            reader = con.sql(sql).to_arrow_reader(65536)
            return _write(dt_, spec, reader, run_id)
        finally:
            con.close()


def _conflicts(con: duckdb.DuckDBPyConnection, spec: TableSpec, has_existing: bool) -> int:
    """Rows of ``staged`` whose key repeats among the staged rows or is already in ``existing``."""
    key = ", ".join(f"s.{k}" for k in spec.key)
    n = con.execute(f"SELECT count(*) - count(DISTINCT ({key})) FROM staged s").fetchall()[0][0]
    if has_existing and n == 0:
        match = " AND ".join(f"e.{k} IS NOT DISTINCT FROM s.{k}" for k in spec.key)
        n = con.execute(f"SELECT count(*) FROM staged s WHERE EXISTS (SELECT 1 FROM existing e WHERE {match})").fetchall()[0][0]
    return int(n)


def _adopt(lake: Lake, dt_: DeltaTable, spec: TableSpec, files: list[str], run_id: str,
           stats: dict[str, dict]) -> CommitResult:
    """Commit staged files as they are: move them into the table folder and add them in one commit.

    Used when no staged key collides, so nothing needs rewriting. A crash between the moves and the
    commit leaves unreferenced files in the table folder, which readers ignore and the janitor removes.
    """
    table_dir = lake.table_uri(spec.name)
    actions = []  # ``stats``: each staged file's Delta statistics (:func:`_file_stats`), all known
    for f in files:
        name = f"part-{run_id}-{os.path.basename(f)}"
        target = os.path.join(table_dir, name)
        os.replace(f, target)
        actions.append(AddAction(path=name, size=os.path.getsize(target), partition_values={},
                                 modification_time=int(os.path.getmtime(target) * 1000), data_change=True,
                                 stats=json.dumps(stats[f])))
    rows = sum(json.loads(a.stats)["numRecords"] for a in actions)
    dt_.create_write_transaction(actions, mode="append", schema=spec.schema,
                                 commit_properties=_commit_properties(spec, run_id))
    dt_.update_incremental()
    return CommitResult(spec.name, rows, dt_.version())


def _file_stats(meta: pq.FileMetaData, spec: TableSpec) -> dict | None:
    """Delta file statistics from Parquet metadata: the row count and, for every flat column, its null
    count and min/max; ``None`` when some column's bounds cannot be stated (the caller then rewrites
    the rows through the Delta writer, which computes its own).

    Every flat column needs them: deltalake's dataset reads a column without min/max as all null, so
    a filter on such a column (``reason = 'empty'``) would skip the file and silently match nothing.
    Binary columns carry none (Delta collects none for them). Timestamps are stated to the
    millisecond as Delta does, min rounded down and max up; a long string's max is its prefix
    followed by the highest code point, so the bounds still hold.
    """
    stats: dict = {"numRecords": meta.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    paths = {meta.schema.column(i).path: i for i in range(meta.num_columns)}
    for field in spec.schema:
        t = field.type
        if pa.types.is_nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
            continue
        i = paths.get(field.name)
        if i is None:
            return None
        groups = [meta.row_group(g).column(i).statistics for g in range(meta.num_row_groups)]
        if any(g is None for g in groups):
            return None
        nulls = sum(g.null_count or 0 for g in groups)
        stats["nullCount"][field.name] = nulls
        if nulls == meta.num_rows:
            continue
        valued = [g for g in groups if g.num_values > 0]
        if not valued or not all(g.has_min_max for g in valued):
            return None
        lo, hi = _stat_value(t, min(g.min for g in valued), False), _stat_value(t, max(g.max for g in valued), True)
        if lo is None or hi is None:
            return None
        stats["minValues"][field.name], stats["maxValues"][field.name] = lo, hi
    return stats


_MAX_STAT_CHARS = 64


def _stat_value(t: pa.DataType, v, upper: bool):
    """One min/max as Delta's JSON statistics state it, or None when it cannot be stated."""
    if pa.types.is_timestamp(t):
        if t.tz is None or not isinstance(v, dt.datetime):
            return None
        v = v.astimezone(dt.timezone.utc)
        ms = v.replace(microsecond=v.microsecond // 1000 * 1000)
        if upper and ms != v:
            ms += dt.timedelta(milliseconds=1)
        return ms.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms.microsecond // 1000:03d}Z"
    if pa.types.is_date(t):
        return v.isoformat() if isinstance(v, dt.date) else None
    if pa.types.is_boolean(t):
        return bool(v)
    if pa.types.is_integer(t):
        return int(v)
    if pa.types.is_floating(t):
        return float(v) if v == v and abs(v) != float("inf") else None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if not isinstance(v, str):
            return None
        if len(v) <= _MAX_STAT_CHARS:
            return v
        return v[:_MAX_STAT_CHARS] + "\U0010ffff" if upper else v[:_MAX_STAT_CHARS]
    return None


def _commit_properties(spec: TableSpec, run_id: str) -> CommitProperties:
    return CommitProperties(
        custom_metadata={"imagelake.run_id": run_id, "imagelake.table": spec.name},
        app_transactions=[Transaction(app_id=run_id, version=1, last_updated=int(now_utc().timestamp() * 1000))],
    )


def commit_rows(lake: Lake, table: str, rows: pa.Table | list[dict], *, run_id: str,
                dedupe: bool = False, assign_seq: bool = False) -> CommitResult:
    """Commit rows built on the driver (job runs, curation events, builds, uploads): one commit,
    once per run id.

    With ``dedupe`` the rows whose key is already present are dropped first. A few rows
    (``<= KEY_LOOKUP_ROWS``, distinct non-null keys: an upload's) are checked by reading only the
    key columns with an ``isin`` filter, which the files' statistics prune; larger sets by an
    anti-join over the table. With ``assign_seq`` (the ``images`` table) ``seq`` is filled densely
    after the table's largest, in ``image_id`` order as :func:`commit_staged` does.
    """
    spec = table_spec(table)
    if isinstance(rows, list):
        rows = pa.Table.from_pylist(rows, schema=_fillable(spec) if assign_seq else spec.schema)
    if assign_seq and "seq" not in rows.column_names:
        rows = rows.append_column("seq", pa.nulls(rows.num_rows, pa.int64()))
    rows = rows.select(spec.schema.names).cast(_fillable(spec) if assign_seq else spec.schema)
    with LakeLock(lake, "commit", timeout=600, holder=f"commit {table} {run_id}"):
        dt_ = open_table(lake, table)
        if dt_.transaction_version(run_id) is not None:
            return CommitResult(table, 0, dt_.version(), skipped=True)
        if dedupe and dt_.file_uris() and rows.num_rows:
            rows = _drop_present(dt_, spec, rows)
        if rows.num_rows == 0:
            return CommitResult(table, 0, dt_.version())
        if assign_seq:
            rows = rows.sort_by("image_id")
            start = _max_seq(dt_) + 1
            rows = rows.set_column(rows.schema.get_field_index("seq"), "seq",
                                   pa.array(range(start, start + rows.num_rows), pa.int64()))
            rows = rows.cast(spec.schema)
        return _write(dt_, spec, rows.to_reader(), run_id)


#: At most this many rows are deduplicated by a key lookup instead of an anti-join (commit_rows).
KEY_LOOKUP_ROWS = 1024


def _fillable(spec: TableSpec) -> pa.Schema:
    """The table's schema with ``seq`` nullable: rows before :func:`commit_rows` numbers them."""
    i = spec.schema.get_field_index("seq")
    return spec.schema.set(i, spec.schema.field(i).with_nullable(True))


def _drop_present(dt_: DeltaTable, spec: TableSpec, rows: pa.Table) -> pa.Table:
    """``rows`` without those whose key is in the table or repeats among them."""
    keys = [rows.column(k).to_pylist() for k in spec.key]
    tuples = list(zip(*keys))
    if rows.num_rows <= KEY_LOOKUP_ROWS and len(set(tuples)) == len(tuples) and \
            not any(v is None for col in keys for v in col):
        found = rows_by_key(dt_, spec.key[0], keys[0], list(spec.key))
        present = set(zip(*(found.column(k).to_pylist() for k in spec.key)))
        if not present:
            return rows
        return rows.filter(pa.array([t not in present for t in tuples], pa.bool_()))
    con = duckdb.connect()
    try:
        con.register("staged", rows)
        con.register("existing", dt_.to_pyarrow_dataset())
        return con.sql(_commit_query(spec, True, False, True)).to_arrow_table()
    finally:
        con.close()


def rows_by_key(dt_: DeltaTable, column: str, values: list, columns: list[str]) -> pa.Table:
    """The table's rows whose ``column`` is one of ``values`` (a few: a point lookup), ``columns`` only.

    Only the files whose Delta statistics admit one of the values are opened, and in them only the
    row groups whose Parquet statistics do: :meth:`DeltaTable.to_pyarrow_dataset` instead builds a
    filter expression for every file of the table (33 ms at 50 files, growing with each commit).
    """
    from urllib.parse import unquote, urlparse

    schema = pa.schema(dt_.schema())
    out_schema = pa.schema([schema.field(c) for c in columns])
    actions = pa.table(dt_.get_add_actions(flatten=True))
    if actions.num_rows == 0 or not values:
        return out_schema.empty_table()
    wanted = sorted(set(values))
    keep = pa.array([True] * actions.num_rows)
    if f"min.{column}" in actions.column_names and f"max.{column}" in actions.column_names:
        lo, hi = actions.column(f"min.{column}"), actions.column(f"max.{column}")
        admits = None
        for v in wanted:
            term = pc.and_kleene(pc.less_equal(lo, v), pc.greater_equal(hi, v))
            admits = term if admits is None else pc.or_kleene(admits, term)
        keep = pc.fill_null(admits, True)   # a file without statistics is read
    paths = actions.filter(keep).column("path").to_pylist()
    if not paths:
        return out_schema.empty_table()
    root = dt_.table_uri if "://" in dt_.table_uri and not dt_.table_uri.startswith("file://") \
        else urlparse(dt_.table_uri).path
    uris = [f"{root.rstrip('/')}/{unquote(p)}" for p in paths]
    fs, _ = filesystem_for(uris[0])
    dataset = pads.dataset([filesystem_for(u)[1] for u in uris], schema=schema, format="parquet", filesystem=fs)
    return dataset.to_table(columns=columns, filter=pc.field(column).isin(pa.array(wanted, schema.field(column).type)))


def _max_seq(dt_: DeltaTable) -> int:
    """The table's largest ``seq`` (-1 when empty): from the files' Delta statistics, or read from
    the column when some file has none."""
    if not dt_.file_uris():
        return -1
    actions = pa.table(dt_.get_add_actions(flatten=True))
    if "max.seq" in actions.column_names and actions.column("max.seq").null_count == 0:
        return int(pc.max(actions.column("max.seq")).as_py())
    got = pc.max(dt_.to_pyarrow_dataset().to_table(columns=["seq"]).column("seq")).as_py()
    return -1 if got is None else int(got)


def _write(dt_: DeltaTable, spec: TableSpec, reader: pa.RecordBatchReader, run_id: str) -> CommitResult:
    counted = _Counter(reader, spec)
    write_deltalake(
        dt_, counted.reader(), mode="append",
        writer_properties=WriterProperties(compression="ZSTD", max_row_group_size=spec.row_group_rows),
        commit_properties=_commit_properties(spec, run_id),
    )
    dt_.update_incremental()
    return CommitResult(spec.name, counted.rows, dt_.version())


class _Counter:
    """Counts rows as the writer pulls them, casting each batch to the table's schema."""

    def __init__(self, reader: pa.RecordBatchReader, spec: TableSpec):
        self._reader, self._spec, self.rows = reader, spec, 0

    def reader(self) -> pa.RecordBatchReader:
        def batches() -> Iterator[pa.RecordBatch]:
            for b in self._reader:
                if b.num_rows == 0:
                    continue
                self.rows += b.num_rows
                yield pa.Table.from_batches([b]).select(self._spec.schema.names).cast(self._spec.schema).combine_chunks().to_batches()[0]
        return pa.RecordBatchReader.from_batches(self._spec.schema, batches())
