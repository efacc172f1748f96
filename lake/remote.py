"""How every client reaches an object-store lake: the ``storage_options`` setting, applied alike to
deltalake (``storage_options=``), obstore (:class:`lake.store.LakeStore`) and pyarrow filesystems;
DuckDB reads an object-store lake through deltalake's Arrow datasets, so it follows.

The setting names options in one neutral spelling (:data:`STORAGE_OPTIONS`); secrets are never
written into it, only the *names* of environment variables that hold them, read where the client
is made (each node its own). Unknown keys and bad values are :class:`BadInput` when settings load.

A process has one set of active options: :func:`configure` (the CLI and ``create_app`` call it with
``settings.storage_options``) sets them and exports them as ``IMAGELAKE_STORAGE_OPTIONS`` (env names,
no secrets), so child processes and Spark's Python workers, which read no settings file, find them
there; a cluster's executors get the same variable through ``spark.executorEnv``. Options given
here win over the ``AWS_*`` environment, which still supplies everything they leave out.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

from lake.errors import BadInput

__all__ = ["STORAGE_OPTIONS", "ENV_VAR", "check_storage_options", "configure", "active_options",
           "resolved_options", "delta_options", "delta_storage_options", "open_delta", "arrow_filesystem",
           "job_filesystem", "retry_log_gap"]

ENV_VAR = "IMAGELAKE_STORAGE_OPTIONS"


@dataclass(frozen=True)
class _Option:
    kind: str          # "str", "bool", "env" (the name of an environment variable holding the value)
    delta_key: str     # deltalake / object_store spelling (obstore accepts the same)
    help: str


#: The keys ``storage_options`` accepts, each with what it sets.
STORAGE_OPTIONS: dict[str, _Option] = {
    "endpoint": _Option("str", "AWS_ENDPOINT_URL", "S3 endpoint URL, e.g. http://minio:9000 (default: AWS)."),
    "region": _Option("str", "AWS_REGION", "S3 region (default us-east-1 when neither this nor AWS_REGION is set)."),
    "allow_http": _Option("bool", "AWS_ALLOW_HTTP", "Allow a plain-HTTP endpoint (default false)."),
    "access_key_id_env": _Option("env", "AWS_ACCESS_KEY_ID", "Name of the environment variable holding the access key id."),
    "secret_access_key_env": _Option("env", "AWS_SECRET_ACCESS_KEY", "Name of the environment variable holding the secret key."),
    "session_token_env": _Option("env", "AWS_SESSION_TOKEN", "Name of the environment variable holding a session token."),
    "conditional_put": _Option("str", "AWS_CONDITIONAL_PUT", "How conditional writes are made: 'etag' (If-Match / If-None-Match, the default; leases and Delta commits need it)."),
    "virtual_hosted_style": _Option("bool", "AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "Address buckets as <bucket>.<endpoint> instead of <endpoint>/<bucket> (default false)."),
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def check_storage_options(value: Any) -> dict[str, str]:
    """``value`` (a mapping, or a JSON object as text) as validated options, every value a string.

    Raises:
        BadInput: not a mapping, an unknown key, a bad boolean, an env name that is no identifier,
            or a ``conditional_put`` other than ``etag``.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise BadInput(f"storage_options must be a JSON object, e.g. {{\"endpoint\": \"http://host:9000\"}}: {e}") from None
    if not isinstance(value, Mapping):
        raise BadInput(f"storage_options must be a table of options (keys {', '.join(STORAGE_OPTIONS)}), got {value!r}")
    out: dict[str, str] = {}
    for key, raw in value.items():
        spec = STORAGE_OPTIONS.get(key)
        if spec is None:
            hint = " (name the environment variable with access_key_id_env / secret_access_key_env)" \
                if "key" in str(key) or "secret" in str(key) else ""
            raise BadInput(f"unknown storage option {key!r}{hint}; known: {', '.join(STORAGE_OPTIONS)}")
        text = str(raw).strip()
        if spec.kind == "bool":
            low = text.lower() if not isinstance(raw, bool) else str(raw).lower()
            if low not in _TRUE | _FALSE:
                raise BadInput(f"storage option {key!r} must be true or false, got {raw!r}")
            text = "true" if low in _TRUE else "false"
        elif spec.kind == "env" and not text.replace("_", "a").isalnum():
            raise BadInput(f"storage option {key!r} names an environment variable, got {raw!r}; "
                           "put the secret in the environment, never in the settings")
        elif key == "conditional_put" and text != "etag":
            raise BadInput(f"storage option 'conditional_put' must be 'etag' (the lake's leases and commits "
                           f"need conditional writes), got {raw!r}")
        elif key == "endpoint" and "://" not in text:
            raise BadInput(f"storage option 'endpoint' must be a URL like http://host:9000, got {raw!r}")
        out[key] = text
    return out


