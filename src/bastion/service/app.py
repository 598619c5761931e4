"""The Bastion service: ``create_app(config) -> FastAPI``.

Routes (every request and response has a pydantic schema, so ``/openapi.json`` is exact):

- ``POST /v1/predict``: a batch of inputs -> labels, probabilities, verdicts, the model
  version and one request id per input (every answer goes into the event store);
- ``POST /v1/feedback``: true labels for earlier predictions, by request id (unknown ids
  -> 404 naming them);
- ``GET /v1/health``; ``GET /v1/models`` (versions, aliases and their history);
- ``POST /v1/models/promote`` and ``POST /v1/models/rollback``: bearer-token auth
  (``$BASTION_ADMIN_TOKEN`` or the config's ``admin_token``; none configured -> 403
  "disabled"; missing or wrong -> 401; compared in constant time, never logged);
- ``GET /v1/events`` (filter by kind, client, request id, since, after id; limit);
- ``GET /metrics`` (Prometheus text); ``GET /dashboard`` (the page) and
  ``GET /v1/dashboard/data`` (what it draws).

``POST /v1/predict`` has a fast path in :class:`GuardMiddleware`: a well-formed request
(JSON object with ``inputs`` and an optional ``client_id``, checked as the schema checks
them, shape and bounds as the route checks them) is parsed with one ``json.loads`` and
answered by the service's :class:`~bastion.service.core.GuardWorker` thread, without
FastAPI's routing, pydantic validation or a thread-pool hop per request; anything else is
handed, body replayed, to the FastAPI route, which gives every 4xx answer.

Bad input never gets a 500: malformed JSON -> 400, schema/shape/NaN/bounds -> 422, a
body over ``max_body_bytes`` -> 413, a batch over ``max_batch`` -> 413; every error is
``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from datetime import datetime
from importlib import resources
from typing import Any

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from bastion.errors import BastionError, DataError
from bastion.runtime import events as ev
from bastion.service import schemas as s
from bastion.service.config import ADMIN_TOKEN_ENV, ServiceConfig
from bastion.service.core import BastionService
from bastion.web.limits import LimitsMiddleware, Overloaded

ROUTES = ("/v1/predict", "/v1/feedback", "/v1/health", "/v1/models", "/v1/models/promote",
          "/v1/models/rollback", "/v1/events", "/metrics", "/dashboard", "/v1/dashboard/data")


class ApiError(Exception):
    """An error answer: status, code, message, details."""

    def __init__(self, status: int, code: str, message: str,
                 details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or {}
        self.headers = headers


def _error(status: int, code: str, message: str, details: dict[str, Any] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return JSONResponse(status_code=status, content=body, headers=headers)


class GuardMiddleware:
    """Pure ASGI middleware: a body-size limit (Content-Length and streamed bodies), and
    the request count and latency metrics by route."""

    def __init__(self, app: Any, *, service: BastionService, max_body_bytes: int) -> None:
        self.app = app
        self.service = service
        self.max_body = int(max_body_bytes)
        self.too_big_body = json.dumps({"error": {
            "code": "body_too_large",
            "message": f"request body is larger than {self.max_body} bytes",
            "details": {"limit_bytes": self.max_body}}}).encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        method = scope.get("method", "GET")
        t0 = time.perf_counter()
        status = {"code": 500}
        metrics = self.service.metrics

        seen = {"n": 0, "over": False, "replaced": False}
        too_big_body = self.too_big_body

        async def send_wrapper(message: Any) -> None:
            if seen["over"]:
                # the app failed on the cut-off body; answer 413 instead, once
                if message["type"] == "http.response.start" and not seen["replaced"]:
                    seen["replaced"] = True
                    status["code"] = 413
                    await send({"type": "http.response.start", "status": 413, "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(too_big_body)).encode())]})
                    await send({"type": "http.response.body", "body": too_big_body})
                return
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        cl = None
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                cl = v
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                n = -1
            if n > self.max_body:
                metrics.client_errors.labels("body_too_large").inc()
                too_big = _error(413, "body_too_large",
                                 f"request body is larger than {self.max_body} bytes",
                                 {"limit_bytes": self.max_body})
                await too_big(scope, receive, send_wrapper)
                self._done(route, method, status["code"], t0)
                return

        async def receive_wrapper() -> dict[str, Any]:
            if seen["over"]:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                seen["n"] += len(message.get("body", b""))
                if seen["n"] > self.max_body:
                    seen["over"] = True
                    metrics.client_errors.labels("body_too_large").inc()
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        if route == "/v1/predict" and method == "POST":
            # the fast path answers well-formed requests; anything else (and every
            # error it does not own) goes on to the FastAPI route with the body replayed
            chunks: list[bytes] = []
            while True:
                message = await receive_wrapper()
                if message["type"] != "http.request":
                    await self.app(scope, _replay([], message, receive), send_wrapper)
                    self._done(route, method, status["code"], t0)
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            if seen["over"]:
                chunks = []  # the route fails on the cut-off body; the answer is a 413
            else:
                body = b"".join(chunks)
                code = await self._predict(scope, body, send_wrapper)
                if code is not None:
                    status["code"] = code
                    self._done(route, method, code, t0)
                    return
                chunks = [body]
            await self.app(scope, _replay(chunks, None, receive_wrapper), send_wrapper)
            self._done(route, method, status["code"], t0)
            return

        await self.app(scope, receive_wrapper, send_wrapper)
        self._done(route, method, status["code"], t0)

    async def _predict(self, scope: dict[str, Any], body: bytes, send: Any) -> int | None:
        """Answer ``POST /v1/predict`` without FastAPI when the request is well formed
        (same answer as the route); return the status sent, or None (nothing sent) to
        leave the request to the route, which owns the 4xx answers for bad requests."""
        import asyncio

        svc = self.service
        ctype, header_cid = "", None
        for k, v in scope.get("headers", []):
            if k == b"content-type":
                ctype = v.decode("latin-1")
            elif k == b"x-client-id":
                header_cid = v.decode("latin-1")
        if ctype and "json" not in ctype:
            return None
        try:
            # orjson is stricter than json (no NaN literals): what it refuses goes to the
            # route, which owns the error answers
            doc = orjson.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(doc, dict) or "inputs" not in doc or not set(doc) <= _PREDICT_KEYS:
            return None
        body_cid = doc.get("client_id")
        if body_cid is not None and not (isinstance(body_cid, str)
                                         and _CLIENT_ID.fullmatch(body_cid)):
            return None
        try:
            a = s._as_array(doc["inputs"])
        except ValueError:
            return None
        cid = body_cid or header_cid or "anonymous"
        if not _CLIENT_ID.fullmatch(cid):
            return None
        cfg = svc.config
        if len(a) > cfg.max_batch:
            return None
        try:
            x = svc.prepare_inputs(a)
        except DataError:
            return None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def resolve(out: Any, error: BaseException | None) -> None:
            if not fut.done():
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(out)

        def done(out: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(resolve, out, error)

        try:
            svc.worker.submit(x, cid, done)
            out = await fut
        except Overloaded as exc:
            svc.metrics.limit("queue_full", 503)
            return await _send_json(send, 503, {"error": {
                "code": "overloaded", "message": str(exc),
                "details": {"retry_after_s": exc.retry_after_s}}},
                [(b"retry-after", str(exc.retry_after_s).encode())])
        except DataError as exc:
            svc.metrics.client_errors.labels("bad_inputs").inc()
            return await _send_json(send, 422, {"error": {
                "code": "bad_inputs", "message": str(exc), "details": {}}})
        except Exception as exc:
            svc.last_error = f"{type(exc).__name__}: {exc}"
            return await _send_json(send, 500, {"error": {
                "code": "internal_error", "details": {},
                "message": f"internal error: {type(exc).__name__} (the service keeps "
                           "running)"}})
        data = s.predict_response_json(
            None if svc.champion_version is None else str(svc.champion_version), cid, out)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-length", str(len(data)).encode()),
            (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})
        return 200

    def _done(self, route: str, method: str, code: int, t0: float) -> None:
        m = self.service.metrics
        m.request(route, method, str(code)).inc()
        m.route_latency(route).observe(time.perf_counter() - t0)


_PREDICT_KEYS = frozenset(("inputs", "client_id"))
_CLIENT_ID = re.compile(s.CLIENT_ID_PATTERN)


def _replay(chunks: list[bytes], last: dict[str, Any] | None, receive: Any) -> Any:
    """An ASGI ``receive`` giving ``chunks`` (the body read already) as one request
    message, or the message ``last`` that ended the reading, then ``receive``'s."""
    state = {"sent": False}

    async def replay() -> dict[str, Any]:
        if not state["sent"]:
            state["sent"] = True
            if last is not None:
                return last
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await receive()

    return replay


