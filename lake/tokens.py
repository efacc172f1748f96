"""API tokens: created by ``imagelake token create``, stored hashed in the ``tokens`` table.

A token reads ``il_<token_id>_<secret>``. The table keeps the token id, its scope and the sha256 of
the secret, never the secret itself; the secret is shown once, when the token is created. The secret
has 256 random bits, so a plain sha256 (no slow KDF) cannot be brute-forced; comparisons are
constant-time. Scopes nest: ``admin`` ⊇ ``curate`` ⊇ ``read``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass

from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from lake.catalog import Lake
from lake.commit import commit_rows, now_utc, open_table
from lake.errors import BadInput, NotFound

__all__ = ["SCOPES", "Principal", "TokenStore", "create_token", "list_tokens", "revoke_token", "scope_allows"]

SCOPES = ("read", "curate", "admin")
_TOKEN = re.compile(r"il_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's id, name and scope."""

    token_id: str
    name: str
    scope: str

    def allows(self, needed: str) -> bool:
        return scope_allows(self.scope, needed)


def scope_allows(held: str, needed: str) -> bool:
    return SCOPES.index(held) >= SCOPES.index(needed)


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise BadInput(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    return scope


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(lake: Lake, scope: str, name: str = "") -> tuple[str, str]:
    """Create a token; returns ``(token_id, token)``. The token string is not stored anywhere."""
    _check_scope(scope)
    token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    commit_rows(lake, "tokens", [{"token_id": token_id, "action": "create", "scope": scope,
                                  "name": name or f"{scope} token", "secret_sha256": _digest(secret),
                                  "at": now_utc()}], run_id=f"token-create-{token_id}")
    return token_id, f"il_{token_id}_{secret}"


def revoke_token(lake: Lake, token_id: str) -> None:
    """Revoke a token for good (API processes notice within ``refresh_s``).

    Raises:
        NotFound: no such token.
    """
    if token_id not in {t["token_id"] for t in list_tokens(lake)}:
        raise NotFound(f"no token {token_id!r}; `imagelake token list` shows them")
    commit_rows(lake, "tokens", [{"token_id": token_id, "action": "revoke", "at": now_utc()}],
                run_id=f"token-revoke-{token_id}", dedupe=True)


def list_tokens(lake: Lake) -> list[dict]:
    """Every token ever created: id, name, scope, created_at, revoked (no secrets, no hashes)."""
    rows = open_table(lake, "tokens").to_pyarrow_table().to_pylist()
    revoked = {r["token_id"]: r["at"] for r in rows if r["action"] == "revoke"}
    return [{"token_id": r["token_id"], "name": r["name"], "scope": r["scope"], "created_at": r["at"],
             "revoked_at": revoked.get(r["token_id"])}
            for r in sorted(rows, key=lambda r: r["at"]) if r["action"] == "create"]


class TokenStore:
    """Verifies presented tokens against the ``tokens`` table, re-read at most every ``refresh_s``."""

    def __init__(self, lake: Lake, refresh_s: float):
        self.lake, self.refresh_s = lake, refresh_s
        self._lock = threading.Lock()
        self._table: DeltaTable | None = None
        self._version: int | None = None
        self._valid: dict[str, tuple[str, str, str]] = {}
        self._checked_at = float("-inf")

    def _refresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._checked_at < self.refresh_s:
                return
            try:
                if self._table is None:
                    from lake.store import open_delta

                    self._table = open_delta(self.lake, "tokens")  # bounded timeouts on an object store
                else:
                    self._table.update_incremental()
            except TableNotFoundError:
                self._checked_at = time.monotonic()
                return
            if self._table.version() != self._version:
                rows = self._table.to_pyarrow_table().to_pylist()
                revoked = {r["token_id"] for r in rows if r["action"] == "revoke"}
                self._valid = {r["token_id"]: (r["secret_sha256"], r["name"], r["scope"])
                               for r in rows if r["action"] == "create" and r["token_id"] not in revoked}
                self._version = self._table.version()
            self._checked_at = time.monotonic()

    def verify(self, token: str) -> Principal | None:
        """The token's principal, or ``None`` if it is malformed, unknown, revoked or wrong."""
        match = _TOKEN.fullmatch(token.strip())
        if match is None:
            return None
        self._refresh()
        token_id, secret = match.groups()
        entry = self._valid.get(token_id)
        if entry is None:
            hmac.compare_digest(_digest(secret), "0" * 64)  # same work for unknown ids
            return None
        digest, name, scope = entry
        if not hmac.compare_digest(_digest(secret), digest):
            return None
        return Principal(token_id, name, scope)
