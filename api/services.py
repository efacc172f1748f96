"""What the API serves from: a :class:`LakeReader` per app, holding per-process DuckDB state.

The reader is cheap to construct (no I/O, no connection) and opens its DuckDB connection and Delta
table handles on first use, in the worker process. deltalake cannot run in a process forked after
it was used (its tokio runtime panics, or the child segfaults), so a pre-forking server must make no
request before it forks: ``create_app`` in the master (gunicorn ``--preload``) is fine, a warm-up
request there is not, and a reader used before a fork refuses with a clear error in the child. It re-checks table versions at most every ``settings.refresh_s`` seconds
and rebuilds a view only when its table's Delta version changed.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from typing import Any

import duckdb
import numpy as np
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError
from flask import Flask, current_app

from api.browse_index import BrowseIndex
from api.per_process import ProcessOwner
from lake.bucket_store import retry_log_gap
from lake.catalog import TABLES, Lake
from lake.errors import BadInput, NotFound
from lake.metadata_filter import facet_counts, matching_seqs
from lake.settings import Settings
from lake.store import open_delta, store_errors
from lake.thumbnail_index import ThumbnailIndex
from lake.sql import QueryResult, SqlSandbox

__all__ = ["LakeReader", "SERVED_TABLES", "check_image_id", "init_app", "lake_reader"]

#: Images whose ``image()`` answer each API process keeps (a few KB each), valid while the
#: versions of the tables it reads (``_IMAGE_TABLES``) stay the same.
IMAGE_CACHE_ENTRIES = 4096
_IMAGE_TABLES = ("images", "sources", "metadata", "capture", "image_quality")
SERVED_TABLES = ("images", "sources", "thumbnails", "metadata", "capture", "image_quality", "outliers", "features",
                 "tags")
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")


def check_image_id(image_id: str) -> str:
    """Return ``image_id`` if it is a sha256 in lowercase hex, else raise :class:`BadInput`."""
    if not _IMAGE_ID.fullmatch(image_id):
        shown = image_id if len(image_id) <= 80 else image_id[:77] + "..."
        raise BadInput(f"malformed image id {shown!r}: expected the sha256 of the image bytes, "
                       "64 lowercase hex characters")
    return image_id


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class LakeReader:
    """Trusted point lookups over ``images``/``sources``/``thumbnails`` and a sandbox for user SQL.

    Thread-safe: each lookup runs on its own cursor; refreshes hold a lock.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.lake = Lake.at(settings.lake)
        self._lock = threading.RLock()
        self._owner = ProcessOwner("this API app's lake reader")
        self._con: duckdb.DuckDBPyConnection | None = None
        self._tables: dict[str, DeltaTable] = {}
        self._versions: dict[str, int | None] = {}
        self._view_versions: dict[str, int | None] = {}
        self._datasets: dict[str, Any] = {}
        self._checked_at = float("-inf")
        self._sandbox: SqlSandbox | None = None
        self._sandbox_checked_at = float("-inf")
        # Thumbnails are content-addressed and never rewritten: cache them without invalidation.
        self._thumbs = ByteLRU(int(settings.thumbnail_cache_mb * 1024 * 1024))
        # point lookups: one row group read, not one per data file; on a local lake its arrays are a
        # memory-mapped artifact shared by every worker (lake/thumbnail_index.py)
        self._thumb_index = ThumbnailIndex(artifact_dir=self.lake.artifacts_dir("thumbnail_index")
                                           if self.lake.is_local else None)
        self._thumb_index_version: int | None = None
        self._browse_index = BrowseIndex()  # keyset pages and collection counts per images version
        # image(): five point lookups over Parquet (~15 ms of CPU on 2 cores) per image and version
        self._images = ImageCache(IMAGE_CACHE_ENTRIES)

    # -- per-process state -------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._owner.owns():
            return
        self._con = duckdb.connect(config={"threads": self.settings.sql_threads,
                                           "memory_limit": self.settings.sql_memory_limit})
        self._con.execute("SET parquet_metadata_cache = true")  # Delta data files are immutable
        self._tables, self._versions, self._view_versions, self._datasets = {}, {}, {}, {}
        self._checked_at = self._sandbox_checked_at = float("-inf")
        self._sandbox = None
        self._owner.claim()

    def refresh(self, force: bool = False) -> dict[str, int | None]:
        """Pick up new commits (at most every ``refresh_s`` unless ``force``); table -> version.

        A table that does not exist yet has version ``None`` and is served as empty.
        """
        with self._lock, store_errors(self.lake):
            self._ensure_open()
            if force or time.monotonic() - self._checked_at >= self.settings.refresh_s:
                for name in TABLES:
                    self._versions[name] = self._table_version(name)
                for name in SERVED_TABLES:
                    if name not in self._view_versions or self._view_versions[name] != self._versions[name]:
                        self._build_view(name)
                        self._view_versions[name] = self._versions[name]
                self._checked_at = time.monotonic()
            return dict(self._versions)

    def _table_version(self, name: str) -> int | None:
        table = self._tables.get(name)
        if table is None:
            try:
                table = retry_log_gap(lambda: open_delta(self.lake, name))  # bounded timeouts on an object store
            except TableNotFoundError:
                return None
            self._tables[name] = table
        else:
            retry_log_gap(table.update_incremental)  # a listing can race the bucket log's commits
        return table.version()

    def _build_view(self, name: str) -> None:
        assert self._con is not None
        table = self._tables.get(name)
        files = table.file_uris() if table is not None else []
        self._datasets.pop(name, None)
        if not files:
            self._con.register("_empty_arrow", TABLES[name].schema.empty_table())
            self._con.execute(f'CREATE OR REPLACE TABLE "_empty_{name}" AS SELECT * FROM _empty_arrow')
            self._con.unregister("_empty_arrow")
            source = f'"_empty_{name}"'
        elif self.lake.is_local:
            union = ", union_by_name=true" if TABLES[name].evolving else ""  # files of older schemas
            source = "read_parquet([" + ", ".join(_sql_string(f) for f in files) + f"]{union})"
        else:
            # Arrow scans are connection-local: no view, every cursor registers it (see _cursor).
            self._con.execute(f'DROP VIEW IF EXISTS "{name}"')
            self._datasets[name] = table.to_pyarrow_dataset()
            return
        self._con.execute(f'CREATE OR REPLACE VIEW "{name}" AS SELECT * FROM {source}')

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        self.refresh()
        with self._lock:
            assert self._con is not None
            cur = self._con.cursor()
            datasets = dict(self._datasets)
        for name, dataset in datasets.items():
            cur.register(name, dataset)
        return cur

    def _sql_sandbox(self) -> SqlSandbox:
        with self._lock:
            self._ensure_open()
            now = time.monotonic()
            if self._sandbox is None:
                self._sandbox = SqlSandbox(self.lake, self.settings)
                self._sandbox_checked_at = now
            elif now - self._sandbox_checked_at >= self.settings.refresh_s:
                self._sandbox.refresh()
                self._sandbox_checked_at = now
            return self._sandbox

    # -- what routes call --------------------------------------------------------------------

    def versions(self) -> dict[str, int | None]:
        """Every catalog table's current Delta version (``None``: not created yet)."""
        return self.refresh()

    def image(self, image_id: str) -> dict[str, Any]:
        """The ``images`` row of ``image_id`` plus ``uris`` (every path it was seen at) and ``metadata``
        (its imported metadata columns that have a value; ``{}`` when none).

        Raises:
            BadInput: ``image_id`` is not 64 lowercase hex characters.
            NotFound: no such image in the lake.
        """
        check_image_id(image_id)
        versions = self.refresh()
        key = tuple(versions.get(t) for t in _IMAGE_TABLES)
        cached = self._images.get(image_id, key)
        if cached is not None:
            return cached
        cur = self._cursor()
        try:
            cur.execute("SELECT * FROM images WHERE image_id = ? LIMIT 1", [image_id])
            row = cur.fetchone()
            if row is None:
                raise NotFound(f"no image {image_id} in the lake; ids are sha256 of the image bytes")
            image = dict(zip([d[0] for d in cur.description], row))
            cur.execute("SELECT DISTINCT uri FROM sources WHERE image_id = ?", [image_id])
            image["uris"] = sorted({uri for (uri,) in cur.fetchall()} | {image["uri"]})
            rows = cur.sql("SELECT * EXCLUDE (image_id) FROM metadata WHERE image_id = ? LIMIT 1",
                           params=[image_id]).to_arrow_table().to_pylist()
            image["metadata"] = {k: v for k, v in rows[0].items() if v is not None} if rows else {}
            image.update(_signals(cur, image_id))
        finally:
            cur.close()
        self._images.put(image_id, key, image)
        return dict(image)

    def select(self, sql: str, params: list | None = None) -> list[dict[str, Any]]:
        """Rows of a trusted query (server-written SQL, values bound as ``?``) over the served views."""
        cur = self._cursor()
        try:
            return cur.sql(sql, params=params or []).to_arrow_table().to_pylist()
        finally:
            cur.close()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor over the served views for trusted queries; the caller closes it."""
        return self._cursor()

    def facets(self, column: str, *, limit: int = 50, where: Any = None) -> dict[str, Any]:
        """Image counts per value of an images or metadata column (see :func:`lake.metadata_filter.facet_counts`).

        Raises:
            NotFound: an unknown column. BadInput: a bad limit or ``where`` filter.
        """
        cur = self._cursor()
        try:
            return facet_counts(cur, column, limit=limit, filter=where)
        finally:
            cur.close()

    def matching_seqs(self, where: Any) -> np.ndarray:
        """``seq`` of the images matching a metadata filter (:mod:`lake.metadata_filter`), sorted.

        Raises:
            BadInput: a bad filter.
        """
        cur = self._cursor()
        try:
            return matching_seqs(cur, where)
        finally:
            cur.close()

    def browse(self, *, limit: int = 60, offset: int = 0, collection: str | None = None) -> dict[str, Any]:
        """A page of images in ``seq`` order (optionally one collection), the total, and per-collection
        counts: a keyset page over the per-version seq index (:mod:`api.browse_index`), no full scan."""
        version = self.refresh().get("images")
        cur = self._cursor()
        try:
            index = self._browse_index.get(version, cur)
            seqs = index.page(offset, limit, collection)
            page = []
            if len(seqs):
                where, params = ("AND collection = ?", [collection]) if collection else ("", [])
                cur.execute(f"SELECT image_id, seq, collection, format, width, height FROM images "
                            f"WHERE seq BETWEEN ? AND ? {where} ORDER BY seq LIMIT ?",
                            [int(seqs[0]), int(seqs[-1]), *params, limit])
                cols = [d[0] for d in cur.description]
                page = [dict(zip(cols, row)) for row in cur.fetchall()]
        finally:
            cur.close()
        counts = {(c or None): n for c, n in index.counts.items()}
        return {"images": page, "total": index.total(collection), "collections": counts}

    def thumbnail(self, image_id: str, size: int) -> bytes:
        """The JPEG thumbnail of ``image_id`` whose longest side is ``size`` px.

        Raises:
            BadInput: a malformed id or a size not in ``settings.thumbnail_sizes``.
            NotFound: no such thumbnail.
        """
        check_image_id(image_id)
        self.check_thumbnail_size(size)
        cached = self._thumbs.get((image_id, size))
        if cached is not None:
            return cached
        with store_errors(self.lake):
            jpeg = self.thumbnail_index().get(image_id, size)
        if jpeg is None:
            raise NotFound(f"no {size}px thumbnail of image {image_id} in the lake")
        self._thumbs.put((image_id, size), jpeg)
        return jpeg

    def thumbnail_index(self) -> ThumbnailIndex:
        """The point-lookup index over the thumbnails table's current files (new files added on a
        new version; built on first use, or by :func:`api.warm_up` when the worker starts)."""
        version = self.refresh().get("thumbnails")
        if version is not None and self._thumb_index_version != version:
            with self._lock:
                table = self._tables.get("thumbnails")
                files = table.file_uris() if table is not None and table.version() == version else None
            if files is not None:
                self._thumb_index.update(files)  # its own lock: other reads go on meanwhile
                self._thumb_index_version = version
        return self._thumb_index

    def existing_image_ids(self, image_ids: list[str]) -> set[str]:
        """Which of ``image_ids`` (validated sha256 hex) are in ``images``. The ids go in as an
        IN-list of literals so DuckDB prunes row groups by the sorted ``image_id`` column."""
        for image_id in image_ids:
            check_image_id(image_id)
        if not image_ids:
            return set()
        cur = self._cursor()
        try:
            listed = ", ".join(_sql_string(i) for i in sorted(set(image_ids)))
            cur.execute(f"SELECT image_id FROM images WHERE image_id IN ({listed})")
            return {row[0] for row in cur.fetchall()}
        finally:
            cur.close()

    def check_thumbnail_size(self, size: int) -> int:
        sizes = tuple(self.settings.thumbnail_sizes)
        if size not in sizes:
            raise BadInput(f"thumbnail size {size} is not made; use one of {', '.join(map(str, sizes))}")
        return size

    def query(self, sql: str, *, max_rows: int | None = None, as_json: bool = False) -> QueryResult:
        """Run untrusted SQL in the sandbox (read-only, single statement, time-, row- and byte-limited;
        ``as_json`` also encodes the rows inside those limits, see :meth:`SqlSandbox.query`).

        Raises:
            BadInput: forbidden or invalid SQL; QueryTimeout (a BadInput) when it runs too long.
            TooLarge: the result is over ``sql_max_bytes``.
        """
        return self._sql_sandbox().query(sql, max_rows=max_rows, as_json=as_json)

    def refresh_sql(self) -> None:
        """Make the next :meth:`query` see every commit made so far (read-your-writes after this
        process wrote), without waiting for ``refresh_s``."""
        self._sql_sandbox().refresh(force=True)

    def close(self) -> None:
        """Close this process's connection and sandbox; a later call opens them again."""
        with self._lock:
            if not self._owner.release():
                return
            if self._sandbox is not None:
                self._sandbox.close()
            if self._con is not None:
                self._con.close()
            self._con, self._sandbox = None, None
            self._tables, self._versions, self._view_versions, self._datasets = {}, {}, {}, {}


