"""Point lookups of thumbnails: (image_id, size) -> JPEG bytes by reading one row group.

``SELECT jpeg FROM thumbnails WHERE image_id = ?`` has to open a row group in every data file,
because each ingest partition covers the whole (random, sha256) id range: 11 ms a lookup at 70k
images in 18 files, and it grows with the number of files. This index keeps, per process, the
64-bit id prefix of every thumbnail row, sorted, with the row's (file, row group, row, size); a
lookup is a binary search and one row group read of the ``image_id`` and ``jpeg`` columns
(measured 0.35 ms at 70k, tests/bench/bench_dashboard.py).

Data files are immutable, so a new table version only adds the new files to the index; when a
file it knows has gone (compaction, vacuum) it starts over. Memory: 24 bytes per thumbnail row
(≈ 48 MB per process at 1M images with two sizes); building reads just the two small key columns
(0.13 s for 140k rows on 2 cores).

Shared between processes: given an ``artifact_dir`` (the API passes ``artifacts/thumbnail_index/``
of a local lake), the arrays of each set of data files are written once as ``keys.npy``,
``where.npy`` and ``files.json`` (last: the folder is complete once it is there) into a folder
named by the sha256 of the file list, renamed into place atomically, and every process memory-maps
them read-only: the first worker to see a new version builds and writes it, the others (and later
restarts) map what is there, so N workers hold one copy in the page cache instead of N private
ones. Only the newest ``keep`` folders are kept (a removed folder stays readable by processes that
mapped it). Without ``artifact_dir`` (object-store lakes) the arrays are private, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lake.store import arrow_filesystem

__all__ = ["ThumbnailIndex", "id_prefixes"]

_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def id_prefixes(ids: pa.Array) -> np.ndarray:
    """The first 16 hex digits of each id as a uint64 (ids shorter than 16 characters map to 0)."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if not pa.types.is_large_string(ids.type):
        ids = ids.cast(pa.large_string())
    n = len(ids)
    if n == 0:
        return np.empty(0, np.uint64)
    offsets = np.frombuffer(ids.buffers()[1], np.int64)[ids.offset:ids.offset + n + 1]
    data = np.frombuffer(ids.buffers()[2], np.uint8)
    ok = (offsets[1:] - offsets[:-1]) >= 16
    starts = np.where(ok, offsets[:-1], 0)
    nibbles = _HEX[data[starts[:, None] + np.arange(16)]].astype(np.uint64)
    nibbles[~ok] = 0
    out = np.zeros(n, np.uint64)
    for j in range(16):
        out = (out << np.uint64(4)) | nibbles[:, j]
    return out