_ACTIVE: dict[str, str] | None = None  # set by configure(); else read from the environment


def configure(options: Mapping[str, Any], lake_root: str = "") -> None:
    """Make ``options`` this process's storage options and export them for its children.

    Raises:
        BadInput: bad options, or (for an object-store ``lake_root``) a credential variable they
            name is missing here: found at start, not at the first request.
    """
    global _ACTIVE
    checked = check_storage_options(dict(options))
    if _is_remote(str(lake_root)):
        resolved_options(checked)
    _ACTIVE = checked
    if checked:
        os.environ[ENV_VAR] = json.dumps(checked, sort_keys=True)
    else:
        os.environ.pop(ENV_VAR, None)


def active_options() -> dict[str, str]:
    """The options :func:`configure` set, else those of ``IMAGELAKE_STORAGE_OPTIONS``, else none."""
    if _ACTIVE is not None:
        return dict(_ACTIVE)
    return dict(_from_env(os.environ.get(ENV_VAR, "")))


@functools.lru_cache(maxsize=4)
def _from_env(text: str) -> tuple:
    return tuple(check_storage_options(text).items())


def resolved_options(options: Mapping[str, str] | None = None) -> dict[str, str]:
    """The options in deltalake's spelling with the secrets read from their environment variables.

    Raises:
        BadInput: an ``*_env`` option names a variable this process does not have.
    """
    opts = active_options() if options is None else check_storage_options(dict(options))
    out: dict[str, str] = {}
    for key, value in opts.items():
        spec = STORAGE_OPTIONS[key]
        if spec.kind == "env":
            secret = os.environ.get(value)
            if secret is None:
                raise BadInput(f"storage option {key!r} names the environment variable {value}, which this "
                               f"process (pid {os.getpid()}) does not have; set it on every node")
            value = secret
        out[spec.delta_key] = value
    return out


