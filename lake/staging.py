"""Staged writes: what tasks do instead of committing.

A task writes each table's rows for its partition to one Parquet file with a deterministic name,
``_staging/<run_id>/<table>/part-<partition>.parquet``: first to a temporary name, then renamed (on an object store: spooled to a local temporary file,
then uploaded through :class:`lake.store.LakeStore` in one atomic put). A
retried or speculative attempt of the same partition overwrites the same name, so the driver, which
commits only the files named in the task results, can never see a row twice. This module must not
import deltalake: it runs inside Spark workers, which fork.
"""

from __future__ import annotations

import os
import tempfile
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

__all__ = ["StagedWriter", "staged_path", "filesystem_for", "remove_staging", "staged_dataset", "remote_store"]


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path for a local path or URI (``s3://`` with the
    settings' ``storage_options``, see :mod:`lake.remote`)."""
    if "://" not in path:
        return pafs.LocalFileSystem(), path
    from lake.remote import job_filesystem

    return job_filesystem(path)


def remote_store(uri: str):
    """``(LakeStore, key)`` for an object-store URI (the store rooted at its bucket), else ``None``."""
    if "://" not in uri or uri.startswith("file://"):
        return None
    from lake.store import LakeStore

    scheme, rest = uri.split("://", 1)
    bucket, _, key = rest.partition("/")
    return LakeStore.for_lake(f"{scheme}://{bucket}"), key


def remove_staging(staging_dir: str) -> None:
    """Remove a run's staging folder (local or object store); nothing when it is not there.

    On an object store every object under the prefix is deleted through :class:`lake.store.LakeStore`
    (pyarrow's ``delete_dir`` would leave an empty "folder" marker object behind).
    """
    remote = remote_store(staging_dir)
    if remote is not None:
        store, prefix = remote
        for o in store.list(prefix):
            store.delete(o.key)
        return
    fs, path = filesystem_for(staging_dir)
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass


def staged_dataset(files: list[str], schema: pa.Schema):
    """A pyarrow dataset over staged Parquet files (what DuckDB scans without loading them)."""
    import pyarrow.dataset as pads

    if not files:
        return schema.empty_table()
    fs, _ = filesystem_for(files[0])
    return pads.dataset([filesystem_for(f)[1] for f in files], schema=schema, format="parquet", filesystem=fs)


def staged_path(staging_dir: str, table: str, partition: int) -> str:
    return f"{staging_dir}/{table}/part-{partition:05d}.parquet"


class StagedWriter:
    """Streams one table's rows of one partition into its staged Parquet file.

    ``close()`` renames the finished file into place and returns its path, or ``None`` when no row
    was written (no file is left behind). ``abort()`` removes the temporary file. With ``sort_by``
    the partition's rows are buffered and written sorted (with ``row_group_rows`` per row group),
    so that point lookups by key read one small row group per file.
    """

    def __init__(self, staging_dir: str, table: str, partition: int, schema: pa.Schema,
                 sort_by: tuple[str, ...] = (), row_group_rows: int | None = None):
        self.final = staged_path(staging_dir, table, partition)
        self.schema = schema
        self.sort_by, self.row_group_rows = tuple(sort_by), row_group_rows
        self._buffer: list[pa.Table] = []
        self.rows = 0
        self._remote = remote_store(self.final)
        if self._remote is None:
            self._fs, self._final_in_fs = filesystem_for(self.final)
            parent = self._final_in_fs.rsplit("/", 1)[0]
            self._tmp = f"{parent}/.{os.path.basename(self._final_in_fs)}.{uuid.uuid4().hex}.tmp"
            self._fs.create_dir(parent, recursive=True)
        else:
            # object store: spool to local disk, then one upload (atomic: the object appears whole)
            self._fs = pafs.LocalFileSystem()
            self._tmp = os.path.join(tempfile.gettempdir(), f"imagelake-staged-{uuid.uuid4().hex}.parquet")
        self._writer: pq.ParquetWriter | None = None

    def write(self, rows: pa.Table | pa.RecordBatch | list[dict]) -> None:
        if isinstance(rows, list):
            if not rows:
                return
            rows = pa.Table.from_pylist(rows, schema=self.schema)
        if rows.num_rows == 0:
            return
        if isinstance(rows, pa.RecordBatch):
            rows = pa.Table.from_batches([rows])
        rows = rows.select(self.schema.names).cast(self.schema)
        self.rows += rows.num_rows
        if self.sort_by:
            self._buffer.append(rows)  # sorted as a whole at close()
            return
        self._write(rows)

    def _write(self, rows: pa.Table) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, self.schema, filesystem=self._fs, compression="zstd")
        self._writer.write_table(rows, row_group_size=self.row_group_rows)

    def close(self) -> str | None:
        if self._buffer:
            rows = pa.concat_tables(self._buffer).sort_by([(c, "ascending") for c in self.sort_by])
            self._buffer = []
            self._write(rows)
        if self._writer is None:
            return None
        self._writer.close()
        self._writer = None
        if self._remote is None:
            self._fs.move(self._tmp, self._final_in_fs)
            return self.final
        try:
            self._remote[0].upload(self._remote[1], self._tmp)
        finally:
            os.unlink(self._tmp)
        return self.final

    def abort(self) -> None:
        self._buffer = []
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
                try:
                    self._fs.delete_file(self._tmp)
                except (FileNotFoundError, OSError):
                    pass
