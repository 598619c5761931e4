"""Identity and roles for Bastion's HTTP apps.

A caller presents an API key as ``Authorization: Bearer <key>`` (or ``X-API-Key:
<key>``). The :class:`Authenticator` turns it into an :class:`Identity` (the client name
the key speaks for and its role) by the key's SHA-256 digest, looked up in an in-memory
copy of the ``api_keys`` table (:mod:`bastion.web.keys`) that is re-read every
``refresh_s`` seconds (so ``bastion keys revoke`` in another process takes effect within
that), and on a miss at most once a second. The admin token (``$BASTION_ADMIN_TOKEN``)
is an ``admin`` identity, compared digest to digest with :func:`hmac.compare_digest`;
a token shorter than :data:`MIN_ADMIN_TOKEN` characters is refused when the app is built.

Roles: ``client`` (predict, and feedback on its own requests), ``reader`` (events
without inputs or client text, the dashboard's data, the model list, metrics),
``admin`` (everything). Open mode (``auth: open``, ``bastion serve --open``) is for local
demos: a caller without a key is an ``admin`` named by its ``X-Client-Id`` label (or
``anonymous``); keys still work and still name their client.

Two ways to use it:

- :class:`AuthMiddleware` (pure ASGI): resolves the identity once per request (kept in
  ``scope["state"]["identity"]``) and answers 401/403 for a route that needs a role
  *before* the app reads the body (an invalid body never gets a 422 before the auth
  check);
- :func:`require_role` (a FastAPI dependency) in the routes: the same check again,
  and the API-key security scheme in the OpenAPI document.

:meth:`Authenticator.key_fn` is what a per-key rate limiter keys on (the client name, or
the peer address for a caller without a valid key).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPBearer

from bastion.errors import BastionError
from bastion.web.errors import ApiError, Render, send_error

__all__ = ["ADMIN", "CLIENT", "READER", "Authenticator", "AuthMiddleware", "Identity",
           "MIN_ADMIN_TOKEN", "RouteRules", "current_identity", "require_role"]

log = logging.getLogger("bastion.web.auth")

MIN_ADMIN_TOKEN = 32
#: who may call a route: the roles, admin always included
CLIENT: frozenset[str] = frozenset({"client", "admin"})
READER: frozenset[str] = frozenset({"reader", "admin"})
ADMIN: frozenset[str] = frozenset({"admin"})
ANY: frozenset[str] = frozenset({"client", "reader", "admin"})

_BEARER_HINT = "send 'Authorization: Bearer <key>' (create one with bastion keys create)"


@dataclass(frozen=True)
class Identity:
    """Who is calling: the client name, its role, where the identity came from
    (``key``, ``admin_token`` or ``open``) and the key's display prefix."""

    client: str
    role: str
    source: str
    key_prefix: str | None = None

    def may(self, roles: Iterable[str]) -> bool:
        return self.role in roles


class AuthFailure:
    """A credential was presented and refused (unknown or revoked key)."""

    __slots__ = ("code", "message")

    def __init__(self, code: str, message: str) -> None:
        self.code, self.message = code, message


def check_admin_token(token: str | None) -> str | None:
    """``token`` stripped, or None; a token under :data:`MIN_ADMIN_TOKEN` characters is
    a :class:`BastionError` (one line naming the fix)."""
    if token is None or not token.strip():
        return None
    t = token.strip()
    if len(t) < MIN_ADMIN_TOKEN:
        raise BastionError(
            f"the admin token is {len(t)} characters; at least {MIN_ADMIN_TOKEN} are needed",
            hint="generate one with: python -c \"import secrets; "
                 "print(secrets.token_urlsafe(32))\"")
    return t


