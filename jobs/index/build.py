"""Build folders and their manifests: how an index build sits on disk and how a reader trusts it.

A build lives in ``<lake>/artifacts/index/<build_id>/`` and is immutable once its manifest exists::

    seqs.npy          int64 (n,)      the FAISS ids (images.seq), ascending
    ids.npy           uint8 (n, 32)   the image ids (raw sha256) in the same order
    vectors.npy       float16 (n, d)  L2-normalised embeddings: the exact re-ranking copy
    trained.faiss     the trained, empty index (full builds): incremental shards are encoded with it
    shard-NNNNN.faiss one IVF-PQ (or Flat) index per contiguous range of rows, ids = seq
    manifest.json     written LAST, atomically: sha256 and size of every file above, d, factory,
                      ntotal, faiss version, source features table version, model, plan

An incremental build's folder holds only the vectors embedded since its base build (same files,
no ``trained.faiss``) and its manifest names the base build and the base manifest's sha256.

A folder without a manifest is a build that never finished (a crash, a ``kill -9``): nothing
reads it and the next build's prune removes it. :func:`verify_build` is what every reader calls
before it loads anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

from lake.artifacts import file_sha256
from lake.catalog import Lake
from lake.errors import CorruptArtifact

__all__ = ["Manifest", "MANIFEST", "FORMAT", "builds_root", "build_dir", "build_key", "file_sha256", "write_manifest",
           "read_manifest", "verify_build", "read_manifest_from_store", "verify_build_in_store", "faiss_version",
           "version_tuple"]

MANIFEST = "manifest.json"
FORMAT = 1
_BUILD_ID = re.compile(r"[A-Za-z0-9_.+-]{1,128}")


def builds_root(lake: Lake) -> str:
    return lake.artifacts_dir("index")


def build_dir(lake: Lake, build_id: str) -> str:
    if not _BUILD_ID.fullmatch(build_id):
        raise CorruptArtifact(f"malformed build id {build_id!r}")
    return os.path.join(builds_root(lake), build_id)


def build_key(build_id: str) -> str:
    """The store key of a build's folder (``artifacts/index/<build_id>``)."""
    if not _BUILD_ID.fullmatch(build_id):
        raise CorruptArtifact(f"malformed build id {build_id!r}")
    return f"artifacts/index/{build_id}"


