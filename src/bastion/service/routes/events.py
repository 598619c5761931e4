"""``GET /v1/events``: reader (payloads without inputs or client text); the inputs
(``include_inputs=true``) only for admin."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Query

from bastion.service import schemas as s
from bastion.service.deps import event_out, get_service
from bastion.store import events as ev
from bastion.web.auth import Identity, require_role
from bastion.web.errors import AUTH_RESPONSES, ApiError

router = APIRouter()
#: the largest id/limit a query parameter may carry (a 64-bit column; larger is a 422)
MAX_ID = 2**63 - 1


def parse_since(since: str | None) -> float | None:
    if since is None or since == "":
        return None
    try:
        t = float(since)
        if t != t or t in (float("inf"), float("-inf")):
            raise ValueError
        return t
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(422, "bad_since", f"since={since[:64]!r} is neither epoch seconds nor "
                       "an ISO 8601 time", {"example": "2026-01-01T00:00:00Z"}) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


@router.get("/v1/events", response_model=s.EventsResponse, responses=AUTH_RESPONSES)
def events(
    kind: list[str] | None = Query(default=None, description="Event kind(s).",
                                   max_length=20),
    client_id: str | None = Query(default=None, pattern=s.CLIENT_ID_PATTERN),
    request_id: str | None = Query(default=None, max_length=256, pattern=r"^[^\x00]*$"),
    since: str | None = Query(default=None, max_length=64,
                              description="Epoch seconds or ISO 8601."),
    after_id: int | None = Query(default=None, ge=0, le=MAX_ID),
    limit: int = Query(default=100, ge=1, le=1000),
    order: str = Query(default="desc", pattern="^(asc|desc)$"),
    include_inputs: bool = Query(default=False, description="Admin only: the inputs and "
                                 "client text in the payloads."),
    ident: Identity = require_role("reader"),
    svc: Any = Depends(get_service),
) -> s.EventsResponse:
    if include_inputs and ident.role != "admin":
        raise ApiError(403, "forbidden", "include_inputs=true needs an admin key (a reader "
                       "sees events without inputs or client text)")
    kinds = None
    if kind:
        kinds = [k for part in kind for k in part.split(",") if k]
        bad = [k[:40] for k in kinds if k not in ev.EVENT_KINDS]
        if bad:
            raise ApiError(422, "bad_kind", f"unknown event kind(s) {bad[:5]}; use "
                           f"{', '.join(ev.EVENT_KINDS)}", {"kinds": list(ev.EVENT_KINDS)})
    rows = svc.store.query(kinds=kinds, client_id=client_id, request_id=request_id,
                           since=parse_since(since), after_id=after_id, limit=limit,
                           newest_first=order == "desc")
    out = [event_out(e, include_inputs=include_inputs) for e in rows]
    return s.EventsResponse(count=len(out), events=out)
