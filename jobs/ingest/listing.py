"""Finding the input files: a directory walked recursively, a list file of URIs, or a URI prefix."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
from pyarrow import fs as pafs

from lake.errors import BadInput, NotFound
from lake.staging import filesystem_for

__all__ = ["LISTING_SCHEMA", "list_source", "iter_source", "default_collection", "LISTING_CHUNK_ROWS"]

#: Rows per chunk of :func:`iter_source` (about 10 MB of listing per 65,536 files).
LISTING_CHUNK_ROWS = 65536

LISTING_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("bytes", pa.int64()),
    pa.field("mtime", pa.timestamp("us", tz="UTC")),
])


def default_collection(src: str) -> str:
    """The collection name when none is given: the source folder's (or list file's) name."""
    name = src.rstrip("/").rsplit("/", 1)[-1]
    return Path(name).stem if "." in name and not name.startswith(".") else (name or "default")


def list_source(src: str) -> pa.Table:
    """List ``src`` as rows (uri, bytes, mtime), sorted by uri, hidden files and folders skipped.

    The whole listing in memory; :func:`iter_source` streams it in bounded chunks instead.
    Raises: as :func:`iter_source`.
    """
    chunks = list(iter_source(src))
    if not chunks:
        return LISTING_SCHEMA.empty_table()
    return pa.concat_tables(chunks).sort_by("uri")


def iter_source(src: str, chunk_rows: int = LISTING_CHUNK_ROWS) -> Iterator[pa.Table]:
    """List ``src`` as tables of at most ``chunk_rows`` rows (uri, bytes, mtime), in no set order,
    hidden files and folders skipped. ``src`` is checked before the first chunk is made.

    ``src`` is a local directory, a local text file with one path or URI per line (``#`` comments
    allowed), or a URI prefix (``s3://bucket/prefix``) any pyarrow filesystem can list.

    Raises:
        NotFound: ``src`` does not exist.
        BadInput: ``src`` is neither a folder, a list file nor a listable URI.
    """
    if "://" in src and not src.startswith("file://"):
        entries = _list_uri_prefix(src)
    else:
        path = Path(src.removeprefix("file://")).expanduser()
        if path.is_dir():
            entries = _list_dir(path.absolute())
        elif path.is_file():
            entries = _list_file(path)
        else:
            raise NotFound(f"--images {src!r}: no such folder or list file")
    return _chunked(entries, chunk_rows)


def _chunked(entries: Iterator[tuple], chunk_rows: int) -> Iterator[pa.Table]:
    uris, sizes, mtimes = [], [], []
    for uri, size, mtime in entries:
        uris.append(uri)
        sizes.append(size)
        mtimes.append(mtime)
        if len(uris) >= chunk_rows:
            yield _table(uris, sizes, mtimes)
            uris, sizes, mtimes = [], [], []
    if uris:
        yield _table(uris, sizes, mtimes)


def _list_dir(root: Path) -> Iterator[tuple]:
    stack = [str(root)]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file():
                    st = e.stat()
                    yield e.path, st.st_size, st.st_mtime_ns // 1000
            except OSError:
                continue


def _list_file(path: Path) -> Iterator[tuple]:
    """Reads the list at once (so a bad file fails here); stats its entries lazily."""
    base = path.absolute().parent
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise BadInput(f"--images {str(path)!r} is a file but not a text list of paths; "
                       "pass a folder, or a file with one path or URI per line") from None
    return _list_lines(lines, base)


def _list_lines(lines: list[str], base: Path) -> Iterator[tuple]:
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "://" in line and not line.startswith("file://"):
            fs, inner = filesystem_for(line)  # s3:// with the settings' storage_options
            f = fs.get_file_info(inner)
            yield (line, f.size if f.type == pafs.FileType.File else None,
                   int(f.mtime.timestamp() * 1e6) if f.mtime else None)
            continue
        p = Path(line.removeprefix("file://")).expanduser()
        p = p if p.is_absolute() else base / p
        try:
            st = p.stat()
            yield str(p), st.st_size, st.st_mtime_ns // 1000
        except OSError:
            yield str(p), None, None


def _list_uri_prefix(src: str) -> Iterator[tuple]:
    try:
        fs, prefix = filesystem_for(src)
        infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    except (OSError, ValueError) as e:
        raise BadInput(f"--images {src!r} cannot be listed: {e}") from None
    scheme = src.split("://", 1)[0]
    return ((f"{scheme}://{f.path}", f.size, int(f.mtime.timestamp() * 1e6) if f.mtime else None)
            for f in infos
            if f.type == pafs.FileType.File and not any(part.startswith(".") for part in f.path.split("/")))


def _table(uris, sizes, mtimes) -> pa.Table:
    return pa.table({"uri": pa.array(uris, pa.string()), "bytes": pa.array(sizes, pa.int64()),
                     "mtime": pa.array(mtimes, pa.int64()).cast(pa.timestamp("us", tz="UTC"))},
                    schema=LISTING_SCHEMA)