class Authenticator:
    """Resolves credentials to identities; see the module docs.

    Args:
        keys: a :class:`~bastion.web.keys.KeyStore` (or None: only the admin token).
        admin_token: the admin token (checked: at least 32 characters), or None.
        open_mode: callers without a key are ``admin`` (local demos only).
        refresh_s: how often the key table is re-read.
    """

    def __init__(self, keys: Any | None = None, *, admin_token: str | None = None,
                 open_mode: bool = False, refresh_s: float = 2.0) -> None:
        self.keys = keys
        tok = check_admin_token(admin_token)
        self._admin_digest = None if tok is None else hashlib.sha256(tok.encode()).digest()
        self.open_mode = bool(open_mode)
        self.refresh_s = float(refresh_s)
        self._by_digest: dict[bytes, tuple[str, str, str, bool]] = {}
        self._loaded = 0.0
        self._miss_reload = 0.0
        self._lock = threading.Lock()
        if keys is not None:
            self.reload()

    @property
    def mode(self) -> str:
        return "open" if self.open_mode else "keys"

    @property
    def admin_token_set(self) -> bool:
        return self._admin_digest is not None

    def reload(self) -> None:
        """Re-read the key table now."""
        if self.keys is None:
            return
        table = {bytes.fromhex(d): (k.client, k.role, k.prefix, k.active)
                 for d, k in self.keys.by_digest().items()}
        with self._lock:
            self._by_digest = table
            self._loaded = time.monotonic()

    def key_count(self, role: str | None = None) -> int:
        """Active keys (of ``role``)."""
        return sum(1 for v in self._by_digest.values() if v[3] and role in (None, v[1]))

    # -- resolving --------------------------------------------------------------------
    def identify_token(self, token: str) -> Identity | AuthFailure:
        """The identity of a presented token (or why it is refused)."""
        d = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        if self._admin_digest is not None and hmac.compare_digest(d, self._admin_digest):
            return Identity("admin", "admin", "admin_token")
        # a dict lookup by the digest of a 256-bit random token: its timing tells an
        # attacker nothing about any key (finding a digest's neighbour needs a preimage)
        now = time.monotonic()
        if self.keys is not None and now - self._loaded > self.refresh_s:
            self._safe_reload()
        hit = self._by_digest.get(d)
        if hit is None and self.keys is not None and now - self._miss_reload > 1.0:
            self._miss_reload = now  # a key created a moment ago; at most once a second
            self._safe_reload()
            hit = self._by_digest.get(d)
        if hit is None:
            return AuthFailure("unknown_key", "the API key is not known (" + _BEARER_HINT + ")")
        client, role, prefix, active = hit
        if not active:
            return AuthFailure("revoked_key", f"the API key {prefix}... was revoked")
        return Identity(client, role, "key", prefix)

    def _safe_reload(self) -> None:
        try:
            self.reload()
        except Exception as exc:  # keep the last good table; say so once per reload
            log.warning("cannot re-read the API keys: %s", type(exc).__name__)
            self._loaded = time.monotonic()

    def identify_headers(self, headers: Iterable[tuple[bytes, bytes]], label: str | None = None
                         ) -> Identity | AuthFailure | None:
        """The identity from raw ASGI headers: a key, or (open mode) the label."""
        token = None
        for k, v in headers:
            if k == b"authorization":
                scheme, _, cred = v.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and cred.strip():
                    token = cred.strip()
                elif token is None:
                    token = ""  # a malformed Authorization header
            elif k == b"x-api-key" and not token:
                token = v.decode("latin-1").strip()
        if token:
            return self.identify_token(token)
        if token == "":
            return AuthFailure("bad_authorization", "the Authorization header is not "
                               "'Bearer <key>'")
        if self.open_mode:
            return Identity(label or "anonymous", "admin", "open")
        return None

    def identify_scope(self, scope: MutableMapping[str, Any]) -> Identity | AuthFailure | None:
        """The request's identity, resolved once and kept in ``scope["state"]``."""
        state = scope.setdefault("state", {})
        if "identity" in state:
            return state["identity"]  # type: ignore[no-any-return]
        label = None
        if self.open_mode:
            for k, v in scope.get("headers", ()):
                if k == b"x-client-id":
                    label = v.decode("latin-1")
            if label is not None and not _LABEL.fullmatch(label):
                label = None
        ident = self.identify_headers(scope.get("headers", ()), label)
        state["identity"] = ident
        return ident

    def key_fn(self, scope: MutableMapping[str, Any]) -> str:
        """The rate-limit key of a request: ``key:<client>`` for a valid key,
        ``ip:<peer>`` otherwise."""
        ident = self.identify_scope(scope)
        if isinstance(ident, Identity) and ident.source != "open":
            return f"key:{ident.client}"
        peer = scope.get("client") or ("?", 0)
        return f"ip:{peer[0]}"

    def check(self, scope: MutableMapping[str, Any], roles: frozenset[str]
              ) -> tuple[int, str, str, dict[str, str]] | None:
        """None when the request may call a route open to ``roles``; else the error
        ``(status, code, message, headers)``."""
        ident = self.identify_scope(scope)
        if isinstance(ident, AuthFailure):
            return (401, ident.code, ident.message,
                    {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if ident is None:
            return (401, "missing_key", "this route needs an API key: " + _BEARER_HINT,
                    {"WWW-Authenticate": 'Bearer realm="bastion"'})
        if ident.role not in roles:
            need = " or ".join(sorted(roles - {"admin"}) or ["admin"])
            return (403, "forbidden", f"the key of {ident.client!r} has role "
                    f"{ident.role!r}; this route needs {need}", {})
        return None


_LABEL = re.compile(r"^[A-Za-z0-9_.:@\-]{1,128}$")


class RouteRules:
    """Which roles each route needs: exact ``(method, path)`` pairs and path patterns
    with ``{name}`` segments. Routes not listed are public."""

    def __init__(self, rules: Iterable[tuple[str, str, frozenset[str]]]) -> None:
        self.exact: dict[tuple[str, str], frozenset[str]] = {}
        self.patterns: list[tuple[str, re.Pattern[str], frozenset[str]]] = []
        for method, path, roles in rules:
            if "{" in path:
                rx = re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)) + "$")
                self.patterns.append((method, rx, roles))
            else:
                self.exact[(method, path)] = roles

    def roles_for(self, method: str, path: str) -> frozenset[str] | None:
        r = self.exact.get((method, path))
        if r is not None:
            return r
        for m, rx, roles in self.patterns:
            if m == method and rx.match(path):
                return roles
        return None


