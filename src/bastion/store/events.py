"""The event store: every prediction, verdict, feedback label, alert, model change and
healing step, in order, durable.

:class:`EventStore` keeps events in one SQL table (plus a small key/value ``state``
table the guard and the healing controller share: quarantined clients, where traffic
goes, the controller's cursor). Two backends, chosen by URL, behind one API:

- ``sqlite:///PATH`` (the default): SQLite in WAL mode with ``synchronous=FULL``.
- ``postgresql://user:password@host:port/db`` (also ``postgres://`` and
  ``postgresql+psycopg://``): PostgreSQL through psycopg 3 (``pip install
  'bastion[postgres]'``), with ``synchronous_commit=on`` for the session. The password
  never appears in :attr:`EventStore.url`, the repr or error messages.

**Durability.** ``append``/``append_many`` return only after their transaction is
committed and flushed to disk, so an acknowledged event survives a crash of the process
(or of the machine) and a restart. Concurrent callers share commits (*group commit*): a
caller queues its rows; one that finds no commit in progress becomes the leader, writes
every queued row in one transaction (one fsync), wakes the callers it wrote for (each
with its own ids) and hands the lead to the first caller that queued meanwhile. A lone
caller pays one fsync per call as before; N concurrent callers pay about one per group.
``durability="normal"`` (opt-in) trades the power-loss guarantee for speed:
SQLite ``synchronous=NORMAL`` (a commit reaches the OS but is fsynced only at checkpoints:
it survives a crash of the process, not of the machine or a power loss), PostgreSQL
``synchronous_commit=off`` (survives a crash of the Bastion process; a crash of the
database server or the machine can lose the last fraction of a second of commits).

**Order.** Ids increase in commit order: writers are serialised (SQLite's write lock,
``BEGIN IMMEDIATE``; on PostgreSQL a transaction-level advisory lock), so a reader that
has seen id ``n`` will never later see a new event with an id below ``n`` (the monitors
and the healing controller read with ``after_id`` cursors).

**Sharing.** Several threads may share one store (a writer connection behind a lock, and
a separate reader connection so reads do not wait for a commit's fsync); several processes
may open the same file or database (on SQLite, WAL lets readers run beside the writer and
writers wait up to ``busy_timeout_ms``).

The schema is plain SQL (``BIGINT``/``DOUBLE PRECISION``/``VARCHAR``/``TEXT`` columns,
payload as JSON text, no backend-only functions in the queries); only the id column
(:data:`SCHEMA` vs :data:`PG_SCHEMA`) and the placeholders differ.

Event kinds are the constants below (``PREDICTION`` ...); ``payload`` is any
JSON-serialisable dict.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

import numpy as np
import orjson

from bastion.errors import BastionError

#: one answered input: label, probabilities, verdict, reasons, which model answered
PREDICTION = "prediction"
#: a flagged or blocked input (written beside its prediction event)
VERDICT = "verdict"
#: a true label for an earlier prediction (``request_id`` names it)
FEEDBACK = "feedback"
#: a monitor signal that fired
ALERT = "alert"
#: an alias moved, traffic switched, a client was quarantined
MODEL_CHANGE = "model_change"
#: one run of the healing controller, with what it saw and did
HEALING_STEP = "healing_step"
#: a decision with its evidence (monitor, numbers, gate)
AUDIT = "audit"
#: one attempt to deliver an alert to a receiver (see :mod:`bastion.runtime.alerting`)
DELIVERY = "delivery"
#: the attribution of a flagged input, beside its nearest clean reference
EXPLANATION = "explanation"

EVENT_KINDS: tuple[str, ...] = (
    PREDICTION, VERDICT, FEEDBACK, ALERT, MODEL_CHANGE, HEALING_STEP, AUDIT, DELIVERY,
    EXPLANATION,
)

DEFAULT_URL = "sqlite:///bastion-events.db"

#: ``durability=`` values: ``"full"`` (default, survives power loss) or ``"normal"``.
DURABILITY_LEVELS: tuple[str, ...] = ("full", "normal")

_EVENT_COLUMNS = """
        ts DOUBLE PRECISION NOT NULL,
        kind VARCHAR(32) NOT NULL,
        client_id VARCHAR(256),
        request_id VARCHAR(256),
        model_version VARCHAR(64),
        payload TEXT NOT NULL
    )"""
_INDEXES_AND_STATE: tuple[str, ...] = (
    "CREATE INDEX IF NOT EXISTS ix_events_kind_id ON events (kind, id)",
    "CREATE INDEX IF NOT EXISTS ix_events_ts ON events (ts)",
    "CREATE INDEX IF NOT EXISTS ix_events_client_id ON events (client_id, id)",
    "CREATE INDEX IF NOT EXISTS ix_events_request_id ON events (request_id)",
    """CREATE TABLE IF NOT EXISTS state (
        key VARCHAR(128) PRIMARY KEY,
        value TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL
    )""",
)

#: The SQLite DDL.
SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS events (\n        id INTEGER PRIMARY KEY AUTOINCREMENT,"
    + _EVENT_COLUMNS,
    *_INDEXES_AND_STATE,
)
#: The PostgreSQL DDL: the same but for the identity column.
PG_SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS events (\n"
    "        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY," + _EVENT_COLUMNS,
    *_INDEXES_AND_STATE,
)

#: The longest ``client_id``/``request_id``/``model_version`` (the column sizes; PostgreSQL
#: enforces them, so both backends check them before writing).
_MAX_LEN = {"client_id": 256, "request_id": 256, "model_version": 64}
#: Key of the PostgreSQL advisory lock that serialises writers (any fixed 64-bit number).
_PG_WRITE_LOCK = 0x62617374696F6E  # "bastion"


@dataclass(frozen=True)
class Event:
    """One stored event. ``ts`` is seconds since the epoch (UTC); ``at`` is ISO 8601."""

    id: int
    ts: float
    kind: str
    payload: dict[str, Any] = field(default_factory=dict)
    client_id: str | None = None
    request_id: str | None = None
    model_version: str | None = None

    @property
    def at(self) -> str:
        return datetime.fromtimestamp(self.ts, UTC).isoformat(timespec="milliseconds")

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for the service and reports)."""
        return {"id": self.id, "ts": self.ts, "at": self.at, "kind": self.kind,
                "client_id": self.client_id, "request_id": self.request_id,
                "model_version": self.model_version, "payload": self.payload}


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple | set | frozenset):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _clean(o: Any) -> Any:
    """Replace non-finite floats by None so the stored JSON is standard JSON."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_clean(v) for v in o]
    return o


def _dumps(payload: Mapping[str, Any]) -> str:
    if not isinstance(payload, Mapping):
        raise BastionError(f"an event payload must be a dict, got {type(payload).__name__}")
    try:
        # the common case (a dict with string keys) in one fast pass; orjson writes a
        # non-finite float as null, as the cleaning below does
        return orjson.dumps(payload, default=_json_default).decode()
    except (TypeError, ValueError):  # an odd key or container: the slow path below
        pass
    try:
        text = json.dumps(dict(payload), default=_json_default, allow_nan=True)
        return json.dumps(_clean(json.loads(text)), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BastionError(f"event payload is not JSON serialisable: {exc}",
                           hint="pass numbers, strings, lists and dicts") from None


def _check_kind(kind: str) -> str:
    if kind not in EVENT_KINDS:
        raise BastionError(f"unknown event kind {kind!r}",
                           hint=f"use one of {', '.join(EVENT_KINDS)}")
    return kind


def _opt_str(v: Any, name: str) -> str | None:
    """``v`` as a column value: None or a string that fits its column."""
    if v is None:
        return None
    s = str(v)
    if len(s) > _MAX_LEN[name]:
        raise BastionError(f"{name} is longer than {_MAX_LEN[name]} characters",
                           hint="use a shorter identifier")
    if "\x00" in s:
        raise BastionError(f"{name} contains a NUL character")
    return s


def _row(e: Mapping[str, Any], now: float) -> tuple[Any, ...]:
    """One event as an INSERT row, validated and serialised (raises BastionError)."""
    if not isinstance(e, Mapping):
        raise BastionError(f"an event must be a dict, got {type(e).__name__}")
    if "kind" not in e:
        raise BastionError("every event needs a kind")
    ts = e.get("ts")
    try:
        t = float(ts) if ts else now
    except (TypeError, ValueError):
        raise BastionError(f"an event's ts must be epoch seconds, got {ts!r}") from None
    if not math.isfinite(t):
        raise BastionError(f"an event's ts must be finite, got {ts!r}")
    return (t, _check_kind(str(e["kind"])),
            _opt_str(e.get("client_id"), "client_id"),
            _opt_str(e.get("request_id"), "request_id"),
            _opt_str(e.get("model_version"), "model_version"),
            _dumps(e.get("payload") or {}))


def _sqlite_path(url: str) -> str:
    if not url.startswith("sqlite:///"):
        raise BastionError("unsupported event store URL "
                           f"{url.split(':', 1)[0] + ':...' if ':' in url else repr(url)}",
                           hint="use sqlite:///relative/path.db, sqlite:////abs/path.db or "
                           "postgresql://user:password@host:port/db")
    path = url[len("sqlite:///"):]
    if not path:
        raise BastionError("the event store URL names no file", hint="sqlite:///events.db")
    if path == ":memory:":
        return path
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    return str(p)


_PG_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg3")


def _pg_url(url: str) -> tuple[str, str, list[str]]:
    """``(dsn for psycopg, the URL with its password replaced by ***, the secrets)``."""
    parts = urlsplit(url)
    secrets: list[str] = []
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        user, _, pw = userinfo.partition(":")
        if pw:
            secrets.append(pw)
        netloc = f"{user}:***@{hostport}"
    query = parts.query
    if query:
        kept = []
        for item in query.split("&"):
            k, eq, v = item.partition("=")
            if k.lower() == "password" and eq:
                if v:
                    secrets.append(v)
                item = f"{k}=***"
            kept.append(item)
        query = "&".join(kept)
    dsn = urlunsplit(parts._replace(scheme="postgresql"))
    shown = urlunsplit(SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment))
    secrets += [unquote(s) for s in secrets if unquote(s) != s]
    return dsn, shown, secrets


class _Pending:
    """One caller's rows waiting for a group commit; ``ids`` or ``error`` once done."""

    __slots__ = ("rows", "ids", "error", "done", "wake")

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows
        self.ids: list[int] | None = None
        self.error: BaseException | None = None
        self.done = False
        #: set when ``done``, or when this caller is made the next leader
        self.wake = threading.Event()


