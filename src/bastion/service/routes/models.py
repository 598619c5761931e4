"""``GET /v1/models`` (reader) and ``POST /v1/models/promote|rollback`` (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from bastion.errors import BastionError
from bastion.service import schemas as s
from bastion.service.deps import get_service
from bastion.web.auth import Identity, require_role
from bastion.web.errors import AUTH_RESPONSES, ApiError, ErrorResponse

router = APIRouter()
_ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES, 404: {"model": ErrorResponse, "description": "Unknown version"},
    409: {"model": ErrorResponse, "description": "Registry conflict"}}


@router.get("/v1/models", response_model=s.ModelsResponse, responses=AUTH_RESPONSES)
def models(ident: Identity = require_role("reader"),
           svc: Any = Depends(get_service)) -> s.ModelsResponse:
    return s.ModelsResponse.model_validate(svc.models_view())


def _alias_answer(svc: Any) -> s.AliasChangeResponse:
    al = svc.registry.aliases()
    return s.AliasChangeResponse(champion=al["champion"], previous=al.get("previous"),
                                 aliases=al)


def _registry_error(exc: BastionError) -> ApiError:
    msg = str(exc)
    if "has no version" in msg or "has no 'previous'" in msg:
        return ApiError(404, "unknown_version", msg)
    if "already the champion" in msg:
        return ApiError(409, "already_champion", msg)
    return ApiError(409, "registry_error", msg)


@router.post("/v1/models/promote", response_model=s.AliasChangeResponse,
             responses=_ADMIN_RESPONSES)
def promote(body: s.PromoteRequest, ident: Identity = require_role("admin"),
            svc: Any = Depends(get_service)) -> s.AliasChangeResponse:
    try:
        svc.promote(body.version, reason=body.reason)
    except BastionError as exc:
        raise _registry_error(exc) from None
    return _alias_answer(svc)


@router.post("/v1/models/rollback", response_model=s.AliasChangeResponse,
             responses=_ADMIN_RESPONSES)
def rollback(body: s.RollbackRequest | None = None, ident: Identity = require_role("admin"),
             svc: Any = Depends(get_service)) -> s.AliasChangeResponse:
    b = body or s.RollbackRequest()
    try:
        svc.rollback(b.version, reason=b.reason)
    except BastionError as exc:
        raise _registry_error(exc) from None
    return _alias_answer(svc)
