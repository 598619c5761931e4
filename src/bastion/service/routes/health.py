"""``GET /v1/health`` (public; the details for a reader) and ``GET /metrics``
(Prometheus text, reader: scrape with ``authorization: {credentials: <key>}``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from bastion.service import schemas as s
from bastion.service.deps import get_service, health_view
from bastion.web.auth import Identity, current_identity, require_role
from bastion.web.errors import AUTH_RESPONSES
from bastion.web.metrics import metrics_response

router = APIRouter()


@router.get("/v1/health", response_model=s.HealthResponse)
def health(request: Request, svc: Any = Depends(get_service)) -> s.HealthResponse:
    try:
        ident = current_identity(request)
    except Exception:  # a refused key still gets the public health answer
        ident = None
    return health_view(svc, request.app.state.auth, ident)


@router.get("/metrics", response_class=Response, responses=AUTH_RESPONSES)
def metrics(ident: Identity = require_role("reader"),
            svc: Any = Depends(get_service)) -> Response:
    return metrics_response(svc.metrics.registry)