class EventStore:
    """A durable, append-only log of Bastion events; see the module docs.

    Args:
        url: ``sqlite:///PATH`` (relative to the working folder) or ``sqlite:////ABS``;
            ``sqlite:///:memory:`` for a throw-away store; or
            ``postgresql://user:password@host:port/db`` (needs ``bastion[postgres]``).
        busy_timeout_ms: how long a writer waits for another process's write lock
            (SQLite ``busy_timeout``; PostgreSQL ``lock_timeout``).
        durability: ``"full"`` (default): an acknowledged event survives a crash of the
            machine or a power loss. ``"normal"``: it survives a crash of the Bastion
            process only (SQLite ``synchronous=NORMAL``, PostgreSQL
            ``synchronous_commit=off``); faster on slow disks.
    """

    def __init__(self, url: str = DEFAULT_URL, *, busy_timeout_ms: int = 10_000,
                 durability: str = "full") -> None:
        if durability not in DURABILITY_LEVELS:
            raise BastionError(f"unknown durability {durability!r}",
                               hint=f"use one of {', '.join(DURABILITY_LEVELS)}")
        url = str(url)
        self.durability = durability
        self._secrets: list[str] = []
        self._lock = threading.RLock()  # the writer connection
        self._qlock = threading.Lock()  # the group-commit queue and the leader flag
        self._queue: list[_Pending] = []
        self._leader = False  # a caller is writing a group (or being handed the lead)
        self._closed = False
        #: failed writes so far (the service's ``bastion_event_store_errors_total``)
        self.write_errors = 0
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme in _PG_SCHEMES:
            self.backend = "postgresql"
            dsn, self.url, self._secrets = _pg_url(url)
            self.path = self.url
            self._open_postgres(dsn, busy_timeout_ms)
        else:
            self.backend = "sqlite"
            self.url = url
            self.path = _sqlite_path(url)
            self._open_sqlite(busy_timeout_ms)

    # -- opening --------------------------------------------------------------------
    def _open_sqlite(self, busy_timeout_ms: int) -> None:
        def connect() -> sqlite3.Connection:
            c = sqlite3.connect(self.path, timeout=busy_timeout_ms / 1000,
                                check_same_thread=False, isolation_level=None)
            c.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            return c

        self._errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
        try:
            self._conn: Any = connect()
            if self.path != ":memory:":
                mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise BastionError(f"cannot put {self.path} in WAL mode (got {mode})",
                                       hint="keep the event store on a local disk")
            self._conn.execute(f"PRAGMA synchronous = {self.durability.upper()}")
            with self._tx():
                for stmt in SCHEMA:
                    self._conn.execute(stmt)
            if self.path == ":memory:":  # one database per connection: share it
                self._rconn: Any = self._conn
                self._rlock: Any = self._lock
            else:
                self._rconn = connect()
                self._rconn.execute("PRAGMA query_only = ON")
                self._rlock = threading.Lock()
        except sqlite3.Error as exc:
            raise BastionError(f"cannot open the event store {self.path}: {exc}",
                               hint="check the path and its permissions") from None

    def _open_postgres(self, dsn: str, busy_timeout_ms: int) -> None:
        try:
            import psycopg
        except ImportError:
            raise BastionError("a PostgreSQL event store needs psycopg 3",
                               hint="pip install 'bastion[postgres]'") from None
        self._errors = (psycopg.Error,)
        timeout = max(2, math.ceil(busy_timeout_ms / 1000))
        sync = "on" if self.durability == "full" else "off"
        try:
            self._conn = psycopg.connect(dsn, autocommit=True, connect_timeout=timeout)
            self._conn.execute(f"SET synchronous_commit = {sync}")
            self._conn.execute(f"SET lock_timeout = {int(busy_timeout_ms)}")
            with self._tx():
                for stmt in PG_SCHEMA:
                    self._conn.execute(stmt)
            self._rconn = psycopg.connect(dsn, autocommit=True, connect_timeout=timeout)
            self._rlock = threading.Lock()
        except psycopg.Error as exc:
            conn = getattr(self, "_conn", None)
            if conn is not None:
                conn.close()
            raise BastionError(f"cannot open the event store {self.url}: {self._scrub(exc)}",
                               hint="check the URL, that the server runs and the user's "
                               "rights") from None

    # -- plumbing -------------------------------------------------------------------
    def _scrub(self, exc: BaseException | str) -> str:
        """An error's text with any password replaced by ``***``."""
        text = str(exc).strip()
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def _q(self, sql: str) -> str:
        """``sql`` with this backend's placeholders (the queries here use ``?``)."""
        return sql.replace("?", "%s") if self.backend == "postgresql" else sql

    class _Tx:
        """A write transaction on the writer connection, writers serialised across
        processes (SQLite ``BEGIN IMMEDIATE``, PostgreSQL advisory lock)."""

        def __init__(self, store: EventStore) -> None:
            self.store = store

        def __enter__(self) -> Any:
            s = self.store
            s._lock.acquire()
            try:
                if s._closed:
                    raise BastionError("the event store is closed")
                if s.backend == "postgresql":
                    s._conn.execute("BEGIN")
                    try:
                        s._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_WRITE_LOCK,))
                    except BaseException:
                        s._conn.execute("ROLLBACK")
                        raise
                else:
                    s._conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                s._lock.release()
                raise
            return s._conn

        def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
            conn = self.store._conn
            try:
                if et is None:
                    try:
                        conn.execute("COMMIT")
                    except BaseException:
                        try:  # SQLite keeps the transaction open when COMMIT fails
                            conn.execute("ROLLBACK")
                        except Exception:  # noqa: S110 - the COMMIT error is the one to report
                            pass
                        raise
                else:
                    try:
                        conn.execute("ROLLBACK")
                    except Exception:  # noqa: S110 - the original error is the one to report
                        pass
            finally:
                self.store._lock.release()

    def _tx(self) -> EventStore._Tx:
        return EventStore._Tx(self)

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Rows of a SELECT on the reader connection (errors as BastionError)."""
        with self._rlock:
            if self._closed:
                raise BastionError("the event store is closed")
            try:
                return list(self._rconn.execute(self._q(sql), tuple(args)).fetchall())
            except self._errors as exc:
                raise BastionError(f"cannot read the event store {self.path}: "
                                   f"{self._scrub(exc)}") from None

    def close(self) -> None:
        """Close the connections (later calls raise)."""
        with self._lock, self._rlock:
            if not self._closed:
                self._closed = True
                if self._rconn is not self._conn:
                    self._rconn.close()
                self._conn.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventStore({self.url!r})"

    # -- writing --------------------------------------------------------------------
    def append(
        self,
        kind: str,
        payload: Mapping[str, Any] | None = None,
        *,
        client_id: str | None = None,
        request_id: str | None = None,
        model_version: str | int | None = None,
        ts: float | None = None,
    ) -> int:
        """Store one event; return its id once it is durably committed."""
        return self.append_many([{
            "kind": kind, "payload": payload or {}, "client_id": client_id,
            "request_id": request_id, "model_version": model_version, "ts": ts,
        }])[0]

    def append_many(self, events: Iterable[Mapping[str, Any]]) -> list[int]:
        """Store several events in one transaction (all or none); return their ids, in
        order, once they are durably committed.

        Each item is a dict with ``kind`` and optionally ``payload``, ``client_id``,
        ``request_id``, ``model_version``, ``ts``. Every item is checked and serialised
        before anything is written, so a bad item raises :class:`BastionError` and
        stores nothing. Concurrent calls may share one transaction (group commit); each
        gets its own ids, and a write error reaches only the callers whose rows it lost.
        """
        now = time.time()
        rows = [_row(e, now) for e in events]
        if not rows:
            return []
        if self._closed:
            raise BastionError("the event store is closed")
        p = _Pending(rows)
        with self._qlock:
            self._queue.append(p)
            lead = not self._leader
            self._leader = True
        if not lead:
            p.wake.wait()  # until a leader has written our rows, or hands us the lead
        if not p.done:
            group: list[_Pending] = []
            try:
                with self._qlock:
                    group, self._queue = self._queue, []
                self._write_group(group)
            finally:
                for g in group:
                    if g.ids is None and g.error is None:
                        g.error = BastionError("the event store's writer was interrupted"
                                               " before committing")
                    g.done = True
                    g.wake.set()
                with self._qlock:  # hand the lead to the first caller queued meanwhile
                    if self._queue:
                        self._queue[0].wake.set()
                    else:
                        self._leader = False
        if p.error is not None:
            raise p.error
        assert p.ids is not None
        return p.ids

    def _write_group(self, group: list[_Pending]) -> None:
        """Commit every caller's rows in one transaction; if that fails, commit each
        caller's rows in its own so one caller's failure does not fail the others."""
        try:
            self._commit_rows(group)
        except Exception as exc:
            if len(group) == 1:
                group[0].error = self._write_error(exc)
                return
            for p in group:
                try:
                    self._commit_rows([p])
                except Exception as e:
                    p.error = self._write_error(e)

    def _commit_rows(self, group: list[_Pending]) -> None:
        with self._tx() as conn:
            ids = [self._insert(conn, p.rows) for p in group]
        for p, got in zip(group, ids, strict=True):
            p.ids = got

    _INSERT = ("INSERT INTO events (ts, kind, client_id, request_id, model_version, payload) "
               "VALUES (?, ?, ?, ?, ?, ?)")

    def _insert(self, conn: Any, rows: list[tuple[Any, ...]]) -> list[int]:
        if self.backend == "postgresql":
            cur = conn.cursor()
            cur.executemany(self._q(self._INSERT) + " RETURNING id", rows, returning=True)
            ids = []
            while True:
                ids.append(int(cur.fetchone()[0]))
                if not cur.nextset():
                    break
            return ids
        return [int(conn.execute(self._INSERT, r).lastrowid) for r in rows]

    def _write_error(self, exc: BaseException) -> BastionError:
        self.write_errors += 1
        if isinstance(exc, BastionError):
            return exc
        return BastionError(f"cannot write to the event store {self.path}: "
                            f"{self._scrub(exc)}", hint="check disk space and permissions")

    # -- reading --------------------------------------------------------------------
    @staticmethod
    def _where(
        kinds: Sequence[str] | str | None, since: float | None, until: float | None,
        client_id: str | None, request_id: str | Sequence[str] | None, after_id: int | None,
        before_id: int | None = None,
    ) -> tuple[str, list[Any]]:
        conds: list[str] = []
        args: list[Any] = []
        if kinds is not None:
            ks = [kinds] if isinstance(kinds, str) else list(kinds)
            for k in ks:
                _check_kind(k)
            if not ks:
                return " WHERE 1 = 0", []
            conds.append(f"kind IN ({', '.join('?' for _ in ks)})")
            args += ks
        if since is not None:
            conds.append("ts >= ?")
            args.append(float(since))
        if until is not None:
            conds.append("ts < ?")
            args.append(float(until))
        if client_id is not None:
            conds.append("client_id = ?")
            args.append(str(client_id))
        if request_id is not None:
            rs = [request_id] if isinstance(request_id, str) else [str(r) for r in request_id]
            if not rs:
                return " WHERE 1 = 0", []
            conds.append(f"request_id IN ({', '.join('?' for _ in rs)})")
            args += rs
        if after_id is not None:
            conds.append("id > ?")
            args.append(int(after_id))
        if before_id is not None:
            conds.append("id <= ?")
            args.append(int(before_id))
        return (" WHERE " + " AND ".join(conds)) if conds else "", args

    def query(
        self,
        *,
        kinds: Sequence[str] | str | None = None,
        since: float | None = None,
        until: float | None = None,
        client_id: str | None = None,
        request_id: str | Sequence[str] | None = None,
        after_id: int | None = None,
        before_id: int | None = None,
        limit: int | None = 1000,
        newest_first: bool = False,
    ) -> list[Event]:
        """Events matching every given filter, oldest first (or newest first).

        ``since``/``until`` are epoch seconds (``until`` exclusive); ``after_id`` is
        exclusive and ``before_id`` inclusive (for paging and replay); ``limit=None``
        returns all. With ``newest_first`` the *latest* ``limit`` events are returned,
        newest first.
        """
        where, args = self._where(kinds, since, until, client_id, request_id, after_id,
                                  before_id)
        sql = ("SELECT id, ts, kind, client_id, request_id, model_version, payload "
               f"FROM events{where} ORDER BY id {'DESC' if newest_first else 'ASC'}")
        if limit is not None:
            if int(limit) < 0:
                raise BastionError(f"limit must be >= 0, got {limit}")
            sql += " LIMIT ?"
            args.append(int(limit))
        rows = self._read(sql, args)
        return [Event(id=int(r[0]), ts=float(r[1]), kind=str(r[2]), client_id=r[3],
                      request_id=r[4], model_version=r[5], payload=json.loads(r[6]))
                for r in rows]

    def recent(self, kinds: Sequence[str] | str, n: int, *, after_id: int | None = None,
               before_id: int | None = None) -> list[Event]:
        """The latest ``n`` events of ``kinds`` (with ``after_id < id <= before_id``),
        oldest first."""
        return list(reversed(self.query(kinds=kinds, after_id=after_id, before_id=before_id,
                                        limit=n, newest_first=True)))

    def count(
        self,
        *,
        kinds: Sequence[str] | str | None = None,
        since: float | None = None,
        until: float | None = None,
        client_id: str | None = None,
        request_id: str | Sequence[str] | None = None,
        after_id: int | None = None,
        before_id: int | None = None,
    ) -> int:
        """How many events match (same filters as :meth:`query`)."""
        where, args = self._where(kinds, since, until, client_id, request_id, after_id,
                                  before_id)
        return int(self._read(f"SELECT COUNT(*) FROM events{where}", args)[0][0])

    def last_id(self) -> int:
        """The id of the newest event (0 when empty)."""
        return int(self._read("SELECT MAX(id) FROM events")[0][0] or 0)

    # -- shared state ---------------------------------------------------------------
    def get_state(self, key: str, default: Any = None) -> Any:
        """A JSON value the guard and the controller share (``default`` when unset)."""
        rows = self._read("SELECT value FROM state WHERE key = ?", (str(key),))
        return default if not rows else json.loads(rows[0][0])

    _UPSERT = ("INSERT INTO state (key, value, ts) VALUES (?, ?, ?) ON CONFLICT (key) "
               "DO UPDATE SET value = excluded.value, ts = excluded.ts")

    def _write_state(self, fn: Any) -> Any:
        """Run ``fn(execute)`` in a write transaction (errors as BastionError)."""
        try:
            with self._tx() as conn:
                return fn(lambda sql, args=(): conn.execute(self._q(sql), args))
        except self._errors as exc:
            raise self._write_error(exc) from None

    def set_state(self, key: str, value: Any) -> None:
        """Set a shared JSON value durably (insert or replace)."""
        try:
            text = json.dumps(_clean(json.loads(json.dumps(value, default=_json_default))))
        except (TypeError, ValueError) as exc:
            raise BastionError(f"state value is not JSON serialisable: {exc}") from None
        self._write_state(lambda ex: ex(self._UPSERT, (str(key), text, time.time())))

    def acquire_lease(self, key: str, owner: str, *, ttl_s: float = 600.0) -> bool:
        """Take the lease ``key`` for ``owner`` unless another owner holds an unexpired one
        (atomic across processes); return whether ``owner`` holds it now."""
        now = time.time()
        k = f"lease:{key}"

        def take(ex: Any) -> bool:
            row = ex("SELECT value FROM state WHERE key = ?", (k,)).fetchone()
            if row is not None:
                cur = json.loads(row[0])
                if cur.get("owner") != owner and float(cur.get("until", 0)) > now:
                    return False
            ex(self._UPSERT, (k, json.dumps({"owner": owner, "until": now + ttl_s}), now))
            return True

        return bool(self._write_state(take))

    def release_lease(self, key: str, owner: str) -> None:
        """Give the lease ``key`` back (only its owner can)."""
        k = f"lease:{key}"

        def give(ex: Any) -> None:
            row = ex("SELECT value FROM state WHERE key = ?", (k,)).fetchone()
            if row is not None and json.loads(row[0]).get("owner") == owner:
                ex("DELETE FROM state WHERE key = ?", (k,))

        self._write_state(give)