class AuthMiddleware:
    """Pure ASGI: the identity of every HTTP request, and a 401/403 answer (before the
    body is read) for a route whose :class:`RouteRules` entry the caller's role does not
    meet. ``render(status, code, message, details, headers) -> Response`` draws the
    answer, as for :func:`~bastion.web.errors.install_error_handlers` (default: Bastion's
    error shape); ``on_refused(status, code)`` is told (e.g. a metrics counter)."""

    def __init__(self, app: Any, *, auth: Authenticator, rules: RouteRules,
                 render: Render | None = None,
                 on_refused: Callable[[int, str], None] | None = None) -> None:
        self.app, self.auth, self.rules = app, auth, rules
        self.render = render
        self.on_refused = on_refused

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            roles = self.rules.roles_for(scope.get("method", "GET"), scope.get("path", ""))
            if roles is not None:
                err = self.auth.check(scope, roles)
                if err is not None:
                    status, code, message, headers = err
                    if self.on_refused is not None:
                        self.on_refused(status, code)
                    if self.render is None:
                        await send_error(send, status, code, message, headers=headers)
                    else:
                        await self.render(status, code, message, {}, headers)(
                            scope, receive, send)
                    return
            else:
                self.auth.identify_scope(scope)
        await self.app(scope, receive, send)


# -- FastAPI dependencies -------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="An API key: bastion keys create")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False,
                        description="The same API key, as a header")


def current_identity(request: Request) -> Identity | None:
    """The request's identity (None: no key, not open mode). A refused key is a 401."""
    auth: Authenticator = request.app.state.auth
    ident = auth.identify_scope(request.scope)
    if isinstance(ident, AuthFailure):
        raise ApiError(401, ident.code, ident.message,
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return ident


def require_role(*roles: str) -> Any:
    """A dependency: the caller's :class:`Identity`, which must have one of ``roles``
    (admin always may); 401 without a valid key, 403 for another role."""
    allowed = frozenset(roles) | ADMIN

    def dependency(request: Request, _b: Any = Depends(_bearer),
                   _k: Any = Depends(_api_key)) -> Identity:
        auth: Authenticator = request.app.state.auth
        err = auth.check(request.scope, allowed)
        if err is not None:
            status, code, message, headers = err
            raise ApiError(status, code, message, headers=headers or None)
        ident = auth.identify_scope(request.scope)
        assert isinstance(ident, Identity)
        return ident

    dependency.roles = allowed  # type: ignore[attr-defined]
    return Depends(dependency)
