"""API keys, hashed at rest, in an ``api_keys`` table beside the event store.

A key is a random token (``bst_`` + 43 URL-safe characters, 256 bits from
:mod:`secrets`) shown once, when it is created. The table keeps only its SHA-256 digest,
a short prefix for display (``bst_Ab3dE6gH``), the client name the key speaks for, its
role (``client``, ``reader`` or ``admin``) and when it was created and revoked. The
table lives in the event store's database (same URL: SQLite or PostgreSQL), so
``bastion keys create`` in one process and ``bastion serve`` in another see the same
keys, and a revocation reaches a running service within its refresh interval.

    store = KeyStore("sqlite:///bastion-events.db")
    token, key = store.create("alice", "client")   # token: show it once, never again
    store.revoke(key.prefix)
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

from bastion.errors import BastionError
from bastion.store import events as ev

__all__ = ["ROLES", "ApiKey", "KeyStore", "digest_of", "TOKEN_PREFIX"]

#: the roles a key can have
ROLES: tuple[str, ...] = ("client", "reader", "admin")
TOKEN_PREFIX = "bst_"
#: characters of the token kept (in clear) to name a key: ``bst_`` + 8 random ones
PREFIX_LEN = 12
CLIENT_PATTERN = re.compile(r"^[A-Za-z0-9_.:@\-]{1,128}$")

_DDL = """CREATE TABLE IF NOT EXISTS api_keys (
        prefix VARCHAR(32) PRIMARY KEY,
        digest VARCHAR(64) NOT NULL UNIQUE,
        client VARCHAR(128) NOT NULL,
        role VARCHAR(16) NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION,
        note TEXT
    )"""


def digest_of(token: str | bytes) -> str:
    """The SHA-256 hex digest a token is stored (and looked up) by."""
    b = token.encode("utf-8") if isinstance(token, str) else token
    return hashlib.sha256(b).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One stored key (never the token itself)."""

    prefix: str
    client: str
    role: str
    created_at: float
    revoked_at: float | None = None
    note: str | None = None
    digest: str = ""

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, without the digest."""
        d = asdict(self)
        d.pop("digest")
        d["active"] = self.active
        return d


class KeyStore:
    """The ``api_keys`` table of the event store at ``url`` (or of an open
    :class:`~bastion.store.events.EventStore`)."""

    def __init__(self, store: ev.EventStore | str) -> None:
        self._own = isinstance(store, str)
        self.store = ev.EventStore(store) if isinstance(store, str) else store
        # the event store's write transaction (writers serialised across processes) and
        # its reader connection: the same SQLite/PostgreSQL handling as the events
        self.store._write_state(lambda ex: ex(_DDL))

    def close(self) -> None:
        if self._own:
            self.store.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- writing --------------------------------------------------------------------
    def create(self, client: str, role: str, *, note: str | None = None) -> tuple[str, ApiKey]:
        """A new key for ``client`` with ``role``: ``(token, key)``. The token is not
        stored anywhere: hand it to the client now."""
        if role not in ROLES:
            raise BastionError(f"unknown role {role!r}", hint=f"use one of {', '.join(ROLES)}")
        if not CLIENT_PATTERN.fullmatch(client or ""):
            raise BastionError(f"client name {client!r} is not valid",
                               hint="1-128 characters from A-Z a-z 0-9 _ . : @ -")
        if note is not None and len(note) > 500:
            raise BastionError("the note is longer than 500 characters")
        for _ in range(5):
            token = TOKEN_PREFIX + secrets.token_urlsafe(32)
            key = ApiKey(prefix=token[:PREFIX_LEN], client=client, role=role,
                         created_at=time.time(), note=note, digest=digest_of(token))

            def insert(ex: Any, k: ApiKey = key) -> bool:
                if ex("SELECT 1 FROM api_keys WHERE prefix = ?", (k.prefix,)).fetchone():
                    return False
                ex("INSERT INTO api_keys (prefix, digest, client, role, created_at, "
                   "revoked_at, note) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (k.prefix, k.digest, k.client, k.role, k.created_at, None, k.note))
                return True

            if self.store._write_state(insert):
                self.store.append(ev.AUDIT, {"actor": "keys", "action": "create_key",
                                             "done": True, "monitor": "",
                                             "decision": f"key {key.prefix} created for "
                                             f"{client} ({role})",
                                             "evidence": {"prefix": key.prefix, "role": role}},
                                  client_id=client)
                return token, key
        raise BastionError("could not create a unique key prefix (retry)")

    def revoke(self, prefix: str | None = None, *, client: str | None = None) -> list[ApiKey]:
        """Revoke the key named by ``prefix``, or every active key of ``client``; return
        what was revoked (an unknown prefix or client is an error)."""
        if (prefix is None) == (client is None):
            raise BastionError("name a key prefix or a client to revoke")
        now = time.time()
        col, val = ("prefix", prefix) if prefix is not None else ("client", client)

        def rev(ex: Any) -> list[str]:
            rows = ex(f"SELECT prefix FROM api_keys WHERE {col} = ? AND revoked_at IS NULL",
                      (val,)).fetchall()
            for (p,) in rows:
                ex("UPDATE api_keys SET revoked_at = ? WHERE prefix = ?", (now, p))
            return [str(r[0]) for r in rows]

        done = self.store._write_state(rev)
        if not done:
            what = f"key {prefix!r}" if prefix is not None else f"client {client!r}"
            raise BastionError(f"no active key for {what}",
                               hint="see bastion keys list")
        self.store.append(ev.AUDIT, {"actor": "keys", "action": "revoke_key", "done": True,
                                     "monitor": "", "decision": f"revoked {', '.join(done)}",
                                     "evidence": {"prefixes": done}},
                          client_id=client)
        return [k for k in self.list(include_revoked=True) if k.prefix in done]

    # -- reading --------------------------------------------------------------------
    def list(self, *, include_revoked: bool = True) -> list[ApiKey]:
        """Every key, oldest first."""
        rows = self.store._read("SELECT prefix, digest, client, role, created_at, revoked_at, "
                                "note FROM api_keys ORDER BY created_at, prefix")
        out = [ApiKey(prefix=str(r[0]), digest=str(r[1]), client=str(r[2]), role=str(r[3]),
                      created_at=float(r[4]),
                      revoked_at=None if r[5] is None else float(r[5]), note=r[6])
               for r in rows]
        return out if include_revoked else [k for k in out if k.active]

    def by_digest(self) -> dict[str, ApiKey]:
        """Every key by its digest (revoked ones too, so a revoked key gets its own
        answer)."""
        return {k.digest: k for k in self.list()}
