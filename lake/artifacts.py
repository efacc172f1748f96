"""Small checksummed array artifacts: a folder of ``.npy`` files plus ``manifest.json`` written last.

Used for models that jobs build and servers load (topic-cluster centroids, the learned-tag model).
``manifest.json`` holds the sha256 of every file and the caller's metadata; it is written last and
atomically, so a folder without a manifest is an unfinished build and readers ignore it. Readers
verify every checksum before use. Arrays are stored as ``.npy`` (``allow_pickle=False``): loading a
lake's artifact never runs code.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from lake.errors import CorruptArtifact
from lake.staging import filesystem_for

__all__ = ["ArrayArtifact", "file_sha256", "write_arrays", "read_arrays", "read_manifest", "write_text_atomic",
           "read_text"]


@dataclass(frozen=True)
class ArrayArtifact:
    folder: str
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]


def file_sha256(path: str) -> str:
    """The sha256 (hex) of a local file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def remote_store(uri: str):
    """``(LakeStore, key)`` for an object-store URI (the store rooted at its bucket), else ``None``."""
    if "://" not in uri or uri.startswith("file://"):
        return None
    from lake.store import LakeStore

    scheme, rest = uri.split("://", 1)
    bucket, _, key = rest.partition("/")
    return LakeStore.for_lake(f"{scheme}://{bucket}"), key


def write_text_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` to a temporary name next to ``uri``, then rename it into place (on an object
    store: one PUT through :class:`lake.store.LakeStore`, which is atomic by itself)."""
    remote = remote_store(uri)
    if remote is not None:
        remote[0].write_bytes(remote[1], data)
        return
    fs, path = filesystem_for(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def read_text(uri: str) -> bytes | None:
    """The bytes at ``uri``, or ``None`` when it does not exist.

    Raises:
        StoreUnavailable: (object stores) the store cannot be reached or refuses the credentials.
    """
    remote = remote_store(uri)
    if remote is not None:
        from lake.errors import NotFound

        try:
            return remote[0].read_bytes(remote[1])
        except NotFound:
            return None
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def write_arrays(folder: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> ArrayArtifact:
    """Write ``arrays`` as ``<name>.npy`` under ``folder``, then the manifest (sha256 + ``meta``)."""
    files = {}
    for name, arr in arrays.items():
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        data = buf.getvalue()
        write_text_atomic(f"{folder}/{name}.npy", data)
        files[f"{name}.npy"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest = {"meta": meta, "files": files}
    write_text_atomic(f"{folder}/manifest.json", json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    return ArrayArtifact(folder, meta, dict(arrays))


def read_manifest(folder: str) -> dict[str, Any] | None:
    raw = read_text(f"{folder}/manifest.json")
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise CorruptArtifact(f"{folder}/manifest.json is not valid JSON; rebuild the artifact") from None


def read_arrays(folder: str) -> ArrayArtifact:
    """Load and verify the artifact in ``folder``.

    Raises:
        CorruptArtifact: no manifest (an unfinished build), a missing file, or a checksum mismatch.
    """
    manifest = read_manifest(folder)
    if manifest is None:
        raise CorruptArtifact(f"{folder} has no manifest.json: an unfinished or missing build")
    arrays = {}
    for name, info in manifest["files"].items():
        data = read_text(f"{folder}/{name}")
        if data is None:
            raise CorruptArtifact(f"{folder}/{name} is missing; rebuild the artifact")
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise CorruptArtifact(f"{folder}/{name} does not match its manifest's sha256; rebuild the artifact")
        arrays[name[:-4]] = np.load(io.BytesIO(data), allow_pickle=False)
    return ArrayArtifact(folder, manifest.get("meta", {}), arrays)
