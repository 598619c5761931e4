"""Quarantined clients: ``GET /v1/clients/quarantined`` (reader) and ``POST
/v1/clients/{client_id}/unquarantine`` (admin, audited)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path

from bastion.errors import BastionError
from bastion.service import schemas as s
from bastion.service.deps import get_service
from bastion.web.auth import Identity, require_role
from bastion.web.errors import AUTH_RESPONSES, ApiError, ErrorResponse

router = APIRouter()


@router.get("/v1/clients/quarantined", response_model=s.QuarantineResponse,
            responses=AUTH_RESPONSES)
def quarantined(ident: Identity = require_role("reader"),
                svc: Any = Depends(get_service)) -> s.QuarantineResponse:
    return s.QuarantineResponse(quarantined=svc.quarantined())


@router.post("/v1/clients/{client_id}/unquarantine", response_model=s.UnquarantineResponse,
             responses={**AUTH_RESPONSES, 404: {"model": ErrorResponse,
                                                "description": "Client not quarantined"}})
def unquarantine(client_id: str = Path(..., pattern=s.CLIENT_ID_PATTERN),
                 body: s.UnquarantineRequest | None = None,
                 ident: Identity = require_role("admin"),
                 svc: Any = Depends(get_service)) -> s.UnquarantineResponse:
    b = body or s.UnquarantineRequest()
    actor = f"api:{ident.key_prefix or ident.source}"
    try:
        svc.lift_quarantine(client_id, actor=actor, reason=b.reason)
    except BastionError as exc:
        raise ApiError(404, "not_quarantined", str(exc)) from None
    return s.UnquarantineResponse(client_id=client_id, lifted=True,
                                  quarantined=svc.quarantined())