async def _send_json(send: Any, status: int, doc: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None) -> int:
    data = json.dumps(doc).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-length", str(len(data)).encode()), (b"content-type", b"application/json"),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": data})
    return status


def _dashboard_html() -> tuple[str, str]:
    """The dashboard page and the CSP hash of its one inline script."""
    text = resources.files("bastion.service").joinpath("static/dashboard.html").read_text(
        encoding="utf-8")
    start = text.index("<script>") + len("<script>")
    end = text.index("</script>", start)
    digest = base64.b64encode(hashlib.sha256(text[start:end].encode()).digest()).decode()
    return text, f"'sha256-{digest}'"


def _parse_since(since: str | None) -> float | None:
    if since is None or since == "":
        return None
    try:
        return float(since)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(422, "bad_since", f"since={since!r} is neither epoch seconds nor an "
                       "ISO 8601 time", {"example": "2026-01-01T00:00:00Z"}) from None
    if t.tzinfo is None:
        from datetime import UTC

        t = t.replace(tzinfo=UTC)
    return t.timestamp()


def create_app(config: ServiceConfig | None = None, *,
               service: BastionService | None = None,
               key_fn: Any = None) -> FastAPI:
    """Build the service app from ``config`` (or around an existing ``service``).

    ``key_fn(scope) -> str``: the rate limit's key (default: the bearer token's or
    ``X-API-Key``'s hash, else the client address; see :mod:`bastion.web.limits`).

    The app owns the service it builds: the background loop starts with the app's
    lifespan and stops (closing the event store) when the app shuts down.
    """
    from contextlib import asynccontextmanager

    if service is None:
        if config is None:
            raise BastionError("create_app needs a ServiceConfig")
        service = BastionService(config)
    svc = service
    cfg = svc.config

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        svc.start()
        try:
            yield
        finally:
            svc.close()

    app = FastAPI(title="Bastion", version="1", lifespan=lifespan,
                  description="Guarded, self-healing model service.",
                  responses={400: {"model": s.ErrorResponse}, 413: {"model": s.ErrorResponse},
                             422: {"model": s.ErrorResponse}})
    app.state.service = svc
    app.add_middleware(GuardMiddleware, service=svc, max_body_bytes=cfg.max_body_bytes)
    # outermost: rate limit, in-flight cap and deadline before anything reads the body
    app.add_middleware(LimitsMiddleware, limits=cfg.limits, key_fn=key_fn,
                       on_reject=svc.metrics.limit)
    app.state.limits, app.state.on_limit = cfg.limits, svc.metrics.limit
    page, script_hash = _dashboard_html()

    # -- errors ---------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        svc.metrics.client_errors.labels(exc.code).inc()
        return _error(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            first = next(e for e in errs if e.get("type") == "json_invalid")
            ctx = first.get("ctx") or {}
            svc.metrics.client_errors.labels("malformed_json").inc()
            return _error(400, "malformed_json",
                          f"request body is not valid JSON: {ctx.get('error', 'parse error')}",
                          {"position": (first.get("loc") or [None, None])[-1]})
        if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") in (
                "dict_type", "model_attributes_type", "missing") for e in errs):
            if "json" in request.headers.get("content-type", ""):
                svc.metrics.client_errors.labels("invalid_request").inc()
                return _error(422, "invalid_request", "request body must be a JSON object, "
                              "e.g. {\"inputs\": [...]}")
            svc.metrics.client_errors.labels("malformed_json").inc()
            return _error(400, "malformed_json", "request body is not a JSON object (send "
                          "JSON with Content-Type: application/json)")
        problems = []
        for e in errs[:20]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            msg = str(e.get("msg", "invalid"))
            problems.append({"field": loc, "problem": msg.removeprefix("Value error, ")})
        first_p = problems[0] if problems else {"field": "", "problem": "invalid request"}
        svc.metrics.client_errors.labels("invalid_request").inc()
        return _error(422, "invalid_request",
                      f"{first_p['field'] or 'request'}: {first_p['problem']}",
                      {"problems": problems})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        msg = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in msg:
            code, msg = "malformed_json", "request body could not be parsed as JSON"
        svc.metrics.client_errors.labels(code).inc()
        return _error(exc.status_code, code, msg, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        svc.last_error = f"{type(exc).__name__}: {exc}"
        return _error(500, "internal_error",
                      f"internal error: {type(exc).__name__} (the service keeps running)")

    # -- auth -------------------------------------------------------------------------
    def require_admin(request: Request) -> None:
        token = cfg.token()
        if token is None:
            raise ApiError(403, "admin_disabled",
                           f"admin routes are disabled: no admin token is configured (set "
                           f"{ADMIN_TOKEN_ENV} or admin_token in the config file)")
        got = request.headers.get("authorization", "")
        scheme, _, cred = got.partition(" ")
        if scheme.lower() != "bearer" or not cred.strip():
            raise ApiError(401, "missing_token",
                           "admin route needs an 'Authorization: Bearer <token>' header",
                           headers={"WWW-Authenticate": 'Bearer realm="bastion"'})
        if not hmac.compare_digest(cred.strip().encode("utf-8"), token.encode("utf-8")):
            raise ApiError(401, "bad_token", "the admin token is wrong",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    def client_of(request: Request, body_client: str | None) -> str:
        import re

        cid = body_client or request.headers.get("x-client-id") or "anonymous"
        if not re.match(s.CLIENT_ID_PATTERN, cid):
            raise ApiError(422, "bad_client_id", "X-Client-Id must be 1-128 characters from "
                           "A-Z a-z 0-9 _ . : @ -")
        return cid

    # -- routes -----------------------------------------------------------------------
    @app.post("/v1/predict", response_model=s.PredictResponse)
    def predict(body: s.PredictRequest, request: Request) -> Response:
        cid = client_of(request, body.client_id)
        a = body.array()
        if len(a) > cfg.max_batch:
            raise ApiError(413, "batch_too_large", f"batch of {len(a)} inputs is larger "
                           f"than the limit {cfg.max_batch}", {"limit": cfg.max_batch})
        try:
            out = svc.predict(a, client_id=cid)
        except Overloaded as exc:
            svc.metrics.limit("queue_full", 503)
            raise ApiError(503, "overloaded", str(exc), {"retry_after_s": exc.retry_after_s},
                           headers={"Retry-After": str(exc.retry_after_s)}) from None
        except DataError as exc:
            raise ApiError(422, "bad_inputs", str(exc)) from None
        # the PredictResponse schema, serialised directly: validating our own answer
        # again through the response model cost more than the guard itself
        return Response(s.predict_response_json(
            None if svc.champion_version is None else str(svc.champion_version), cid, out),
            media_type="application/json")

    @app.post("/v1/feedback", response_model=s.FeedbackResponse)
    def feedback(body: s.FeedbackRequest, request: Request) -> s.FeedbackResponse:
        if len(body.feedback) > cfg.max_feedback:
            raise ApiError(413, "too_much_feedback", f"{len(body.feedback)} labels in one "
                           f"request; the limit is {cfg.max_feedback}")
        labels: dict[str, int] = {}
        for item in body.feedback:
            labels[item.request_id] = item.label
        cid = client_of(request, body.client_id)
        try:
            ids, correct = svc.feedback(labels, client_id=cid)
        except KeyError as exc:
            unknown = list(exc.args[0])
            raise ApiError(404, "unknown_request_ids",
                           f"unknown request ids: {', '.join(unknown[:10])}"
                           + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""),
                           {"unknown_request_ids": unknown[:100]}) from None
        except DataError as exc:
            raise ApiError(422, "bad_labels", str(exc)) from None
        return s.FeedbackResponse(accepted=len(ids), event_ids=ids, correct=correct)

    def health_view() -> s.HealthResponse:
        return s.HealthResponse(
            status="ok" if svc.last_error is None else "degraded", model_name=svc.model_name,
            champion_version=svc.champion_version, fallback_version=svc.fallback_version,
            traffic=svc.traffic(), guard=cfg.guard, detectors=svc.detector_names(),
            thresholds=svc.guard.thresholds if cfg.guard else {},
            quarantined_clients=svc.quarantined(), events=svc.store.last_id(),
            admin_routes=cfg.token() is not None, uptime_s=time.time() - svc.started_at,
            last_error=svc.last_error)

    @app.get("/v1/health", response_model=s.HealthResponse)
    def health() -> s.HealthResponse:
        return health_view()

    @app.get("/v1/models", response_model=s.ModelsResponse)
    def models() -> s.ModelsResponse:
        return s.ModelsResponse.model_validate(svc.models_view())

    def _alias_answer() -> s.AliasChangeResponse:
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

    @app.post("/v1/models/promote", response_model=s.AliasChangeResponse,
              responses={401: {"model": s.ErrorResponse}, 403: {"model": s.ErrorResponse},
                         404: {"model": s.ErrorResponse}, 409: {"model": s.ErrorResponse}})
    def promote(body: s.PromoteRequest, request: Request) -> s.AliasChangeResponse:
        require_admin(request)
        try:
            svc.promote(body.version, reason=body.reason)
        except BastionError as exc:
            raise _registry_error(exc) from None
        return _alias_answer()

    @app.post("/v1/models/rollback", response_model=s.AliasChangeResponse,
              responses={401: {"model": s.ErrorResponse}, 403: {"model": s.ErrorResponse},
                         404: {"model": s.ErrorResponse}, 409: {"model": s.ErrorResponse}})
    def rollback(request: Request, body: s.RollbackRequest | None = None
                 ) -> s.AliasChangeResponse:
        require_admin(request)
        b = body or s.RollbackRequest()
        try:
            svc.rollback(b.version, reason=b.reason)
        except BastionError as exc:
            raise _registry_error(exc) from None
        return _alias_answer()

    @app.get("/v1/events", response_model=s.EventsResponse)
    def events(
        kind: list[str] | None = Query(default=None, description="Event kind(s)."),
        client_id: str | None = Query(default=None, max_length=128),
        request_id: str | None = Query(default=None, max_length=256),
        since: str | None = Query(default=None, description="Epoch seconds or ISO 8601."),
        after_id: int | None = Query(default=None, ge=0),
        limit: int = Query(default=100, ge=1, le=1000),
        order: str = Query(default="desc", pattern="^(asc|desc)$"),
        include_inputs: bool = Query(default=False),
    ) -> s.EventsResponse:
        kinds = None
        if kind:
            kinds = [k for part in kind for k in part.split(",") if k]
            bad = [k for k in kinds if k not in ev.EVENT_KINDS]
            if bad:
                raise ApiError(422, "bad_kind", f"unknown event kind(s) {bad}; use "
                               f"{', '.join(ev.EVENT_KINDS)}", {"kinds": list(ev.EVENT_KINDS)})
        rows = svc.store.query(kinds=kinds, client_id=client_id, request_id=request_id,
                               since=_parse_since(since), after_id=after_id, limit=limit,
                               newest_first=order == "desc")
        out = []
        for e in rows:
            d = e.as_dict()
            if not include_inputs and "input" in d["payload"]:
                d["payload"] = {k: v for k, v in d["payload"].items() if k != "input"}
            out.append(s.EventOut(**d))
        return s.EventsResponse(count=len(out), events=out)

    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/dashboard", response_class=HTMLResponse)
    def dashboard() -> HTMLResponse:
        csp = (f"default-src 'none'; script-src {script_hash}; style-src 'unsafe-inline'; "
               "connect-src 'self'; img-src 'self' data:; form-action 'none'; "
               "frame-ancestors 'none'; base-uri 'none'")
        return HTMLResponse(page, headers={"Content-Security-Policy": csp,
                                           "X-Content-Type-Options": "nosniff",
                                           "Cache-Control": "no-store"})

    @app.get("/v1/dashboard/data", response_model=s.DashboardData)
    def dashboard_data(buckets: int = Query(default=40, ge=5, le=200)) -> s.DashboardData:
        from bastion.service.dashboard import dashboard_data as build

        return build(svc, buckets=buckets, models=s.ModelsResponse.model_validate(
            svc.models_view()), health=health_view())

    return app


def openapi_json(app: FastAPI) -> str:
    return json.dumps(app.openapi(), indent=2)
