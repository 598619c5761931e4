"""``GET /v1/models`` and ``GET /v1/models/{version}/factsheet`` (reader),
``POST /v1/models/promote|rollback`` (admin)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, JSONResponse, Response

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


@router.get("/v1/models/{version}/factsheet", responses={
    **AUTH_RESPONSES, 404: {"model": ErrorResponse, "description": "Unknown version"},
    200: {"content": {"application/json": {}, "text/html": {}},
          "description": "The version's factsheet (JSON, or HTML with format=html)"}})
def factsheet(version: int, format: Literal["json", "html"] = "json",
              ident: Identity = require_role("reader"),
              svc: Any = Depends(get_service)) -> Response:
    """The factsheet of a model version, built now from the registry and the event store
    (:mod:`bastion.runtime.factsheet`)."""
    from bastion.runtime.factsheet import build_factsheet, render_factsheet_html

    if version < 1:
        raise ApiError(404, "unknown_version", f"model {svc.model_name!r} has no version "
                       f"{version}")
    try:
        doc = build_factsheet(svc.registry, version, store=svc.store)
    except BastionError as exc:
        raise _registry_error(exc) from None
    if format == "html":
        return HTMLResponse(render_factsheet_html(doc), headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff"})
    return JSONResponse(doc)
