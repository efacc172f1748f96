"""A bucket as a dataset at a point of its log: manifests (CSV, JSON, Parquet), a zip of the
originals, folders on disk, and what joined and left between two points.

A *point* is a Delta version of ``bucket_events`` (``version``) or a time (``as_of``, the newest
version committed at or before it); neither means the latest. Membership at a point is the fold
of the log as it was then (:func:`lake.buckets.bucket_state`), so an export of last Tuesday's
bucket is exactly what the curators had placed by then, whatever happened since.

A manifest has one row per member (pending fast-forward images are not members) in the order
they joined, with the columns of :data:`MANIFEST_COLUMNS`: ``image_id``, ``path`` (the original's
uri), ``file_name``, ``collection``, ``width``, ``height``, ``bytes``, ``label`` (the bucket's name
then), ``user_tags`` (the image's user tags now), ``bucket_id``, ``joined_seq`` (the ``seq`` of
the event that made it a member) and ``log_version`` (the Delta version read).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from lake.buckets import BucketState, check_bucket_id, read_events
from lake.catalog import Lake
from lake.commit import open_table
from lake.errors import BadInput, NotFound, TooLarge
from lake.staging import filesystem_for

__all__ = ["FORMATS", "MANIFEST_COLUMNS", "MAX_ZIP_BYTES", "Point", "Snapshot", "bucket_diff", "manifest",
           "manifest_bytes", "parse_point", "snapshot", "write_folder", "zip_chunks"]

FORMATS = ("csv", "json", "parquet", "zip")
MAX_ZIP_BYTES = 1 << 30  # a zip of originals above this is refused (413): use the CLI
MANIFEST_COLUMNS = ("image_id", "path", "file_name", "collection", "width", "height", "bytes", "label",
                    "user_tags", "bucket_id", "joined_seq", "log_version")


@dataclass(frozen=True)
class Point:
    """A point of the log: a Delta version, a time, or (both None) the latest."""

    version: int | None = None
    as_of: dt.datetime | None = None

    def describe(self) -> str:
        if self.version is not None:
            return f"version {self.version}"
        return f"as of {self.as_of.isoformat()}" if self.as_of is not None else "latest"


def parse_point(version: Any = None, as_of: Any = None, *, what: str = "") -> Point:
    """A :class:`Point` from text (query args, CLI flags). Raises BadInput naming the parameter.

    ``what`` prefixes the parameter names in messages (``from``/``to`` of a diff)."""
    label = f"{what} " if what else ""
    if version not in (None, "") and as_of not in (None, ""):
        raise BadInput(f"give {label}version or {label}as_of, not both")
    if version not in (None, ""):
        text = str(version).strip()
        if not re.fullmatch(r"\d{1,18}", text):
            raise BadInput(f"{label}version must be a whole number >= 0 (a Delta version of bucket_events), got {version!r}")
        return Point(version=int(text))
    if as_of not in (None, ""):
        text = str(as_of).strip()
        try:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
        except ValueError:
            raise BadInput(f"{label}as_of must be an ISO 8601 time like 2026-01-31T12:00:00+00:00, got {as_of!r}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        return Point(as_of=when)
    return Point()


def point_arg(text: Any, *, what: str) -> Point:
    """``from=``/``to=`` of a diff: a number is a version, anything else an ISO 8601 time."""
    if text in (None, ""):
        raise BadInput(f"{what} is required: a version of bucket_events (e.g. 3) or an ISO 8601 time")
    text = str(text).strip()
    return parse_point(version=text) if text.isdigit() else parse_point(as_of=text, what=what)


@dataclass
class Snapshot:
    """A bucket's members at a point of the log."""

    bucket: dict[str, Any]
    members: list[tuple[str, int]]  # (image_id, seq of the event that made it a member), joining order
    pending: list[str]
    log_version: int | None
    point: Point


def snapshot(lake: Lake, bucket_id: str, point: Point = Point()) -> Snapshot:
    """The bucket at ``point``. Raises BadInput (malformed id), NotFound (no such version, or the
    bucket did not exist then)."""
    check_bucket_id(bucket_id)
    events, log_version = read_events(lake, point.version, point.as_of)
    state = BucketState()
    for event in events:
        state.apply(event)
    bucket = state.buckets.get(bucket_id)
    if bucket is None:
        when = "now" if log_version is None or point == Point() else f"at version {log_version} ({point.describe()})"
        raise NotFound(f"bucket {bucket_id} did not exist {when}")
    members = [(i, seq) for i, (seq, pending) in state.members.get(bucket_id, {}).items() if not pending]
    return Snapshot(bucket=dict(bucket), members=members, pending=state.member_ids(bucket_id, pending=True),
                    log_version=log_version, point=point)


