"""Finding the input files: a directory walked recursively, a list file of URIs, or a URI prefix."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
from pyarrow import fs as pafs

from lake.errors import BadInput, NotFound

__all__ = ["LISTING_SCHEMA", "list_source", "default_collection"]

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

    ``src`` is a local directory, a local text file with one path or URI per line (``#`` comments
    allowed), or a URI prefix (``s3://bucket/prefix``) any pyarrow filesystem can list.

    Raises:
        NotFound: ``src`` does not exist.
        BadInput: ``src`` is neither a folder, a list file nor a listable URI.
    """
    if "://" in src and not src.startswith("file://"):
        return _list_uri_prefix(src)
    path = Path(src.removeprefix("file://")).expanduser()
    if path.is_dir():
        return _list_dir(path.absolute())
    if path.is_file():
        return _list_file(path)
    raise NotFound(f"--images {src!r}: no such folder or list file")


def _list_dir(root: Path) -> pa.Table:
    uris, sizes, mtimes = [], [], []
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
                    uris.append(e.path)
                    sizes.append(st.st_size)
                    mtimes.append(st.st_mtime_ns // 1000)
            except OSError:
                continue
    return _table(uris, sizes, mtimes)


def _list_file(path: Path) -> pa.Table:
    uris, sizes, mtimes = [], [], []
    base = path.absolute().parent
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise BadInput(f"--images {str(path)!r} is a file but not a text list of paths; "
                       "pass a folder, or a file with one path or URI per line") from None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "://" in line and not line.startswith("file://"):
            f = pafs.FileSystem.from_uri(line)[0].get_file_info(pafs.FileSystem.from_uri(line)[1])
            uris.append(line)
            sizes.append(f.size if f.type == pafs.FileType.File else None)
            mtimes.append(int(f.mtime.timestamp() * 1e6) if f.mtime else None)
            continue
        p = Path(line.removeprefix("file://")).expanduser()
        p = p if p.is_absolute() else base / p
        uris.append(str(p))
        try:
            st = p.stat()
            sizes.append(st.st_size)
            mtimes.append(st.st_mtime_ns // 1000)
        except OSError:
            sizes.append(None)
            mtimes.append(None)
    return _table(uris, sizes, mtimes)


def _list_uri_prefix(src: str) -> pa.Table:
    try:
        fs, prefix = pafs.FileSystem.from_uri(src)
        infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    except (OSError, ValueError) as e:
        raise BadInput(f"--images {src!r} cannot be listed: {e}") from None
    scheme = src.split("://", 1)[0]
    uris, sizes, mtimes = [], [], []
    for f in infos:
        if f.type != pafs.FileType.File or any(part.startswith(".") for part in f.path.split("/")):
            continue
        uris.append(f"{scheme}://{f.path}")
        sizes.append(f.size)
        mtimes.append(int(f.mtime.timestamp() * 1e6) if f.mtime else None)
    return _table(uris, sizes, mtimes)


def _table(uris, sizes, mtimes) -> pa.Table:
    t = pa.table({"uri": pa.array(uris, pa.string()), "bytes": pa.array(sizes, pa.int64()),
                  "mtime": pa.array(mtimes, pa.int64()).cast(pa.timestamp("us", tz="UTC"))},
                 schema=LISTING_SCHEMA)
    return t.sort_by("uri")