class ThumbnailIndex:
    """Thread-safe. :meth:`update` with the table's current data files, then :meth:`get`."""

    def __init__(self, max_open_footers: int = 4096, artifact_dir: str | None = None, keep: int = 3):
        self._artifact_dir = artifact_dir
        self._keep = max(1, keep)
        self.mapped: str | None = None  # the artifact folder the arrays are mapped from, if any
        self._lock = threading.Lock()
        self._files: list[str] = []
        self._known: set[str] = set()
        self._keys = np.empty(0, np.uint64)
        self._where = np.empty((0, 4), np.int32)  # file index, row group, row in group, size
        self._footers: OrderedDict[str, pq.FileMetaData] = OrderedDict()
        self._max_footers = max_open_footers

    def __len__(self) -> int:
        return len(self._keys)

    def update(self, files: Sequence[str]) -> int:
        """Index the files not seen yet (all of them when one it knew is gone); returns rows added."""
        with self._lock:
            files = list(files)
            if not self._known.issubset(files):
                self._files, self._known = [], set()
                self._keys, self._where = np.empty(0, np.uint64), np.empty((0, 4), np.int32)
                self._footers.clear()
            new = [f for f in files if f not in self._known]
            if not new:
                return 0
            had = len(self._keys)
            if self._artifact_dir and self._load(files):
                return len(self._keys) - had
            keys, where = [self._keys], [self._where]
            for path in new:
                k, w = self._index_file(path, len(self._files))
                keys.append(k)
                where.append(w)
                self._files.append(path)
                self._known.add(path)
            keys_all, where_all = np.concatenate(keys), np.concatenate(where)
            order = np.argsort(keys_all, kind="stable")
            self._keys, self._where = keys_all[order], where_all[order]
            added = sum(len(k) for k in keys[1:])
            if self._artifact_dir:
                self._save()
            return added

    # -- the shared artifact -------------------------------------------------------------------

    def _folder(self, files: Sequence[str]) -> str:
        digest = hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()[:24]
        return os.path.join(self._artifact_dir, digest)

    def _load(self, files: Sequence[str]) -> bool:
        """Map the artifact of exactly ``files`` if one is complete; False if there is none."""
        folder = self._folder(files)
        try:
            with open(os.path.join(folder, "files.json"), encoding="utf-8") as fh:
                listed = json.load(fh)
            keys = np.load(os.path.join(folder, "keys.npy"), mmap_mode="r")
            where = np.load(os.path.join(folder, "where.npy"), mmap_mode="r")
        except (OSError, ValueError):
            return False
        if sorted(listed) != sorted(files) or len(keys) != len(where) or where.shape[1:] != (4,):
            return False
        self._files, self._known = list(listed), set(listed)
        self._keys, self._where = keys, where
        self._footers.clear()
        self.mapped = folder
        return True

    def _save(self) -> None:
        """Write the current arrays as the artifact of the current files, then map them (best effort:
        a read-only or full disk leaves the private arrays in use)."""
        folder = self._folder(self._files)
        try:
            os.makedirs(self._artifact_dir, exist_ok=True)
            if not os.path.exists(os.path.join(folder, "files.json")):
                tmp = tempfile.mkdtemp(prefix=".tmp-", dir=self._artifact_dir)
                np.save(os.path.join(tmp, "keys.npy"), np.ascontiguousarray(self._keys))
                np.save(os.path.join(tmp, "where.npy"), np.ascontiguousarray(self._where))
                with open(os.path.join(tmp, "files.json"), "w", encoding="utf-8") as fh:
                    json.dump(self._files, fh)
                try:
                    os.rename(tmp, folder)
                except OSError:  # another process published the same folder first: use theirs
                    shutil.rmtree(tmp, ignore_errors=True)
            self._load(self._files)
            self._prune(folder)
        except OSError:
            return

    def _prune(self, current: str) -> None:
        try:
            entries = [os.path.join(self._artifact_dir, e) for e in os.listdir(self._artifact_dir)]
        except OSError:
            return
        done = sorted((e for e in entries if os.path.exists(os.path.join(e, "files.json"))),
                      key=os.path.getmtime, reverse=True)
        for old in [e for e in done if e != current][self._keep - 1:]:
            shutil.rmtree(old, ignore_errors=True)

    def _open(self, path: str, footer: pq.FileMetaData | None = None) -> pq.ParquetFile:
        fs, inner = arrow_filesystem(path)  # object stores: short timeouts, few retries
        return pq.ParquetFile(fs.open_input_file(inner), metadata=footer)

    def _footer(self, path: str) -> pq.FileMetaData:
        footer = self._footers.get(path)
        if footer is None:
            footer = self._open(path).metadata
            self._footers[path] = footer
            while len(self._footers) > self._max_footers:
                self._footers.popitem(last=False)
        else:
            self._footers.move_to_end(path)
        return footer

    def _index_file(self, path: str, file_no: int) -> tuple[np.ndarray, np.ndarray]:
        pf = self._open(path)
        self._footers[path] = pf.metadata
        keys, where = [], []
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg, columns=["image_id", "size"])
            n = t.num_rows
            keys.append(id_prefixes(t.column("image_id")))
            w = np.empty((n, 4), np.int32)
            w[:, 0], w[:, 1], w[:, 2] = file_no, rg, np.arange(n, dtype=np.int32)
            w[:, 3] = t.column("size").to_numpy(zero_copy_only=False)
            where.append(w)
        if not keys:
            return np.empty(0, np.uint64), np.empty((0, 4), np.int32)
        return np.concatenate(keys), np.concatenate(where)

    def get(self, image_id: str, size: int) -> bytes | None:
        """The JPEG, or None when the indexed files hold no such thumbnail."""
        key = id_prefixes(pa.array([image_id]))[0]
        with self._lock:
            lo, hi = np.searchsorted(self._keys, key), np.searchsorted(self._keys, key, side="right")
            candidates = [(self._files[w[0]], int(w[1]), int(w[2])) for w in self._where[lo:hi] if w[3] == size]
            footers = {path: self._footer(path) for path, _, _ in candidates}
        for path, rg, row in candidates:
            t = (_read_remote(path, footers[path], rg, ["image_id", "jpeg"]) if "://" in path
                 else self._open(path, footers[path]).read_row_group(rg, columns=["image_id", "jpeg"]))
            if t.column("image_id")[row].as_py() == image_id:
                jpeg = t.column("jpeg")[row].as_py()
                return None if jpeg is None else bytes(jpeg)
        return None


def _read_remote(uri: str, footer: pq.FileMetaData, rg: int, columns: list[str]) -> pa.Table:
    """Row group ``rg``'s ``columns`` of an object-store file in one ranged GET of the bytes the
    footer says they span (opening the file through pyarrow costs a HEAD first: a third of an
    uncached thumbnail's time on an object store)."""
    from lake.staging import remote_store

    meta = footer.row_group(rg)
    names = [meta.column(j).path_in_schema for j in range(meta.num_columns)]
    spans = []
    for name in columns:
        c = meta.column(names.index(name))
        first = c.dictionary_page_offset if c.has_dictionary_page and c.dictionary_page_offset else c.data_page_offset
        spans.append((first, first + c.total_compressed_size))
    start, end = min(a for a, _ in spans), max(b for _, b in spans)
    store, key = remote_store(uri)
    window = _Window(store.read_range(key, start, end), start)
    return pq.ParquetFile(pa.PythonFile(window, mode="r"), metadata=footer, pre_buffer=False).read_row_group(
        rg, columns=columns)


class _Window:
    """A read-only file over bytes ``[start, start + len(data))`` of a larger file; reads outside it
    fail (the footer said where the columns are)."""

    closed = False

    def __init__(self, data: bytes, start: int):
        self._data, self._start, self._pos = data, start, start

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else self._pos + pos if whence == 1 else self._start + len(self._data) + pos
        return self._pos

    def read(self, n: int = -1) -> bytes:
        lo = self._pos - self._start
        if lo < 0 or (n > 0 and lo + n > len(self._data)):
            raise OSError(f"read of {n} bytes at {self._pos} outside the fetched range")
        out = self._data[lo:] if n < 0 else self._data[lo:lo + n]
        self._pos += len(out)
        return out

    def close(self) -> None:
        pass
