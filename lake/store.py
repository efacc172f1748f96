"""The one storage layer: every byte the lake holds outside Delta's own writer goes through here.

A :class:`LakeStore` addresses objects by *key*, a ``/``-separated path relative to the lake root
(``_locks/pipeline.lease``, ``artifacts/index/<build>/manifest.json``). Local lakes and object
stores behave the same:

* ``write_bytes`` is atomic: readers see the old object or the new one, never a torn one (a
  temporary file renamed into place locally; one PUT on an object store).
* ``put_if_absent`` and ``put_if_match`` are the conditional writes that coordination is built on
  (``lake.lease``). On S3 they are ``If-None-Match: *`` and ``If-Match: <etag>``, which AWS S3 and
  S3-compatible stores enforce; locally they are ``link(2)`` (fails if the name exists) and a
  compare-then-rename under a short ``flock`` of the object's directory.
* Every remote call has a connect timeout, a per-request timeout and bounded retries, so a dead
  endpoint fails within seconds instead of hanging; its failure is one :class:`StoreUnavailable`
  line (wrong credentials, missing bucket, unreachable endpoint) that the CLI and the API report
  like any other lake error (the classification lives in :mod:`lake.store_errors`; its names are
  importable from here too).

Object stores are reached with ``obstore`` (Rust ``object_store``), configured by the same
``AWS_*`` / ``GOOGLE_*`` / ``AZURE_*`` environment variables deltalake reads, plus the
``storage_options`` setting (:mod:`lake.remote`, passed in deltalake's spelling: ``AWS_ENDPOINT_URL``,
``AWS_ALLOW_HTTP``, ...), so one configuration serves the tables and everything else.

obstore's runtime threads do not survive ``fork``: a process forked after its parent made a remote
call would hang on its first one, so it gets a clear error instead (start such processes with
``spawn``, or fork before the first remote call, as pyspark's worker daemon does).

Local etags are ``<inode>-<mtime_ns>-<size>``: every write makes a new inode, so an etag names one
version of the object. Remote etags are the store's own.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator, Mapping

from lake.errors import BadInput, NotFound
from lake.remote import arrow_filesystem, delta_storage_options, open_delta, resolved_options
from lake.store_errors import StoreUnavailable, as_store_unavailable, first_line, store_errors, translate

__all__ = ["LakeStore", "ObjectInfo", "StoreUnavailable", "StoreTimeouts", "delta_storage_options", "open_delta",
           "as_store_unavailable", "store_errors", "arrow_filesystem"]


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    mtime: datetime


@dataclass(frozen=True)
class StoreTimeouts:
    """Limits on every remote call. The defaults bound a dead or stalled endpoint to well under a
    minute per call while leaving room for large artifacts (``request_s`` covers the whole body)."""

    connect_s: float = 5.0
    request_s: float = 300.0
    read_s: float = 15.0
    retries: int = 3
    retry_total_s: float = 20.0


_TMP = re.compile(r"^\..*\.tmp-[0-9a-f]{32}$")
# deltalake options with no meaning for obstore (its locking and rename switches).
_DELTA_ONLY = {"aws_s3_allow_unsafe_rename", "aws_s3_locking_provider", "aws_copy_if_not_exists",
               "dynamo_endpoint", "delta_dynamo_table_name", "aws_force_credential_load"}
_CLIENT_KEYS = {"allow_http", "allow_invalid_certificates", "proxy_url", "proxy_excludes", "user_agent",
                "timeout", "connect_timeout", "read_timeout", "pool_idle_timeout", "http1_only", "http2_only"}


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise BadInput(f"bad object key {key!r}: use a relative path like 'artifacts/x/manifest.json'")
    return key


class LakeStore:
    """Bytes under one lake root. Build it with :meth:`for_lake` (cached per process) or directly.

    Thread-safe; one instance per process is enough. Not shared across ``fork``: :meth:`for_lake`
    keys its cache by pid so a forked worker builds its own client.
    """

    def __init__(self, root: str, storage_options: Mapping[str, str] | None = None,
                 timeouts: StoreTimeouts | None = None):
        self.root = root.rstrip("/") or "/"
        self.timeouts = timeouts or StoreTimeouts()
        self.is_local = "://" not in self.root
        if self.root.startswith("file://"):
            self.root, self.is_local = self.root[len("file://"):] or "/", True
        self._remote = None if self.is_local else _open_remote(
            self.root, resolved_options() if storage_options is None else storage_options, self.timeouts)

    @classmethod
    def for_lake(cls, lake: Any, storage_options: Mapping[str, str] | None = None) -> "LakeStore":
        """The store of ``lake`` (a :class:`lake.catalog.Lake` or a root string), one per process."""
        root = getattr(lake, "root", lake)
        if storage_options is None and "://" in str(root):
            storage_options = resolved_options()  # the settings' storage_options (lake.remote)
        opts = tuple(sorted((storage_options or {}).items()))
        return _cached(str(root), opts, os.getpid())

    def __repr__(self) -> str:
        return f"LakeStore({self.root!r})"

    def uri(self, key: str) -> str:
        return f"{self.root}/{_check_key(key)}"

    def local_path(self, key: str) -> str | None:
        """The file behind ``key`` on a local lake (to memory-map it); ``None`` on an object store."""
        return self.uri(key) if self.is_local else None

    # -- reads ---------------------------------------------------------------------------------

    def read_bytes(self, key: str) -> bytes:
        """Raises: NotFound: no object ``key``."""
        return self.read(key)[0]

    def read(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and the etag of exactly that version. Raises NotFound."""
        _check_key(key)
        if self.is_local:
            path = self.uri(key)
            try:
                with open(path, "rb") as f:
                    return f.read(), _etag(os.fstat(f.fileno()))
            except (FileNotFoundError, NotADirectoryError):
                raise NotFound(f"no object {key!r} in the lake at {self.root}") from None
        import obstore

        result = self._call("read", key, obstore.get, self._remote, key)
        return bytes(result.bytes()), result.meta["e_tag"] or ""

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``key`` (one ranged GET on an object store). Raises NotFound."""
        _check_key(key)
        if end <= start:
            return b""
        if self.is_local:
            try:
                with open(self.uri(key), "rb") as f:
                    f.seek(start)
                    return f.read(end - start)
            except (FileNotFoundError, NotADirectoryError):
                raise NotFound(f"no object {key!r} in the lake at {self.root}") from None
        import obstore

        return bytes(self._call("read range", key, obstore.get_range, self._remote, key, start=start, end=end))

    def iter_chunks(self, key: str, chunk_bytes: int = 8 << 20) -> Iterator[bytes]:
        """The object's bytes in chunks (streamed: memory stays at one chunk). Raises NotFound."""
        _check_key(key)
        if self.is_local:
            try:
                f = open(self.uri(key), "rb")
            except (FileNotFoundError, NotADirectoryError):
                raise NotFound(f"no object {key!r} in the lake at {self.root}") from None
            with f:
                while chunk := f.read(chunk_bytes):
                    yield chunk
            return
        import obstore

        result = self._call("read", key, obstore.get, self._remote, key)
        stream = iter(result.stream(min_chunk_size=chunk_bytes))
        while True:
            try:
                chunk = self._call("read", key, next, stream, passthrough=(StopIteration,))
            except StopIteration:
                return
            yield bytes(chunk)

    def head(self, key: str) -> ObjectInfo | None:
        """Size, etag and modification time, or ``None`` when there is no object ``key``."""
        _check_key(key)
        if self.is_local:
            try:
                st = os.stat(self.uri(key))
            except (FileNotFoundError, NotADirectoryError):
                return None
            return _local_info(key, st)
        import obstore

        try:
            meta = self._call("head", key, obstore.head, self._remote, key)
        except NotFound:
            return None
        return _remote_info(meta)

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under ``prefix`` (a folder key; ``""`` for the whole lake), sorted by key."""
        prefix = prefix.strip("/")
        if prefix:
            _check_key(prefix)
        if self.is_local:
            return sorted(self._list_local(prefix), key=lambda o: o.key)
        import obstore

        def run():
            return [_remote_info(m) for batch in obstore.list(self._remote, prefix or None) for m in batch]
        return sorted(self._call("list", prefix or "/", run), key=lambda o: o.key)

    def _list_local(self, prefix: str) -> Iterator[ObjectInfo]:
        top = self.uri(prefix) if prefix else self.root
        if os.path.isfile(top):
            yield _local_info(prefix, os.stat(top))
            return
        for dirpath, dirs, files in os.walk(top):
            dirs.sort()
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in files:
                if _TMP.match(name):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue  # removed while walking
                yield _local_info(name if rel == "." else f"{rel}/{name}", st)

    # -- writes --------------------------------------------------------------------------------

    def write_bytes(self, key: str, data: bytes) -> str:
        """Atomically (re)place ``key`` with ``data``; returns the new etag."""
        _check_key(key)
        if self.is_local:
            tmp, etag = self._write_tmp(key, data)
            os.replace(tmp, self.uri(key))
            return etag
        import obstore

        return self._call("write", key, obstore.put, self._remote, key, data)["e_tag"] or ""

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create ``key`` only if no object has that name; its etag, or ``None`` when one exists."""
        _check_key(key)
        if self.is_local:
            tmp, etag = self._write_tmp(key, data)
            try:
                os.link(tmp, self.uri(key))
                return etag
            except FileExistsError:
                return None
            finally:
                os.unlink(tmp)
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            return self._call("create", key, obstore.put, self._remote, key, data, mode="create",
                              passthrough=(AlreadyExistsError, PreconditionError))["e_tag"] or ""
        except (AlreadyExistsError, PreconditionError):
            return None

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace ``key`` only if its current version has ``etag``; the new etag, or ``None`` when
        the object changed or is gone (someone else wrote it since it was read)."""
        _check_key(key)
        if self.is_local:
            with self._dir_locked(key):
                st = _stat_or_none(self.uri(key))
                if st is None or _etag(st) != etag:
                    return None
                tmp, new = self._write_tmp(key, data)
                os.replace(tmp, self.uri(key))
                return new
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            return self._call("update", key, obstore.put, self._remote, key, data, mode={"e_tag": etag},
                              passthrough=(PreconditionError, AlreadyExistsError, FileNotFoundError))["e_tag"] or ""
        except (PreconditionError, AlreadyExistsError, FileNotFoundError):
            return None

    def delete(self, key: str) -> bool:
        """Remove ``key``; ``False`` when there was nothing to remove."""
        _check_key(key)
        if self.is_local:
            try:
                os.unlink(self.uri(key))
                return True
            except FileNotFoundError:
                return False
        import obstore

        if self.head(key) is None:  # S3 answers DELETE of a missing key with success
            return False
        self._call("delete", key, obstore.delete, self._remote, key)
        return True

    def upload(self, key: str, path: str | os.PathLike) -> str:
        """Atomically place the local file ``path`` at ``key`` (streamed; multipart when large)."""
        _check_key(key)
        if self.is_local:
            with open(path, "rb") as f:
                return self.write_bytes(key, f.read())
        import obstore
        from pathlib import Path

        return self._call("upload", key, obstore.put, self._remote, key, Path(path))["e_tag"] or ""

    def download(self, key: str, path: str | os.PathLike) -> ObjectInfo:
        """Copy ``key`` to the local file ``path`` (temporary file renamed into place). Raises NotFound."""
        data, etag = self.read(key)
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return ObjectInfo(key, len(data), etag, datetime.now(timezone.utc))

    # -- local helpers -------------------------------------------------------------------------

    def _write_tmp(self, key: str, data: bytes) -> tuple[str, str]:
        final = self.uri(key)
        parent, name = os.path.split(final)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            etag = _etag(os.fstat(f.fileno()))  # the inode keeps it through the rename
        return tmp, etag

    def _dir_locked(self, key: str):
        """A ``flock`` on the object's directory: local compare-and-swap is only atomic under it.
        Held for one stat and one rename; dropped by the kernel if the process dies."""
        parent = os.path.dirname(self.uri(key))
        os.makedirs(parent, exist_ok=True)
        return Flock(parent)

    # -- remote helpers ------------------------------------------------------------------------

    def _call(self, op: str, key: str, fn, *args, passthrough: tuple = (), **kwargs):
        _check_not_forked()
        try:
            return fn(*args, **kwargs)
        except passthrough:
            raise
        except Exception as e:  # obstore raises its own classes plus FileNotFoundError / ValueError
            raise translate(e, op, key, self.root, self._endpoint()) from None

    def _endpoint(self) -> str:
        try:
            cfg = self._remote.config
        except Exception:  # stores without a config mapping
            return ""
        return str(cfg.get("endpoint") or cfg.get("aws_endpoint") or "")


class Flock:
    """An exclusive ``flock`` held for a ``with`` block on ``path``: a directory (opened read-only) or,
    with ``create=True``, a lock file made when missing (one machine's processes only)."""

    def __init__(self, path: str, create: bool = False):
        self.path = path
        self.create = create

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644) if self.create else os.open(self.path, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)