def _is_remote(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def delta_options(lake: Any) -> dict[str, str] | None:
    """``storage_options`` for deltalake's writers and long reads (jobs): the resolved options, no
    tighter limits than deltalake's own; ``None`` for a local lake or when there are none."""
    root = str(getattr(lake, "root", lake))
    if not _is_remote(root):
        return None
    return resolved_options() or None


def delta_storage_options(lake: Any, *, timeout_s: float = 5.0, connect_timeout_s: float = 2.0,
                          retries: int = 2, retry_total_s: float = 2.0) -> dict[str, str] | None:
    """Storage options for ``DeltaTable(uri, storage_options=...)`` on an object-store lake that a
    server reads: :func:`delta_options` plus the client limits that keep a dead endpoint from
    hanging a reader (deltalake's defaults retry for minutes). ``None`` for a local lake."""
    root = str(getattr(lake, "root", lake))
    if not _is_remote(root):
        return None
    return {**resolved_options(), "timeout": f"{timeout_s:g}s", "connect_timeout": f"{connect_timeout_s:g}s",
            "max_retries": str(retries), "retry_timeout": f"{retry_total_s:g}s"}


T = TypeVar("T")
_log = logging.getLogger("lake.remote")


def retry_log_gap(read: Callable[[], T], attempts: int = 6) -> T:
    """``read()`` (open or update a Delta table), again when it saw a gap in the commit files.

    Listing a local ``_delta_log`` folder while a writer adds commit files to it may return a later
    commit but not the one before it (a directory read is not a snapshot of concurrent creates), and
    deltalake then fails with "Expected contiguous commit files, but found gap". The missing file is
    there: reading again a moment later sees both. Seen in the load benchmark as a rare 500 on
    ``GET /images/<id>`` and ``GET /buckets/<id>``; other errors are raised at once."""
    for attempt in range(attempts):
        try:
            return read()
        except Exception as e:  # deltalake's DeltaError; anything else is raised at once below
            if "contiguous commit files" not in str(e) or attempt == attempts - 1:
                raise
            _log.info("a Delta log listing raced a commit (%s); reading it again", str(e)[:80])
            time.sleep(0.001 * 2 ** attempt)
    raise AssertionError("unreachable")


def open_delta(lake: Any, name: str):
    """``DeltaTable`` of the lake's table ``name`` with :func:`delta_storage_options` (bounded
    timeouts and retries on an object store). Raises deltalake's TableNotFoundError as it is, and
    StoreUnavailable when the store cannot be reached."""
    from deltalake import DeltaTable

    from lake.store_errors import store_errors

    with store_errors(lake):
        return retry_log_gap(lambda: DeltaTable(lake.table_uri(name), storage_options=delta_storage_options(lake)))


def _arrow_kwargs(resolved: Mapping[str, str]) -> dict[str, Any]:
    env = os.environ
    endpoint = resolved.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or ""
    region = resolved.get("AWS_REGION") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or ""
    kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/") or scheme, scheme=scheme if host else "https")
    if region:
        kwargs["region"] = region
    if "AWS_ACCESS_KEY_ID" in resolved and "AWS_SECRET_ACCESS_KEY" in resolved:
        kwargs.update(access_key=resolved["AWS_ACCESS_KEY_ID"], secret_key=resolved["AWS_SECRET_ACCESS_KEY"])
        if "AWS_SESSION_TOKEN" in resolved:
            kwargs["session_token"] = resolved["AWS_SESSION_TOKEN"]
    if resolved.get("AWS_VIRTUAL_HOSTED_STYLE_REQUEST") == "true":
        kwargs["force_virtual_addressing"] = True
    return kwargs


@functools.lru_cache(maxsize=8)
def _arrow_s3(items: tuple, bounded: bool, pid: int):
    """One S3 filesystem per distinct configuration (``items``: the keyword arguments, the
    endpoint and region read from the environment included, so a changed environment gets a new
    client rather than one still pointing at the old endpoint)."""
    from pyarrow import fs as pafs

    kwargs = dict(items)
    if bounded:
        kwargs.update(connect_timeout=2.0, request_timeout=10.0,
                      retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))
    return pafs.S3FileSystem(**kwargs)


def _filesystem(uri: str, bounded: bool):
    from pyarrow import fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    scheme, _, rest = uri.partition("://")
    if scheme.lower() not in {"s3", "s3a"}:
        return pafs.FileSystem.from_uri(uri)
    resolved = resolved_options()
    if not bounded and not resolved:
        return pafs.FileSystem.from_uri(uri)  # the environment's configuration, pyarrow's defaults
    return _arrow_s3(tuple(sorted(_arrow_kwargs(resolved).items())), bounded, os.getpid()), rest


def arrow_filesystem(uri: str):
    """(pyarrow filesystem, path in it) for a file a server reads from an object-store lake: the
    active storage options, short timeouts and few retries (pyarrow's defaults take many seconds to
    give up on a dead endpoint); local paths as they are, other schemes as ``FileSystem.from_uri``."""
    return _filesystem(uri, bounded=True)


def job_filesystem(uri: str):
    """(pyarrow filesystem, path in it) for jobs: the active storage options with pyarrow's own
    timeouts and retries."""
    return _filesystem(uri, bounded=False)
