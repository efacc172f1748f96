"""Dashboard pages: a login page and the app shell; all data arrives through the JSON API.

Pages are marked public for the API's auth hook and check the login cookie themselves, so a
visitor without a valid token is sent to ``/login`` instead of getting a JSON 401. The token never
appears in a page: the cookie is HttpOnly, and the shell only shows the token's name and scope.
"""

from __future__ import annotations

from flask import Blueprint, redirect, render_template, request, url_for

from api.auth import cookie_principal, public, same_origin, set_login_cookie, verify
from api.services import lake_reader

bp = Blueprint("dashboard", __name__, template_folder="templates", static_folder="static",
               static_url_path="/static")

_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


@bp.after_request
def _security_headers(response):
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


@bp.get("/login")
@public
def login():
    return render_template("login.html", error=None)


@bp.post("/login")
@public
def login_form():
    """The login form's POST (works without JavaScript; the token never travels in a URL)."""
    if not same_origin():
        return render_template("login.html", error="cross-site login refused"), 403
    token = (request.form.get("token") or "").strip()
    if verify(token) is None:
        return render_template("login.html", error="the token is unknown, revoked or malformed"), 401
    return set_login_cookie(redirect(url_for("dashboard.index"), code=303), token)


@bp.get("/")
@public
def index():
    principal = cookie_principal()
    if principal is None:
        return redirect(url_for("dashboard.login"))
    reader = lake_reader()
    sizes = reader.settings.thumbnail_sizes
    return render_template("app.html", principal=principal, versions=reader.versions(),
                           thumb_small=min(sizes), thumb_large=max(sizes))