def manifest(lake: Lake, snap: Snapshot) -> pa.Table:
    """One row per member (columns :data:`MANIFEST_COLUMNS`), in joining order."""
    wanted = pa.table({"image_id": pa.array([m[0] for m in snap.members], pa.string()),
                       "joined_seq": pa.array([m[1] for m in snap.members], pa.int64()),
                       "rank": pa.array(range(len(snap.members)), pa.int64())})
    from jobs.tag.state import user_labels

    tags: dict[str, list[str]] = {}
    if snap.members:
        for image_id, tag in user_labels(lake):
            tags.setdefault(image_id, []).append(tag)
    images = open_table(lake, "images")
    con = duckdb.connect()
    try:
        con.register("wanted", wanted)
        if images.file_uris():
            con.register("images", images.to_pyarrow_dataset())
        else:
            from lake.catalog import TABLES
            con.register("images", TABLES["images"].schema.empty_table())
        rows = con.sql("SELECT w.image_id, i.uri, i.collection, i.width, i.height, i.bytes, w.joined_seq "
                       "FROM wanted w LEFT JOIN images i USING (image_id) ORDER BY w.rank").fetchall()
    finally:
        con.close()
    label = snap.bucket.get("name")
    cols: dict[str, list] = {c: [] for c in MANIFEST_COLUMNS}
    for image_id, uri, collection, width, height, size, seq in rows:
        cols["image_id"].append(image_id)
        cols["path"].append(uri)
        cols["file_name"].append(os.path.basename(uri or "") or None)
        cols["collection"].append(collection)
        cols["width"].append(width)
        cols["height"].append(height)
        cols["bytes"].append(size)
        cols["label"].append(label)
        cols["user_tags"].append(tags.get(image_id, []))
        cols["bucket_id"].append(snap.bucket["bucket_id"])
        cols["joined_seq"].append(seq)
        cols["log_version"].append(snap.log_version)
    schema = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("file_name", pa.string()),
                        ("collection", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                        ("bytes", pa.int64()), ("label", pa.string()), ("user_tags", pa.list_(pa.string())),
                        ("bucket_id", pa.string()), ("joined_seq", pa.int64()), ("log_version", pa.int64())])
    return pa.table(cols, schema=schema)


