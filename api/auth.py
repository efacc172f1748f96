"""Who may call what: every ``/api/v1`` route needs a token unless it is marked :func:`public`.

Default rule: ``GET``/``HEAD`` need the ``read`` scope, every other method ``curate``; a view can
ask for more with :func:`requires`. A token comes as ``Authorization: Bearer il_...`` (scripts) or
in the ``imagelake_token`` cookie that ``POST /session`` sets (the dashboard; HttpOnly,
SameSite=Strict). A cookie-authenticated write must also come from the same origin (``Origin``, or
``Sec-Fetch-Site``, or ``Referer``; scheme, host and port), so a cross-site form post is refused
with 403 even in browsers that ignore SameSite; the login itself needs the same evidence and a JSON
body, so no other site can log a browser into its own token. With the setting ``auth = false`` every route is open (a trusted laptop only).
"""

from __future__ import annotations

from typing import Callable, TypeVar
from urllib.parse import urlparse

from flask import Blueprint, Flask, current_app, g, jsonify, request

from lake.catalog import Lake
from lake.errors import BadInput, Forbidden, Unauthorized, Unsupported
from lake.tokens import SCOPES, Principal, TokenStore

__all__ = ["COOKIE", "bp", "cookie_principal", "current_principal", "init_app", "public", "requires", "same_origin",
           "set_login_cookie", "verify"]

COOKIE = "imagelake_token"
_SAFE = {"GET", "HEAD", "OPTIONS"}
F = TypeVar("F", bound=Callable)

bp = Blueprint("auth", __name__)


def public(view: F) -> F:
    """Mark a view as open to anyone (health, the OpenAPI document, login)."""
    view._imagelake_scope = None  # type: ignore[attr-defined]
    return view


def requires(scope: str) -> Callable[[F], F]:
    """Mark a view as needing ``scope`` (e.g. ``admin``) instead of the method's default."""
    if scope not in SCOPES:
        raise ValueError(scope)

    def mark(view: F) -> F:
        view._imagelake_scope = scope  # type: ignore[attr-defined]
        return view
    return mark


def current_principal() -> Principal | None:
    """The caller of this request (``None`` when auth is off or the route is public)."""
    return g.get("principal")


def verify(token: str | None) -> Principal | None:
    """Whose ``token`` this is; None when it is missing, unknown, revoked or malformed."""
    return current_app.extensions["imagelake.tokens"].verify(token) if token else None


def cookie_principal() -> Principal | None:
    """Who the login cookie names, for the dashboard's pages (public to the hook, so they can
    redirect to the login page instead of answering 401); an admin stand-in when auth is off."""
    if not current_app.config["IMAGELAKE_SETTINGS"].auth:
        return Principal("-", "auth off", "admin")
    return verify(request.cookies.get(COOKIE))


