"""The Bastion service: ``create_app(config) -> FastAPI``, assembled from the shared HTTP
layer (:mod:`bastion.web`: errors, identity and roles) and one router per concern
(:mod:`bastion.service.routes`).

Routes and who may call them (every request and response has a pydantic schema, so
``/openapi.json`` is exact; roles in :mod:`bastion.web.auth`, keys made by ``bastion keys
create``, sent as ``Authorization: Bearer <key>`` or ``X-API-Key``):

=========================================  ===========================================
``POST /v1/predict``                        client (quarantine follows the key)
``POST /v1/feedback``                       client (its own request ids only)
``GET /v1/models``                          reader
``GET /v1/models/{version}/factsheet``      reader (JSON; ``format=html``: HTML)
``POST /v1/models/promote|rollback``        admin
``GET /v1/clients/quarantined``             reader
``POST /v1/clients/{id}/unquarantine``      admin (audited)
``GET /v1/events``                          reader (no inputs or client text);
                                            ``include_inputs=true``: admin
``GET /v1/dashboard/data``, ``/metrics``    reader
``GET /v1/health``, ``GET /dashboard``      anyone (health details for a reader)
=========================================  ===========================================

Admin includes every other role. The role check runs in :class:`GuardMiddleware` before
the body is read, so a caller without the role gets 401/403, never a 422 about its body.
Open mode (``auth: open``) lets callers without a key in as admins, for local demos.

``POST /v1/predict`` has a fast path in :class:`GuardMiddleware`: a well-formed request
is parsed with one ``orjson.loads``, checked by the one input check the route uses too
(:meth:`~bastion.service.core.BastionService.prepare_inputs`, which the guard then
trusts) and answered by the service's :class:`~bastion.service.core.GuardWorker`
thread, without FastAPI's routing or a thread-pool hop; anything else is handed, body
replayed, to the FastAPI route, which gives every 4xx answer.

Bad input never gets a 500: malformed JSON -> 400, schema/shape/NaN/bounds -> 422, a
body over ``max_body_bytes`` -> 413, a batch over ``max_batch`` -> 413; every error is
``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

import orjson
from fastapi import FastAPI, Request

from bastion.errors import BastionError, DataError
from bastion.runtime.guard import InputError
from bastion.service import schemas as s
from bastion.service.config import ServiceConfig
from bastion.service.core import BastionService
from bastion.service.deps import OPEN_WARNING, resolve_client
from bastion.web.auth import (
    ADMIN,
    CLIENT,
    READER,
    Authenticator,
    AuthFailure,
    Identity,
    RouteRules,
)
from bastion.web.errors import ERROR_RESPONSES, ApiError, install_error_handlers, send_error
from bastion.web.limits import LimitsMiddleware, Overloaded

log = logging.getLogger("bastion.service")

ROUTES = ("/v1/predict", "/v1/feedback", "/v1/health", "/v1/models", "/v1/models/promote",
          "/v1/models/rollback", "/v1/events", "/metrics", "/dashboard", "/v1/dashboard/data",
          "/v1/clients/quarantined")

#: who may call what (checked before the body is read); routes not listed are public
RULES = RouteRules([
    ("POST", "/v1/predict", CLIENT), ("POST", "/v1/feedback", CLIENT),
    ("GET", "/v1/models", READER), ("POST", "/v1/models/promote", ADMIN),
    ("POST", "/v1/models/rollback", ADMIN), ("GET", "/v1/events", READER),
    ("GET", "/v1/dashboard/data", READER), ("GET", "/metrics", READER),
    ("GET", "/v1/clients/quarantined", READER),
    ("GET", "/v1/models/{version}/factsheet", READER),
    ("POST", "/v1/clients/{client_id}/unquarantine", ADMIN),
])


class GuardMiddleware:
    """Pure ASGI middleware: the request count and latency metrics by route, a body-size
    limit (Content-Length and streamed bodies), the role check of :data:`RULES` (before
    the body is read) and the fast path of ``POST /v1/predict``."""

    def __init__(self, app: Any, *, service: BastionService, auth: Authenticator,
                 max_body_bytes: int, rules: RouteRules = RULES) -> None:
        self.app = app
        self.service = service
        self.auth = auth
        self.rules = rules
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

        # identity and role first: no body is read for a caller who may not call this
        roles = self.rules.roles_for(method, path)
        if roles is not None:
            err = self.auth.check(scope, roles)
            if err is not None:
                code_, ecode, emsg, headers = err
                metrics.client_errors.labels(ecode).inc()
                await send_error(send_wrapper, code_, ecode, emsg, headers=headers)
                self._done(route, method, status["code"], t0)
                return

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
                await send_error(send_wrapper, 413, "body_too_large",
                                 f"request body is larger than {self.max_body} bytes",
                                 {"limit_bytes": self.max_body})
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
        ident = scope["state"].get("identity")
        if not isinstance(ident, Identity):
            return None
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
        if header_cid is not None and not _CLIENT_ID.fullmatch(header_cid):
            return None
        try:
            cid = resolve_client(ident, body_cid, header_cid)
            # the JSON text holds no true/false: no boolean can hide among the numbers
            x = svc.prepare_inputs(doc["inputs"],
                                   scan_bools=b"true" in body or b"false" in body)
        except (ApiError, InputError):
            return None  # the route answers it (the same check, the same error)
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
            return await send_error(send, 503, "overloaded", str(exc),
                                    {"retry_after_s": exc.retry_after_s},
                                    headers={"Retry-After": str(exc.retry_after_s)})
        except DataError as exc:
            svc.metrics.client_errors.labels("bad_inputs").inc()
            return await send_error(send, 422, "bad_inputs", str(exc))
        except Exception as exc:
            svc.last_error = f"{type(exc).__name__}: {exc}"
            return await send_error(send, 500, "internal_error",
                                    f"internal error: {type(exc).__name__} (the service "
                                    "keeps running)")
        data = s.predict_response_json(
            None if svc.champion_version is None else str(svc.champion_version), cid, out,
            svc.label_names())
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


def build_authenticator(cfg: ServiceConfig, store: Any) -> Authenticator:
    """The service's :class:`Authenticator`: keys from the ``api_keys`` table beside
    the event store, the admin token (refused under 32 characters), open mode."""
    from bastion.web.keys import KeyStore

    return Authenticator(KeyStore(store), admin_token=cfg.token(),
                         open_mode=cfg.auth == "open", refresh_s=cfg.key_refresh_s)


def create_app(config: ServiceConfig | None = None, *,
               service: BastionService | None = None,
               key_fn: Any = None, buckets: Any = None) -> FastAPI:
    """Build the service app from ``config`` (or around an existing ``service``).

    ``key_fn(scope) -> str``: the rate limit's key (default: the bearer token's or
    ``X-API-Key``'s hash, else the client address; see :mod:`bastion.web.limits`).
    ``buckets``: the rate limit's token buckets (default: this process's own; the Ray
    replicas share theirs, see :mod:`bastion.service.ray_serve`).

    The app owns the service it builds: the background loop starts with the app's
    lifespan and stops (closing the event store) when the app shuts down.

    Raises:
        BastionError: an admin token under 32 characters (before anything is loaded).
    """
    from contextlib import asynccontextmanager

    if service is None:
        if config is None:
            raise BastionError("create_app needs a ServiceConfig")
        from bastion.web.auth import check_admin_token

        check_admin_token(config.token())  # fail before loading models
        service = BastionService(config)
    svc = service
    cfg = svc.config
    auth = build_authenticator(cfg, svc.store)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        if auth.open_mode:
            log.warning(OPEN_WARNING)
        elif auth.key_count() == 0 and not auth.admin_token_set:
            log.warning("no API key exists and no admin token is set: every route but "
                        "/v1/health and /dashboard answers 401 (create keys with bastion "
                        "keys create --events URL --client NAME --role client)")
        svc.start()
        try:
            yield
        finally:
            svc.close()

    app = FastAPI(title="Bastion", version="1", lifespan=lifespan,
                  description="Guarded, self-healing model service. Every route but "
                  "/v1/health and /dashboard needs an API key (Authorization: Bearer).",
                  responses=ERROR_RESPONSES)
    app.state.service = svc
    app.state.auth = auth

    def on_error(request: Request, status: int, code: str) -> None:
        svc.metrics.client_errors.labels(code).inc()

    def on_internal(request: Request, exc: BaseException) -> None:
        svc.last_error = f"{type(exc).__name__}: {exc}"

    install_error_handlers(app, on_error=on_error, on_internal=on_internal)
    from bastion.service.routes import ROUTERS

    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(GuardMiddleware, service=svc, auth=auth,
                       max_body_bytes=cfg.max_body_bytes)
    # outermost: rate limit, in-flight cap and deadline run before anything reads the
    # body; the bucket is keyed on the verified key (``key:<client>``), or the peer
    # address without a valid key, so rotating made-up tokens does not escape it
    app.add_middleware(LimitsMiddleware, limits=cfg.limits, key_fn=key_fn or auth.key_fn,
                       on_reject=svc.metrics.limit, buckets=buckets)
    app.state.limits, app.state.on_limit = cfg.limits, svc.metrics.limit
    return app


def openapi_json(app: FastAPI) -> str:
    return json.dumps(app.openapi(), indent=2)


__all__ = ["AuthFailure", "GuardMiddleware", "RULES", "create_app", "openapi_json"]
