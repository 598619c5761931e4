"""API keys (hashed at rest beside the event store, SQLite and PostgreSQL), the
authenticator's answers, lifting a quarantine, and the ``bastion keys`` /
``bastion quarantine`` commands."""

from __future__ import annotations

import json

import pytest

from bastion.errors import BastionError
from bastion.runtime.guard import STATE_QUARANTINE
from bastion.runtime.quarantine import lift_quarantine, quarantined_clients
from bastion.store import events as ev
from bastion.web.auth import Authenticator, AuthFailure, Identity
from bastion.web.keys import KeyStore


def _keys_roundtrip(url: str) -> None:
    with KeyStore(url) as ks:
        token, key = ks.create("alice", "client", note="n")
        t2, _ = ks.create("ops", "admin")
        assert token.startswith("bst_") and len(token) >= 40 and key.prefix == token[:12]
        listed = ks.list()
        assert [k.client for k in listed] == ["alice", "ops"]
        assert all(token not in json.dumps(k.as_dict()) for k in listed)
        auth = Authenticator(ks, refresh_s=0.0)
        got = auth.identify_token(token)
        assert got == Identity("alice", "client", "key", key.prefix)
        assert isinstance(auth.identify_token(token + "x"), AuthFailure)
        ks.revoke(key.prefix)
        bad = auth.identify_token(token)
        assert isinstance(bad, AuthFailure) and bad.code == "revoked_key"
        assert auth.identify_token(t2).role == "admin"
        with pytest.raises(BastionError, match="no active key"):
            ks.revoke(key.prefix)
        with pytest.raises(BastionError, match="role"):
            ks.create("bob", "root")
        with pytest.raises(BastionError, match="client name"):
            ks.create("bad name!", "client")
        audits = ks.store.query(kinds=ev.AUDIT, limit=None)
        assert [a.payload["action"] for a in audits] == ["create_key", "create_key",
                                                         "revoke_key"]


def test_keys_sqlite(tmp_path):
    _keys_roundtrip(f"sqlite:///{tmp_path / 'e.db'}")
    raw = (tmp_path / "e.db").read_bytes()
    assert b"bst_" in raw  # the prefixes, for display ...
    with KeyStore(f"sqlite:///{tmp_path / 'e.db'}") as ks:  # ... but never a whole token
        assert all(len(k.prefix) == 12 for k in ks.list())


def test_keys_postgres(pg_url):
    _keys_roundtrip(pg_url)


def test_authenticator_headers_and_admin_token():
    with pytest.raises(BastionError, match="at least 32"):
        Authenticator(None, admin_token="short")
    tok = "a" * 40
    auth = Authenticator(None, admin_token=tok)
    assert auth.identify_headers([(b"authorization", f"Bearer {tok}".encode())]).role == "admin"
    assert auth.identify_headers([(b"x-api-key", tok.encode())]).role == "admin"
    assert auth.identify_headers([]) is None
    assert isinstance(auth.identify_headers([(b"authorization", b"Basic xyz")]), AuthFailure)
    assert isinstance(auth.identify_headers([(b"authorization", b"Bearer nope")]), AuthFailure)
    open_ = Authenticator(None, open_mode=True)
    assert open_.identify_headers([], "lab").client == "lab"
    assert open_.identify_scope({"headers": [(b"x-client-id", b"bad id!")]}).client == \
        "anonymous"


def test_lift_quarantine_is_audited(tmp_path):
    store = ev.EventStore(f"sqlite:///{tmp_path / 'e.db'}")
    store.set_state(STATE_QUARANTINE, ["eve", "mallory"])
    rec = lift_quarantine(store, "mallory", actor="tester", reason="false alarm")
    assert quarantined_clients(store) == ["eve"] and "false alarm" in rec["decision"]
    ch = store.query(kinds=ev.MODEL_CHANGE, limit=None)
    assert ch[-1].payload["type"] == "unquarantine" and ch[-1].client_id == "mallory"
    with pytest.raises(BastionError, match="not quarantined"):
        lift_quarantine(store, "mallory", actor="tester")
    store.close()


def test_cli_keys_and_quarantine(tmp_path, capsys):
    from bastion.cli.main import run

    url = f"sqlite:///{tmp_path / 'e.db'}"
    assert run(["keys", "create", "--client", "alice", "--role", "reader", "--events", url]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("bst_")
    assert run(["keys", "list", "--events", url]) == 0
    out = capsys.readouterr().out
    assert "alice" in out and "reader" in out and token not in out and token[:12] in out
    assert run(["keys", "create", "--client", "bob", "--role", "root", "--events", url]) == 1
    err = capsys.readouterr().err
    assert "unknown role" in err and len(err.strip().splitlines()) == 1
    assert run(["keys", "revoke", token[:12], "--events", url]) == 0
    assert "revoked" in capsys.readouterr().out
    assert run(["keys", "list", "--events", url]) == 0
    assert "alice" not in capsys.readouterr().out  # revoked keys only with --all

    with ev.EventStore(url) as store:
        store.set_state(STATE_QUARANTINE, ["mallory"])
    assert run(["quarantine", "list", "--events", url]) == 0
    assert capsys.readouterr().out.strip() == "mallory"
    assert run(["quarantine", "lift", "mallory", "--reason", "ok", "--events", url]) == 0
    assert "lifted" in capsys.readouterr().out
    assert run(["quarantine", "lift", "mallory", "--events", url]) == 1
    assert "not quarantined" in capsys.readouterr().err