def _signals(cur: duckdb.DuckDBPyConnection, image_id: str) -> dict[str, Any]:
    """``capture`` (its fields with a value, issues included; ``{}`` when none) and ``quality`` (the
    ``image_quality`` measures and flags; null before the quality step ran) of one image."""
    out: dict[str, Any] = {}
    for key, table, drop in (("capture", "capture", "image_id, run_id, created_at"),
                             ("quality", "image_quality", "image_id, run_id, created_at")):
        rows = cur.sql(f"SELECT * EXCLUDE ({drop}) FROM {table} WHERE image_id = ? LIMIT 1",
                       params=[image_id]).to_arrow_table().to_pylist()
        if key == "capture":
            out[key] = {k: v for k, v in rows[0].items() if v not in (None, [])} if rows else {}
        else:
            out[key] = rows[0] if rows else None
    return out


class ImageCache:
    """A thread-safe LRU of ``image()`` answers, each valid for the table versions it was read at.

    An entry read at other versions than the caller's counts as a miss (and is replaced), so a
    commit to any of those tables is seen as soon as the reader picks up its version."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[tuple, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image_id: str, versions: tuple) -> dict[str, Any] | None:
        """A shallow copy of the cached answer read at ``versions``, or None."""
        with self._lock:
            entry = self._items.get(image_id)
            if entry is None or entry[0] != versions:
                return None
            self._items.move_to_end(image_id)
            return dict(entry[1])

    def put(self, image_id: str, versions: tuple, image: dict[str, Any]) -> None:
        with self._lock:
            self._items.pop(image_id, None)
            self._items[image_id] = (versions, image)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)


class ByteLRU:
    """A thread-safe least-recently-used cache of ``bytes`` values bounded by their total size."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: bytes) -> None:
        if len(value) > self.max_bytes // 8:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes += len(value) - (len(old) if old is not None else 0)
            self._items[key] = value
            while self.bytes > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions["imagelake"] = LakeReader(settings)


def lake_reader() -> LakeReader:
    """The current app's reader."""
    return current_app.extensions["imagelake"]
