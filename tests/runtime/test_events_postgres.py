"""PostgreSQL-only behaviour of the event store, against a real server (``pg_server`` in
conftest.py): the password never shows, the schema uses an identity column, durability is
set per session. The behaviour shared with SQLite is tested in test_events.py over both."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import pytest

from bastion.errors import BastionError
from bastion.store import events as ev
from bastion.store.events import EventStore, _pg_url

SECRET = "s3cr%40t-pw"  # percent-encoded "s3cr@t-pw"


def _with_password(url: str, pw: str = SECRET) -> str:
    assert url.startswith("postgresql://postgres:@")
    return url.replace("postgresql://postgres:@", f"postgresql://postgres:{pw}@", 1)


def test_pg_url_redacts_passwords_in_userinfo_and_query():
    dsn, shown, secrets = _pg_url("postgres://bob:hunter2@db.example:5433/ev?sslmode=require")
    assert dsn == "postgresql://bob:hunter2@db.example:5433/ev?sslmode=require"
    assert shown == "postgres://bob:***@db.example:5433/ev?sslmode=require"
    assert secrets == ["hunter2"]
    dsn, shown, secrets = _pg_url("postgresql+psycopg://bob@h/ev?password=p%3Aw&x=1")
    assert dsn.startswith("postgresql://bob@h/ev?password=p%3Aw")
    assert shown == "postgresql+psycopg://bob@h/ev?password=***&x=1"
    assert set(secrets) == {"p%3Aw", "p:w"}


def test_password_never_in_url_repr_or_errors(pg_url):
    url = _with_password(pg_url)
    s = EventStore(url)
    assert s.backend == "postgresql"
    for text in (s.url, repr(s), s.path):
        assert "s3cr" not in text and "postgres:***@" in text
    s.append(ev.AUDIT, {"ok": True})
    assert s.count() == 1
    bad = urlunsplit(urlsplit(url)._replace(path="/no_such_db"))
    with pytest.raises(BastionError) as info:
        EventStore(bad)
    text = f"{info.value} {info.value!r} {getattr(info.value, 'hint', '')}"
    assert "no_such_db" in text and "s3cr" not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_errors_are_scrubbed_even_when_the_server_echoes_the_password(pg_url):
    s = EventStore(_with_password(pg_url, "hunter2"))
    assert s._scrub(Exception("FATAL: role x password hunter2 wrong")) == \
        "FATAL: role x password *** wrong"


def test_schema_and_session_settings(pg_url):
    s = EventStore(pg_url)
    row = s._read("SELECT is_identity, data_type FROM information_schema.columns "
                  "WHERE table_schema = current_schema() AND table_name = 'events' "
                  "AND column_name = 'id'")
    assert row == [("YES", "bigint")]
    assert s._conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
    n = EventStore(pg_url, durability="normal")
    assert n._conn.execute("SHOW synchronous_commit").fetchone()[0] == "off"
    assert n.append(ev.AUDIT, {}) == 1 and s.last_id() == 1
    # a second store on the same database finds the tables and appends after them
    assert EventStore(pg_url).append(ev.AUDIT, {}) == 2
