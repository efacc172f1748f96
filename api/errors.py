"""The one error funnel: every failure leaves the API as ``{"ok": false, "error": msg, "status": N}``.

:class:`lake.errors.ImagelakeError` subclasses carry their HTTP status; werkzeug's HTTP errors
(unknown route, wrong method, body too large, malformed JSON) keep theirs; anything else is a 500.

A 5xx body names nothing internal — no path, no library message, no exception text — only a
request id (also sent as ``X-Request-Id``); the server log has the failure and its traceback under
that id. The one exception is 503 :class:`~lake.errors.Unavailable`, whose messages are written for
users ("no index build is published yet; run `imagelake index`") and name no path.
"""

from __future__ import annotations

import re
import uuid

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from api.request_limits import FormLimit
from lake.errors import ImagelakeError, Unavailable

__all__ = ["error_response", "init_app", "without_paths"]

_PATHISH = re.compile(r"[^\s'\"()]*/[^\s'\"()]*")


def without_paths(text: str) -> str:
    """``text`` with every path or URI cut to its last component (``/srv/lake/index/b7: ...`` ->
    ``b7: ...``), for public status lines that must not show where the lake lives."""
    def last(match: re.Match) -> str:
        token = match.group(0)
        core = token.rstrip(":,;.")
        return (core.rstrip("/").rsplit("/", 1)[-1] or "-") + token[len(core):]
    return _PATHISH.sub(last, text)


def error_response(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    """The error shape every route answers with."""
    response = jsonify({"ok": False, "error": message, "status": status})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _http_message(e: HTTPException) -> str:
    if isinstance(e, NotFound) and request.url_rule is None:
        return f"no route {request.method} {request.path}; the API is described at /api/v1/openapi.json"
    if isinstance(e, MethodNotAllowed):
        allowed = ", ".join(sorted(e.valid_methods or ()))
        return f"method {request.method} is not allowed on {request.path}; allowed: {allowed}"
    if isinstance(e, FormLimit):
        return e.description
    if isinstance(e, RequestEntityTooLarge):
        limit = request.max_content_length
        return (f"request body too large: over {limit} bytes (upload_max_bytes)" if limit
                else "request body too large")
    return e.description or e.name


def _internal(e: BaseException, status: int) -> Response:
    """A 5xx: log what failed under a fresh request id and answer with that id alone."""
    request_id = uuid.uuid4().hex[:16]
    current_app.logger.error("request %s: %s %s failed with %s %s: %s", request_id, request.method,
                             request.path, status, type(e).__name__, e, exc_info=e)
    return error_response(f"internal error (request id {request_id}; the server log has the details)",
                          status, {"X-Request-Id": request_id})


def _handle_http(e: HTTPException) -> Response:
    status = e.code or 500
    if status >= 500:
        return _internal(e, status)
    headers = {}
    if isinstance(e, MethodNotAllowed) and e.valid_methods:
        headers["Allow"] = ", ".join(sorted(e.valid_methods))
    return error_response(_http_message(e), status, headers)


def _handle_lake(e: ImagelakeError) -> Response:
    if e.status >= 500 and not isinstance(e, Unavailable):
        return _internal(e, e.status)
    return error_response(str(e) or type(e).__name__, e.status)


def _handle_unexpected(e: Exception) -> Response:
    from lake.store import as_store_unavailable

    settings = current_app.config.get("IMAGELAKE_SETTINGS")
    unavailable = as_store_unavailable(e, getattr(settings, "lake", "")) if settings is not None else None
    if unavailable is not None:  # the object store of the lake did not answer: retry later, no 500
        current_app.logger.warning("%s %s: %s (%s)", request.method, request.path, unavailable, _first(e))
        return error_response(str(unavailable), 503, {"Retry-After": "5"})
    return _internal(e, 500)


def _first(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:300]


def init_app(app: Flask) -> None:
    app.register_error_handler(HTTPException, _handle_http)
    app.register_error_handler(ImagelakeError, _handle_lake)
    app.register_error_handler(Exception, _handle_unexpected)
