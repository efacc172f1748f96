"""The one error funnel: every failure leaves the API as ``{"ok": false, "error": msg, "status": N}``.

:class:`lake.errors.ImagelakeError` subclasses carry their HTTP status; werkzeug's HTTP errors
(unknown route, wrong method, body too large, malformed JSON) keep theirs; anything else is a 500
whose traceback is logged and whose message says nothing about the internals.
"""

from __future__ import annotations

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from lake.errors import ImagelakeError

__all__ = ["error_response", "init_app"]


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
    if isinstance(e, RequestEntityTooLarge):
        limit = request.max_content_length
        return f"request body too large; the limit is {limit} bytes" if limit else "request body too large"
    return e.description or e.name


def _handle_http(e: HTTPException) -> Response:
    status = e.code or 500
    headers = {}
    if isinstance(e, MethodNotAllowed) and e.valid_methods:
        headers["Allow"] = ", ".join(sorted(e.valid_methods))
    return error_response(_http_message(e), status, headers)


def _handle_lake(e: ImagelakeError) -> Response:
    if e.status >= 500:
        current_app.logger.error("%s %s failed: %s", request.method, request.path, e, exc_info=e)
    return error_response(str(e) or type(e).__name__, e.status)


def _handle_unexpected(e: Exception) -> Response:
    current_app.logger.error("%s %s failed with an unexpected error", request.method, request.path,
                             exc_info=e)
    return error_response("internal error", 500)


def init_app(app: Flask) -> None:
    app.register_error_handler(HTTPException, _handle_http)
    app.register_error_handler(ImagelakeError, _handle_lake)
    app.register_error_handler(Exception, _handle_unexpected)
