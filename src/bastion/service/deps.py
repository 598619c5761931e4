"""What the service's routers share: the service and identity dependencies, who a
request speaks for, what a role may see of an event, and the health view."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request

from bastion.service import schemas as s
from bastion.web.auth import Identity
from bastion.web.errors import ApiError
from bastion.web.redact import CLIENT_TEXT_KEYS as CLIENT_TEXT_KEYS
from bastion.web.redact import redact


def get_service(request: Request) -> Any:
    """The :class:`~bastion.service.core.BastionService` behind the app."""
    return request.app.state.service


def event_out(e: Any, *, include_inputs: bool = False) -> s.EventOut:
    """A stored event as the API shows it: whole for an admin who asked for inputs,
    redacted otherwise."""
    d = e.as_dict()
    if not include_inputs:
        d["payload"] = redact(d["payload"])
    return s.EventOut(**d)


def resolve_client(ident: Identity, body_cid: str | None, header_cid: str | None) -> str:
    """The client a prediction or feedback counts for.

    A ``client`` key speaks for its own client only: a different ``client_id`` or
    ``X-Client-Id`` is a 403 (quarantine follows the key). An admin (or open mode) may
    label requests with any client id."""
    label = body_cid or header_cid
    if ident.role == "admin":
        return label or ident.client
    if label is not None and label != ident.client:
        raise ApiError(403, "client_id_mismatch",
                       f"this API key speaks for client {ident.client!r}, not {label!r} "
                       "(drop client_id / X-Client-Id, or use that client's key)")
    return ident.client


def health_view(svc: Any, auth: Any, ident: Identity | None) -> s.HealthResponse:
    """The health answer; detector thresholds, quarantined clients and the last error
    only for a reader or admin (thresholds help an attacker tune an evasion)."""
    cfg = svc.config
    full = ident is not None and ident.role in ("reader", "admin")
    return s.HealthResponse(
        status="ok" if svc.last_error is None else "degraded", model_name=svc.model_name,
        champion_version=svc.champion_version, fallback_version=svc.fallback_version,
        traffic=svc.traffic(), guard=cfg.guard, detectors=svc.detector_names(),
        thresholds=(svc.guard.thresholds if cfg.guard else {}) if full else {},
        quarantined_clients=svc.quarantined() if full else [],
        tuning=svc.tuning() if full else {},
        events=svc.store.last_id(),
        admin_routes=auth.admin_token_set or auth.key_count("admin") > 0 or auth.open_mode,
        auth=auth.mode,
        warning=OPEN_WARNING if auth.open_mode else None,
        uptime_s=time.time() - svc.started_at, last_error=svc.last_error if full else None,
        modality="text" if svc.is_text() else "numeric",
        skipped_detectors=dict(getattr(svc, "skipped_detectors", {}) or {}))


OPEN_WARNING = ("OPEN MODE: no API key is needed; anyone who can reach this port can read "
                "every client's inputs, promote models and lift quarantines (local demos "
                "only)")