def faiss_version() -> str:
    import faiss

    return faiss.__version__


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest plus where it was read from and its own sha256."""

    folder: str
    data: dict[str, Any]
    sha256: str
    files_at: dict[str, str] | None = None   # name -> local file (verified cache copies, object-store lakes)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def path(self, name: str) -> str:
        if self.files_at is not None and name in self.files_at:
            return self.files_at[name]
        return os.path.join(self.folder, name)


def write_manifest(folder: str, data: dict[str, Any]) -> Manifest:
    """Hash every file named in ``data["files"]``, then write ``manifest.json`` atomically.

    ``data["files"]`` maps file names to ``{}`` (or partial dicts); sha256 and bytes are filled in.
    The write is temp file, fsync, rename, fsync of the folder: a crash leaves either no manifest
    (the build is ignored) or the complete one.
    """
    data = dict(data)
    data["files"] = {name: {**meta, "sha256": file_sha256(os.path.join(folder, name)),
                            "bytes": os.path.getsize(os.path.join(folder, name))}
                     for name, meta in sorted(data["files"].items())}
    for shard in data.get("shards", []):
        shard["sha256"] = data["files"][shard["file"]]["sha256"]
    blob = json.dumps(data, indent=1, sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(folder, MANIFEST))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return Manifest(folder, data, hashlib.sha256(blob).hexdigest())


def _parse_manifest(folder: str, blob: bytes) -> Manifest:
    try:
        data = json.loads(blob)
    except ValueError as e:
        raise CorruptArtifact(f"index build {folder}: unreadable manifest ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CorruptArtifact(f"index build {folder}: the manifest has no file list")
    return Manifest(folder, data, hashlib.sha256(blob).hexdigest())


def read_manifest_from_store(store, prefix: str) -> Manifest:
    """The manifest of the build folder ``prefix`` (a store key such as ``artifacts/index/<id>``).

    Raises:
        CorruptArtifact: missing or unreadable manifest. StoreUnavailable: the store cannot be reached.
    """
    from lake.errors import NotFound

    try:
        blob = store.read_bytes(f"{prefix}/{MANIFEST}")
    except NotFound:
        raise CorruptArtifact(f"index build {prefix} has no manifest (an unfinished build)") from None
    return _parse_manifest(store.uri(prefix), blob)


def _check_header(manifest: Manifest, folder: str, expected_manifest_sha256: str | None) -> None:
    if expected_manifest_sha256 and manifest.sha256 != expected_manifest_sha256:
        raise CorruptArtifact(f"index build {folder}: manifest sha256 {manifest.sha256[:12]}… differs from the "
                              f"published {expected_manifest_sha256[:12]}…")
    if manifest.get("format") != FORMAT:
        raise CorruptArtifact(f"index build {folder}: manifest format {manifest.get('format')!r}, expected {FORMAT}")
    built_with, running = str(manifest.get("faiss_version", "")), faiss_version()
    if not built_with or version_tuple(built_with)[:2] > version_tuple(running)[:2]:
        raise CorruptArtifact(f"index build {folder} was written by faiss {built_with or '?'}, newer than this "
                              f"process's faiss {running}; upgrade faiss here or rebuild with `imagelake index --rebuild`")


def verify_build_in_store(store, cache, prefix: str, *, expected_manifest_sha256: str | None = None) -> Manifest:
    """:func:`verify_build` for a build in an object store: the manifest is read from the store and
    every file is fetched through ``cache`` (:class:`lake.artifact_cache.ArtifactCache`), which
    checks its size and sha256 while streaming it; the returned manifest's :meth:`Manifest.path`
    names the verified local copies (to memory-map).

    Raises:
        CorruptArtifact: as :func:`verify_build` (a missing file, a size or checksum mismatch).
        StoreUnavailable: the store cannot be reached.
    """
    from lake.errors import NotFound

    manifest = read_manifest_from_store(store, prefix)
    _check_header(manifest, prefix, expected_manifest_sha256)
    files_at = {}
    for name, meta in manifest["files"].items():
        try:
            files_at[name] = cache.path(store, f"{prefix}/{name}", sha256=meta.get("sha256") or "",
                                        size=meta.get("bytes"))
        except NotFound:
            raise CorruptArtifact(f"index build {prefix}: file {name} is missing") from None
        except CorruptArtifact as e:
            raise CorruptArtifact(f"index build {prefix}: file {name}: {e}") from None
    return Manifest(manifest.folder, manifest.data, manifest.sha256, files_at)


def read_manifest(folder: str) -> Manifest:
    """The manifest of ``folder``, parsed but not yet verified.

    Raises:
        CorruptArtifact: missing or unreadable manifest.
    """
    try:
        with open(os.path.join(folder, MANIFEST), "rb") as f:
            blob = f.read()
        data = json.loads(blob)
    except FileNotFoundError:
        raise CorruptArtifact(f"index build {folder} has no manifest (an unfinished build)") from None
    except (OSError, ValueError) as e:
        raise CorruptArtifact(f"index build {folder}: unreadable manifest ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CorruptArtifact(f"index build {folder}: the manifest has no file list")
    return Manifest(folder, data, hashlib.sha256(blob).hexdigest())


def verify_build(folder: str, *, expected_manifest_sha256: str | None = None,
                 checksums: bool = True) -> Manifest:
    """Check a build before anything of it is loaded.

    Checks: the manifest's own sha256 (when the publishing row recorded one), its format, that it
    was written by a FAISS no newer than this one (newer FAISS may write files this one misreads),
    and every file's size and sha256.

    Raises:
        CorruptArtifact: naming the first check that failed; the caller keeps its previous build.
    """
    manifest = read_manifest(folder)
    _check_header(manifest, folder, expected_manifest_sha256)
    for name, meta in manifest["files"].items():
        path = manifest.path(name)
        try:
            size = os.path.getsize(path)
        except OSError:
            raise CorruptArtifact(f"index build {folder}: file {name} is missing") from None
        if size != meta.get("bytes"):
            raise CorruptArtifact(f"index build {folder}: file {name} has {size} bytes, the manifest says "
                                  f"{meta.get('bytes')} (truncated or replaced)")
        if checksums and file_sha256(path) != meta.get("sha256"):
            raise CorruptArtifact(f"index build {folder}: file {name} does not match its sha256 (corrupt)")
    return manifest


def verified_manifests(lake, row: dict, settings=None) -> list[Manifest]:
    """The verified manifests of the build of ``row`` (an ``index_builds`` row), its base first
    when it is incremental. On an object-store lake every file is fetched into the local artifact
    cache and checked against the manifest there; the manifests then name the cached files.

    Raises:
        CorruptArtifact: a file is missing, truncated, altered, or written by a newer FAISS.
    """
    if lake.is_local:
        top = verify_build(os.path.join(lake.artifacts_dir(), row["path"]),
                           expected_manifest_sha256=row.get("manifest_sha256"))
        manifests = [top]
        if top["kind"] == "incremental":
            base = os.path.join(os.path.dirname(top.folder), top["base_build_id"])
            manifests.insert(0, verify_build(base, expected_manifest_sha256=top["base_manifest_sha256"]))
        return manifests
    from lake.artifact_cache import artifact_cache
    from lake.store import LakeStore, store_errors

    store, cache = LakeStore.for_lake(lake), artifact_cache(settings)
    with store_errors(lake):
        top = verify_build_in_store(store, cache, f"artifacts/{row['path']}",
                                    expected_manifest_sha256=row.get("manifest_sha256"))
        manifests = [top]
        if top["kind"] == "incremental":
            manifests.insert(0, verify_build_in_store(store, cache, build_key(top["base_build_id"]),
                                                      expected_manifest_sha256=top["base_manifest_sha256"]))
    return manifests
