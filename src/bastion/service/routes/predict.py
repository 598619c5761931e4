"""``POST /v1/predict`` (the route; :class:`~bastion.service.app.GuardMiddleware` answers
well-formed requests first, through the same check)."""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from bastion.errors import DataError
from bastion.runtime.guard import InputError
from bastion.service import schemas as s
from bastion.service.deps import get_service, resolve_client
from bastion.web.auth import Identity, require_role
from bastion.web.errors import AUTH_RESPONSES, ApiError
from bastion.web.limits import Overloaded

router = APIRouter()
#: HTTP status of each InputError code
INPUT_STATUS = {"invalid_request": 422, "bad_inputs": 422, "batch_too_large": 413,
                "text_too_long": 413}


def input_error(exc: InputError) -> ApiError:
    status = INPUT_STATUS.get(exc.code, 422)
    msg = str(exc) if exc.code != "invalid_request" else f"inputs: {exc}"
    return ApiError(status, exc.code, msg)


@router.post("/v1/predict", response_model=s.PredictResponse, responses=AUTH_RESPONSES)
def predict(body: s.PredictRequest, request: Request,
            ident: Identity = require_role("client"),
            svc: Any = Depends(get_service)) -> Response:
    cid = resolve_client(ident, body.client_id, request.headers.get("x-client-id"))
    try:
        x = svc.prepare_inputs(body.inputs)
    except InputError as exc:
        raise input_error(exc) from None
    if body.explain:
        cap = svc.config.explain_max_batch
        if len(x) > cap:
            raise ApiError(413, "batch_too_large", f"explain: true takes at most {cap} "
                           f"inputs per request, got {len(x)}", {"limit": cap})
        wait = svc.explain_budget(cid)
        if wait == float("inf"):
            raise ApiError(403, "explain_disabled", "explanations are off on this service "
                           "(explain_rate_per_s: 0)")
        if wait > 0:
            retry = max(1, math.ceil(wait))
            svc.metrics.limit("explain_rate", 429)
            raise ApiError(429, "explain_rate_limited", f"explanation budget used up for "
                           f"client {cid}; retry in {retry} s (explain_rate_per_s "
                           f"{svc.config.explain_rate_per_s})", {"retry_after_s": retry},
                           headers={"Retry-After": str(retry)})
    try:
        out = svc.predict(x, client_id=cid)
    except Overloaded as exc:
        svc.metrics.limit("queue_full", 503)
        raise ApiError(503, "overloaded", str(exc), {"retry_after_s": exc.retry_after_s},
                       headers={"Retry-After": str(exc.retry_after_s)}) from None
    except DataError as exc:
        raise ApiError(422, "bad_inputs", str(exc)) from None
    # the PredictResponse schema, serialised directly: validating our own answer again
    # through the response model cost more than the guard itself
    data = s.predict_response_json(
        None if svc.champion_version is None else str(svc.champion_version), cid, out,
        svc.label_names())
    if body.explain:
        import orjson

        doc = orjson.loads(data)
        doc["explanations"] = svc.explain(x, out, client_id=cid)
        data = orjson.dumps(doc)
    return Response(data, media_type="application/json")
