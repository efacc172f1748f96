"""What a failure to reach an object-store lake means, as one clear line.

deltalake, pyarrow and obstore each fail in their own words (a Rust error chain, an ``OSError``
with an AWS SDK message, an obstore exception class). Everything here turns those into one
:class:`StoreUnavailable` (HTTP 503 in the API, exit 2 in the CLI) that names the lake, the endpoint
and what to check (the bucket, the credentials, the network), or into :class:`lake.errors.NotFound`
for a missing object; anything else passes unchanged.

:func:`translate` is for obstore calls made by :class:`lake.store.LakeStore` (it knows the
operation and key); :func:`as_store_unavailable` and :class:`store_errors` are for the other
clients, which only offer their message text.
"""

from __future__ import annotations

import errno
import re
from typing import Any

from lake.errors import NotFound, Unavailable

__all__ = ["StoreUnavailable", "translate", "as_store_unavailable", "store_errors", "first_line"]


class StoreUnavailable(Unavailable):
    """The lake's object store cannot be used: unreachable, wrong credentials, missing bucket."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of ``e``'s message, without an XML error body, at most 300 characters."""
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    line = re.sub(r"<\?xml.*", "", line).strip()
    return line[:300]


def translate(e: BaseException, op: str, key: str, root: str, endpoint: str = "") -> Exception:
    """The error to raise for ``e``, an obstore call ``op`` on ``key`` of the lake ``root`` that failed:
    :class:`StoreUnavailable` (missing bucket, refused credentials, unreachable endpoint, anything
    else) or :class:`NotFound` (no such object)."""
    from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

    text = str(e)
    where = f"the object store of the lake {root}" + (f" (endpoint {endpoint})" if endpoint else "")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return StoreUnavailable(f"{where}: the bucket does not exist; create it or fix the lake root")
    if isinstance(e, (PermissionDeniedError, UnauthenticatedError)) or re.search(
            r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|ExpiredToken|InvalidToken|403 Forbidden"
            r"|401 Unauthorized", text):
        return StoreUnavailable(f"{where} refused the credentials ({op} {key}); check AWS_ACCESS_KEY_ID / "
                                "AWS_SECRET_ACCESS_KEY, the variables storage_options names, or the node's role")
    if isinstance(e, FileNotFoundError):
        return NotFound(f"no object {key!r} in the lake at {root}")
    if re.search(r"error sending request|kind: (Connect|Timeout)|dns error|connection", text, re.I):
        why = ("connection refused" if "ConnectionRefused" in text else
               "timed out" if re.search(r"kind: Timeout|TimedOut", text) else
               "name not resolved" if "dns error" in text.lower() else "connection failed")
        return StoreUnavailable(f"{where} is unreachable ({op} {key}: {why}); check the endpoint (storage_options or AWS_ENDPOINT_URL) and the network")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EACCES):
        return StoreUnavailable(f"{where}: {op} {key} failed: {e.strerror}")
    return StoreUnavailable(f"{where}: {op} {key} failed: {first_line(e)}")


_STORE_TEXT = re.compile(r"error sending request|connection refused|Connection refused|dns error|timed out|"
                         r"NoSuchBucket|InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|"
                         r"Generic S3 error|Generic GCS error|Generic MicrosoftAzure error|"
                         r"Failed to connect|tcp connect error|operation timed out|retries, max_retries|NETWORK_CONNECTION|"
                         r"Could not connect to server|Couldn't connect", re.I)


def as_store_unavailable(e: BaseException, root: str) -> StoreUnavailable | None:
    """``e`` (a deltalake / pyarrow / obstore failure reaching an object-store lake) as one clear
    :class:`StoreUnavailable` line, or ``None`` when it does not look like one."""
    if isinstance(e, StoreUnavailable):
        return e
    from lake.errors import ImagelakeError

    if "://" not in str(root) or isinstance(e, ImagelakeError):  # already a clear, classified error
        return None
    text = str(e)
    if not _STORE_TEXT.search(text):
        return None
    why = ("connection refused" if re.search(r"connection refused|ConnectionRefused", text, re.I) else
           "timed out" if re.search(r"timed out|Timeout", text, re.I) else
           "the bucket does not exist" if "NoSuchBucket" in text else
           "the credentials were refused" if re.search(r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied", text)
           else "request failed")
    return StoreUnavailable(f"the object store of the lake is unavailable ({why}); check the endpoint "
                            "(storage_options or AWS_ENDPOINT_URL), the credentials and the network, then retry")


class store_errors:
    """``with store_errors(lake):`` turns a failure to reach an object-store lake (deltalake,
    pyarrow, obstore) into :class:`StoreUnavailable` (HTTP 503, CLI exit 2); anything else passes."""

    def __init__(self, lake: Any):
        self.root = str(getattr(lake, "root", lake))

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or not isinstance(e, Exception):
            return False
        translated = as_store_unavailable(e, self.root)
        if translated is None or translated is e:
            return False
        raise translated from None