_REMOTE_PID: int | None = None  # the process that started obstore's runtime


def _check_not_forked() -> None:
    global _REMOTE_PID
    if _REMOTE_PID is None:
        _REMOTE_PID = os.getpid()
    elif _REMOTE_PID != os.getpid():
        raise StoreUnavailable(
            f"this process was forked from {_REMOTE_PID} after that one used the object store, and the "
            "store client does not survive a fork; start worker processes with multiprocessing 'spawn'")


@functools.lru_cache(maxsize=16)
def _cached(root: str, opts: tuple, pid: int) -> LakeStore:
    return LakeStore(root, dict(opts))


def _etag(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _local_info(key: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(key, st.st_size, _etag(st), datetime.fromtimestamp(st.st_mtime, timezone.utc))


def _remote_info(meta: Mapping[str, Any]) -> ObjectInfo:
    return ObjectInfo(meta["path"], int(meta["size"]), meta.get("e_tag") or "", meta["last_modified"])


def _open_remote(root: str, storage_options: Mapping[str, str], t: StoreTimeouts):
    """An obstore client for ``root``: environment first, ``storage_options`` over it."""
    from obstore.exceptions import BaseError
    from obstore.store import from_url

    _check_not_forked()
    scheme = root.split("://", 1)[0].lower()
    if scheme not in {"s3", "s3a", "gs", "az", "abfs", "abfss", "azure"}:
        raise BadInput(f"lake root {root!r}: the scheme {scheme}:// is not supported; use a local path, "
                       "s3://bucket/prefix, gs://bucket/prefix or az://container/prefix")
    config: dict[str, str] = {}
    client: dict[str, Any] = {"connect_timeout": timedelta(seconds=t.connect_s),
                              "timeout": timedelta(seconds=t.request_s),
                              "read_timeout": timedelta(seconds=t.read_s)}
    env_http = os.environ.get("AWS_ALLOW_HTTP") or os.environ.get("ALLOW_HTTP")
    if env_http:
        client["allow_http"] = env_http.strip().lower() in {"1", "true", "yes", "on"}
    for name, value in storage_options.items():
        low = name.lower()
        bare = low.removeprefix("aws_").removeprefix("google_").removeprefix("azure_")
        if low in _DELTA_ONLY:
            continue
        if bare in _CLIENT_KEYS:
            client[bare] = (str(value).strip().lower() in {"1", "true", "yes", "on"}
                            if bare.startswith("allow_") or bare.endswith("_only") else value)
        else:
            config[low] = str(value)
    if scheme in {"s3", "s3a"}:
        has_cp = any(k in {"aws_conditional_put", "conditional_put"} for k in config) \
            or "AWS_CONDITIONAL_PUT" in os.environ
        if not has_cp:
            config["conditional_put"] = "etag"  # If-Match on update; AWS S3 and MinIO/R2 enforce it
        if not any(k in {"aws_region", "region", "aws_default_region", "default_region"} for k in config) \
                and not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
            config["region"] = "us-east-1"
    retry = {"max_retries": t.retries, "retry_timeout": timedelta(seconds=t.retry_total_s),
             "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2),
                         "base": 2}}
    try:
        return from_url(root, config=config or None, client_options=client, retry_config=retry)
    except BaseError as e:
        raise BadInput(f"lake root {root!r}: bad object-store configuration: {first_line(e)}") from None
    except ValueError as e:
        raise BadInput(f"lake root {root!r}: {first_line(e)}") from None
