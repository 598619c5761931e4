"""Quarantined clients: list them and lift a quarantine (with an audit record).

The healing controller quarantines a client (``quarantine_client``); the guard blocks
every later request of that client. Quarantine follows the client *name* the caller's
API key speaks for (see :mod:`bastion.web.auth`), never a header the caller chooses.
Lifting one is an admin's decision: the service's ``POST
/v1/clients/{client_id}/unquarantine``, the dashboard's button, or ``bastion quarantine
lift CLIENT``; each writes a ``model_change`` (``type: unquarantine``) and an ``audit``
event naming who lifted it and why.
"""

from __future__ import annotations

import json
import time
from typing import Any

from bastion.errors import BastionError
from bastion.runtime.guard import STATE_QUARANTINE
from bastion.store import events as ev

__all__ = ["lift_quarantine", "quarantined_clients"]


def quarantined_clients(store: ev.EventStore) -> list[str]:
    """The quarantined client names, sorted."""
    return sorted(str(c) for c in (store.get_state(STATE_QUARANTINE, []) or []))


def lift_quarantine(store: ev.EventStore, client_id: str, *, actor: str,
                    reason: str = "lifted by an admin") -> dict[str, Any]:
    """Lift ``client_id``'s quarantine; return the audit record written.

    Raises:
        BastionError: the client is not quarantined.
    """
    done: dict[str, bool] = {}

    def lift(ex: Any) -> None:
        row = ex("SELECT value FROM state WHERE key = ?", (STATE_QUARANTINE,)).fetchone()
        q = [str(c) for c in (json.loads(row[0]) if row else []) or []]
        done["was"] = client_id in q
        if done["was"]:
            q = sorted(c for c in q if c != client_id)
            ex(store._UPSERT, (STATE_QUARANTINE, json.dumps(q), time.time()))

    # read-modify-write in one write transaction: a quarantine the controller adds at
    # the same moment is not lost
    store._write_state(lift)
    if not done.get("was"):
        raise BastionError(f"client {client_id!r} is not quarantined",
                           hint="see bastion quarantine list")
    record = {"actor": actor, "action": "lift_quarantine", "monitor": "", "done": True,
              "decision": f"quarantine of {client_id} lifted by {actor}: {reason}",
              "client_id": client_id,
              "evidence": {"client_id": client_id, "reason": reason}}
    store.append_many([
        {"kind": ev.MODEL_CHANGE, "client_id": client_id,
         "payload": {"type": "unquarantine", "client_id": client_id, "reason": reason,
                     "actor": actor}},
        {"kind": ev.AUDIT, "client_id": client_id, "payload": record}])
    return record