def _presented() -> tuple[str | None, bool]:
    header = request.headers.get("Authorization", "")
    if header:
        kind, _, value = header.partition(" ")
        if kind.lower() != "bearer" or not value.strip():
            raise Unauthorized('the Authorization header must be "Bearer <token>"')
        return value.strip(), False
    cookie = request.cookies.get(COOKIE)
    return (cookie, True) if cookie else (None, False)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_tuple(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a URL, the port filled in from the scheme; None when malformed."""
    try:
        parts = urlparse(url)
        scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is not a number, or out of range
        return None
    return (scheme, host, port) if scheme and host and port else None


def same_origin() -> bool:
    """Whether this request demonstrably comes from a page of this site: same scheme, host and
    port (an ``https://`` page is another origin than this ``http://`` server; behind a TLS proxy,
    gunicorn takes the scheme from ``X-Forwarded-Proto``)."""
    here = _origin_tuple(f"{request.scheme}://{request.host}")
    origin = request.headers.get("Origin")
    if origin:
        return origin != "null" and here is not None and _origin_tuple(origin) == here
    site = request.headers.get("Sec-Fetch-Site")
    if site:
        return site in {"same-origin", "none"}
    referer = request.headers.get("Referer")
    return bool(referer) and here is not None and _origin_tuple(referer) == here


def _check() -> None:
    if request.routing_exception is not None or request.endpoint is None:
        return  # 404/405 answer as they are
    if request.endpoint == "static" or request.endpoint.endswith(".static"):
        return  # stylesheets, scripts and icons hold no data
    view = current_app.view_functions[request.endpoint]
    needed = getattr(view, "_imagelake_scope", "read" if request.method in _SAFE else "curate")
    settings = current_app.config["IMAGELAKE_SETTINGS"]
    if needed is None or not settings.auth:
        return
    token, from_cookie = _presented()
    if token is None:
        raise Unauthorized("this route needs a token: send \"Authorization: Bearer <token>\" "
                           "(make one with `imagelake token create --scope read|curate|admin`)")
    principal = verify(token)
    if principal is None:
        raise Unauthorized("the token is unknown, revoked or malformed")
    if from_cookie and request.method not in _SAFE and not same_origin():
        raise Forbidden("cross-site request refused: a cookie-authenticated write must come from this site")
    if not principal.allows(needed):
        raise Forbidden(f"this route needs the {needed!r} scope; the token has {principal.scope!r}")
    g.principal = principal


def _add_www_authenticate(response):
    if response.status_code == 401:
        response.headers.setdefault("WWW-Authenticate", 'Bearer realm="imagelake"')
    return response


@bp.post("/session")
@public
def login():
    """Trade a token for an HttpOnly, SameSite=Strict cookie (the dashboard's login).

    A cross-site page must not log a visitor's browser into the page author's token (login CSRF):
    the body must be ``application/json`` (a form cannot send that without a CORS preflight, which
    this server never grants) and the request must come from this site."""
    if request.mimetype != "application/json":
        sent = repr(request.mimetype) if request.mimetype else "none"
        raise Unsupported(f'send {{"token": "il_..."}} as Content-Type: application/json (sent: {sent})')
    body = request.get_json(silent=True)
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise BadInput('send a JSON object like {"token": "il_..."}')
    if not same_origin():
        raise Forbidden("cross-site login refused: log in from this site's own page")
    principal = verify(token)
    if principal is None:
        raise Unauthorized("the token is unknown, revoked or malformed")
    response = jsonify({"ok": True, "token_id": principal.token_id, "name": principal.name,
                        "scope": principal.scope})
    return set_login_cookie(response, token)


def set_login_cookie(response, token: str):
    """Put ``token`` in the HttpOnly, SameSite=Strict login cookie of ``response``."""
    response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=request.is_secure,
                        path="/", max_age=30 * 24 * 3600)
    return response


@bp.get("/session")
def whoami():
    principal = current_principal()
    if principal is None:
        return jsonify({"ok": True, "token_id": None, "name": None, "scope": "admin", "auth": False})
    return jsonify({"ok": True, "token_id": principal.token_id, "name": principal.name,
                    "scope": principal.scope, "auth": True})


@bp.delete("/session")
@public
def logout():
    response = jsonify({"ok": True})
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict")
    return response


def init_app(app: Flask) -> None:
    settings = app.config["IMAGELAKE_SETTINGS"]
    app.extensions["imagelake.tokens"] = TokenStore(Lake.at(settings.lake), settings.refresh_s)
    app.before_request(_check)
    app.after_request(_add_www_authenticate)


def openapi_paths(settings) -> dict:
    from api.openapi import errors, json_response

    session = {"type": "object", "required": ["ok", "scope"], "properties": {
        "ok": {"const": True}, "token_id": {"type": ["string", "null"]}, "name": {"type": ["string", "null"]},
        "scope": {"enum": list(SCOPES)}, "auth": {"type": "boolean"}}}
    return {"/session": {
        "post": {
            "summary": "Log in: trade a token for an HttpOnly SameSite=Strict cookie",
            "operationId": "login", "security": [],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["token"], "properties": {"token": {"type": "string"}}}}}},
            "responses": {"200": json_response(session, "Logged in; the cookie is set"),
                          **errors(400, 401, 403, 415)},
        },
        "get": {
            "summary": "Who the caller is (token id, name, scope)",
            "operationId": "whoami",
            "responses": {"200": json_response(session, "The caller"), **errors(401)},
        },
        "delete": {
            "summary": "Log out: clear the cookie",
            "operationId": "logout", "security": [],
            "responses": {"200": json_response({"type": "object"}, "Logged out"), **errors()},
        },
    }}