def manifest_bytes(table: pa.Table, fmt: str) -> bytes:
    """The manifest as a CSV (user_tags joined by ``|``), JSON (``{"rows": [...]}``) or Parquet file."""
    if fmt == "parquet":
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        return sink.getvalue()
    rows = table.to_pylist()
    if fmt == "json":
        return json.dumps({"columns": list(MANIFEST_COLUMNS), "rows": rows}, ensure_ascii=False).encode()
    if fmt == "csv":
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for r in rows:
            writer.writerow(["|".join(r[c]) if c == "user_tags" else ("" if r[c] is None else r[c])
                             for c in MANIFEST_COLUMNS])
        return text.getvalue().encode()
    raise BadInput(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def _read_original(uri: str) -> bytes:
    fs, path = filesystem_for(uri[len("file://"):] if uri.startswith("file://") else uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def _zip_name(rank: int, width: int, file_name: str | None) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", file_name or "image").lstrip(".") or "image"
    return f"{rank:0{width}d}_{safe}"


class _Sink(io.RawIOBase):
    """A write-only stream whose bytes are taken out in chunks (zipfile writes, the response reads)."""

    def __init__(self):
        self.chunks: list[bytes] = []
        self.offset = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.chunks.append(bytes(b))
        self.offset += len(b)
        return len(b)

    def tell(self) -> int:
        return self.offset

    def take(self) -> bytes:
        out, self.chunks = b"".join(self.chunks), []
        return out


def check_zip_size(table: pa.Table, limit: int = MAX_ZIP_BYTES) -> int:
    """Total bytes of the originals; raises TooLarge above ``limit``."""
    total = sum(b or 0 for b in table.column("bytes").to_pylist())
    if total > limit:
        raise TooLarge(f"the bucket's originals are {total / 2**20:.0f} MiB; a zip download is limited to "
                       f"{limit / 2**20:.0f} MiB: download the manifest (format=csv|json|parquet) or run "
                       "imagelake export --bucket ID --format folder")
    return total


def zip_chunks(table: pa.Table) -> Iterator[bytes]:
    """A zip (stored, not recompressed) of the originals plus ``manifest.csv``, produced as it is
    sent. An original that cannot be read is left out and named in ``missing.txt``."""
    sink = _Sink()
    width = max(3, len(str(table.num_rows)))
    missing: list[str] = []
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr("manifest.csv", manifest_bytes(table, "csv"))
        yield sink.take()
        for rank, row in enumerate(table.select(["image_id", "path", "file_name"]).to_pylist()):
            try:
                data = _read_original(row["path"]) if row["path"] else None
            except OSError:
                data = None
            if data is None:
                missing.append(row["image_id"])
                continue
            zf.writestr(_zip_name(rank, width, row["file_name"]), data)
            yield sink.take()
        if missing:
            zf.writestr("missing.txt", "originals that could not be read:\n" + "\n".join(missing) + "\n")
    yield sink.take()


def write_folder(table: pa.Table, to: str, fmt: str) -> dict[str, Any]:
    """Write the export to disk. ``folder``: symlinks ``<rank>_<file>`` to the originals plus
    ``manifest.csv``; ``imagefolder``: ``<label>/<rank>_<file>`` copies and ``metadata.csv``
    (the Hugging Face ``imagefolder`` layout); ``csv``/``parquet``: ``to`` is the manifest file.
    Nothing is overwritten. Returns ``images`` and ``to``."""
    target = Path(to).expanduser().absolute()
    if fmt in ("csv", "parquet"):
        if target.exists():
            raise BadInput(f"{target} exists; export into a new file")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(manifest_bytes(table, fmt))
        return {"images": table.num_rows, "to": str(target)}
    if fmt not in ("folder", "imagefolder"):
        raise BadInput(f"format must be folder, imagefolder, csv or parquet, got {fmt!r}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BadInput(f"{target} exists and is not an empty folder; export into a new folder")
    target.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(table.num_rows)))
    rows = table.to_pylist()
    written = 0
    if fmt == "folder":
        for rank, r in enumerate(rows):
            if not r["path"]:
                continue
            source = r["path"][len("file://"):] if r["path"].startswith("file://") else r["path"]
            os.symlink(source, target / _zip_name(rank, width, r["file_name"]))
            written += 1
        (target / "manifest.csv").write_bytes(manifest_bytes(table, "csv"))
        return {"images": written, "to": str(target)}
    label = re.sub(r"[^\w.-]+", "_", (rows[0]["label"] if rows else "") or "bucket").strip("._") or "bucket"
    (target / label).mkdir()
    meta = io.StringIO()
    writer = csv.writer(meta, lineterminator="\n")
    writer.writerow(["file_name", "label", "image_id", "path", "bucket_id", "joined_seq", "log_version"])
    for rank, r in enumerate(rows):
        try:
            data = _read_original(r["path"]) if r["path"] else None
        except OSError:
            data = None
        if data is None:
            continue
        name = f"{label}/{_zip_name(rank, width, r['file_name'])}"
        (target / name).write_bytes(data)
        writer.writerow([name, r["label"], r["image_id"], r["path"], r["bucket_id"], r["joined_seq"], r["log_version"]])
        written += 1
    (target / "metadata.csv").write_text(meta.getvalue())
    return {"images": written, "to": str(target)}


def bucket_diff(lake: Lake, bucket_id: str, start: Point, end: Point) -> dict[str, Any]:
    """What joined and left ``bucket_id`` between two points (members, not pending ones).

    A bucket that did not exist yet at ``start`` had no members then (all of ``end``'s joined)."""
    check_bucket_id(bucket_id)
    try:
        before = snapshot(lake, bucket_id, start)
        old, from_version = [m for m, _ in before.members], before.log_version
    except NotFound as e:
        if "did not exist" not in str(e):
            raise
        old, from_version = [], read_events(lake, start.version, start.as_of)[1]
    after = snapshot(lake, bucket_id, end)
    new = [m for m, _ in after.members]
    old_set, new_set = set(old), set(new)
    return {"bucket_id": bucket_id, "from_version": from_version, "to_version": after.log_version,
            "joined": [i for i in new if i not in old_set], "left": [i for i in old if i not in new_set],
            "from_count": len(old), "to_count": len(new)}
