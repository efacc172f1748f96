"""The exception hierarchy. Every user-facing failure is one of these; the API maps them to HTTP
status codes in one place (``api/errors.py``) and the CLI prints their message on one line.
Messages name the bad value and say what to do next."""

from __future__ import annotations

__all__ = [
    "ImagelakeError", "BadInput", "NotFound", "Conflict", "TooLarge", "Unsupported",
    "Unauthorized", "Forbidden", "QueryTimeout", "LockHeld", "CorruptArtifact", "Unavailable",
]


class ImagelakeError(Exception):
    """Base class. ``status`` is the HTTP status the API answers with."""

    status = 500


class BadInput(ImagelakeError):
    status = 400


class Unauthorized(ImagelakeError):
    status = 401


class Forbidden(ImagelakeError):
    status = 403


class NotFound(ImagelakeError):
    status = 404


class Conflict(ImagelakeError):
    status = 409


class TooLarge(ImagelakeError):
    status = 413


class Unsupported(ImagelakeError):
    status = 415


class Unavailable(ImagelakeError):
    """Something the request needs does not exist yet (e.g. no index build published); retry later."""

    status = 503


class LockHeld(Conflict):
    """Another job holds the lake's lock (an overlapping scheduled run)."""


class QueryTimeout(BadInput):
    """A read-only SQL query ran past its time limit and was interrupted."""


class CorruptArtifact(ImagelakeError):
    """An artifact failed verification against its manifest; the previous build keeps serving."""
