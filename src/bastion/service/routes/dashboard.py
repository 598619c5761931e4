"""``GET /dashboard`` (the page: public, it holds no data; it asks for an API key, kept
in the tab's sessionStorage) and ``GET /v1/dashboard/data`` (reader)."""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse

from bastion.service import schemas as s
from bastion.service.deps import get_service, health_view
from bastion.web.auth import Identity, require_role
from bastion.web.errors import AUTH_RESPONSES

router = APIRouter()


@lru_cache(maxsize=1)
def dashboard_html() -> tuple[str, str]:
    """The dashboard page and the CSP hash of its one inline script."""
    text = resources.files("bastion.service").joinpath("static/dashboard.html").read_text(
        encoding="utf-8")
    start = text.index("<script>") + len("<script>")
    end = text.index("</script>", start)
    digest = base64.b64encode(hashlib.sha256(text[start:end].encode()).digest()).decode()
    return text, f"'sha256-{digest}'"


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard() -> HTMLResponse:
    page, script_hash = dashboard_html()
    csp = (f"default-src 'none'; script-src {script_hash}; style-src 'unsafe-inline'; "
           "connect-src 'self'; img-src 'self' data:; form-action 'none'; "
           "frame-ancestors 'none'; base-uri 'none'")
    return HTMLResponse(page, headers={"Content-Security-Policy": csp,
                                       "X-Content-Type-Options": "nosniff",
                                       "Referrer-Policy": "no-referrer",
                                       "Cache-Control": "no-store"})


@router.get("/v1/dashboard/data", response_model=s.DashboardData, responses=AUTH_RESPONSES)
def dashboard_data(request: Request, buckets: int = Query(default=40, ge=5, le=200),
                   ident: Identity = require_role("reader"),
                   svc: Any = Depends(get_service)) -> s.DashboardData:
    from bastion.service.dashboard import dashboard_data as build

    return build(svc, buckets=buckets, models=s.ModelsResponse.model_validate(
        svc.models_view()), health=health_view(svc, request.app.state.auth, ident))
