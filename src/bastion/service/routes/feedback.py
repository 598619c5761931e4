"""``POST /v1/feedback``: true labels for the caller's own earlier predictions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from bastion.errors import DataError
from bastion.service import schemas as s
from bastion.service.deps import get_service, resolve_client
from bastion.web.auth import Identity, require_role
from bastion.web.errors import AUTH_RESPONSES, ApiError, ErrorResponse

router = APIRouter()


@router.post("/v1/feedback", response_model=s.FeedbackResponse, responses={
    **AUTH_RESPONSES,
    404: {"model": ErrorResponse, "description": "Unknown request ids (or another client's: "
          "a client key may label only its own requests)"}})
def feedback(body: s.FeedbackRequest, request: Request,
             ident: Identity = require_role("client"),
             svc: Any = Depends(get_service)) -> s.FeedbackResponse:
    limit = svc.config.max_feedback
    if len(body.feedback) > limit:
        raise ApiError(413, "too_much_feedback", f"{len(body.feedback)} labels in one "
                       f"request; the limit is {limit}", {"limit": limit})
    labels: dict[str, int] = {}
    for item in body.feedback:
        labels[item.request_id] = item.label
    cid = resolve_client(ident, body.client_id, request.headers.get("x-client-id"))
    # a client key labels only its own requests; an admin (or open mode) any request
    owner = None if ident.role == "admin" else ident.client
    try:
        ids, correct = svc.feedback(labels, client_id=cid, owner=owner)
    except KeyError as exc:
        unknown = list(exc.args[0])
        raise ApiError(404, "unknown_request_ids",
                       f"unknown request ids: {', '.join(unknown[:10])}"
                       + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""),
                       {"unknown_request_ids": unknown[:100]}) from None
    except DataError as exc:
        raise ApiError(422, "bad_labels", str(exc)) from None
    return s.FeedbackResponse(accepted=len(ids), event_ids=ids, correct=correct)
