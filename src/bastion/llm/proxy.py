"""An OpenAI-compatible guard proxy in front of any chat-completions endpoint.

``create_guard_app(upstream, guard=...)`` returns a FastAPI app serving
``POST /v1/chat/completions`` (streaming and not), ``GET /v1/models`` (forwarded),
``GET /v1/events`` (the LLM events of the store), ``GET /metrics`` (Prometheus) and
``GET /healthz``, assembled from :mod:`bastion.web` like the model service: API keys of
the ``api_keys`` table beside the event store and roles (chat and models: ``client``;
events, redacted, and metrics: ``reader``; excerpts: ``admin``; ``/healthz`` public; the
client of events and rate limits is the key's), one error mapping with an OpenAI-style
renderer, the limits middleware keyed on the verified key, and an overall deadline that
the upstream call and the stream relay end themselves (a ``deadline_exceeded`` answer or
SSE frame, and verdict). For each chat request it:

1. validates the body. A client's mistake is a 4xx with an OpenAI-style error object
   (``{"error": {"message", "type", "param", "code"}}``), never a 500: bad JSON, bytes
   that are not UTF-8, or a body that does not match the schema (no ``model``, no or
   empty ``messages``) -> 400; lone UTF-16 surrogates in a string -> 400
   ``invalid_unicode``; NaN or Infinity -> 400 ``invalid_number``; a malformed
   ``X-Client-Id`` (a label only in open mode) -> 400 ``bad_client_id``; a body over
   ``max_body_bytes`` (by ``Content-Length`` or counted, for chunked uploads) -> 413
   ``request_too_large``; a role it does not know -> 422 ``unknown_role`` (roles are
   matched case-insensitively, ``human`` is ``user``, and forwarded in canonical form);
   text to screen over ``max_scan_chars`` (every field of every screened message) -> 413
   ``content_too_long`` (it could not be screened whole). An empty prompt is valid and
   forwarded;
2. screens every message with :class:`~bastion.llm.guard.LlmGuard` (every role but the
   guard's ``trusted_roles``; content parts, names, tool calls and other fields; every
   chunk of long texts) and blocks (400, ``code: bastion_blocked_prompt_injection``),
   strips or wraps what is flagged;
3. forwards to ``{upstream}/chat/completions`` (the API key from ``api_key_env`` if set;
   the client's ``Authorization`` carries its Bastion key and is never forwarded);
4. scans the answer (every choice) for configured secrets and system-prompt overlap: a
   leaking answer is replaced by a notice with ``finish_reason: content_filter``; calls to
   forbidden tools are dropped, and tool calls whose arguments carry a secret, a
   secret-like string of the system prompt or a URL to a host not in the guard's
   ``allow_url_hosts`` are withheld with an ``alert`` (:mod:`bastion.llm.relay`).
   Streaming answers are parsed and scanned in worker threads, block by block as they
   arrive (incrementally: linear in the answer), and relayed at once but for a hold-back
   of at least twice the longest secret (``hold_back_chars`` at least), so no character of
   a secret reaches the client; tool calls are sent whole at the end, once checked. When a
   leak shows up the stream ends with the notice. Text already relayed before a
   system-prompt overlap crosses the threshold has reached the client: streaming trades a
   little exposure for latency. ``logprobs`` are not relayed.

Upstream trouble is never the client's fault and never a 500: unreachable -> 502
``upstream_unreachable``, timeout -> 504 ``upstream_timeout``, 5xx -> 502
``upstream_error``, an answer that is not a chat completion (or a stream without one
valid chunk) -> 502 ``upstream_malformed``, an answer over ``max_answer_bytes`` -> 502
``upstream_answer_too_large``; an upstream 4xx is passed through (its error object, with
the upstream key and secrets masked). A stream that breaks after it started ends with an
OpenAI-style ``data: {"error": ...}`` frame. Every case is counted in
``bastion_llm_requests_total{outcome}`` and ``bastion_llm_errors_total{code}``.

Events go to the shared Bastion event store (:class:`~bastion.llm.events.LlmEventLog`):
one ``verdict`` per chat request, an ``audit`` record per policy decision, an ``alert``
per withheld leak; they are written off the event loop, once per request, before the
answer (or the end of the stream) goes out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from bastion.llm.client import redact_url
from bastion.llm.events import LlmEventLog
from bastion.llm.guard import (
    ROLES,
    LlmGuard,
    RequestRefused,
    ScreenResult,
    message_pieces,
    prepare_messages,
    system_prompt_of,
)
from bastion.llm.outscan import ToolCallCheck
from bastion.llm.relay import AnswerCheck, StreamRelay, screen_answer
from bastion.store import events as ev
from bastion.web.auth import (
    CLIENT,
    READER,
    Authenticator,
    AuthMiddleware,
    Identity,
    RouteRules,
    require_role,
)
from bastion.web.errors import install_error_handlers
from bastion.web.limits import deadline_scope
from bastion.web.redact import redact

__all__ = ["create_guard_app", "ChatRequest", "ChatMessage", "ADMIN_TOKEN_ENV"]

log = logging.getLogger("bastion.llm.proxy")

#: the admin token that opens ``GET /v1/events`` (the model service reads the same one)
ADMIN_TOKEN_ENV = "BASTION_ADMIN_TOKEN"
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:@\-]{1,128}$")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class ChatMessage(BaseModel):
    """One chat message (extra OpenAI fields are kept and forwarded)."""

    model_config = ConfigDict(extra="allow")
    role: str = Field(
        description="One of these roles, in any case (aliases: human = user; ai, model = "
        "assistant); any other role is refused with 422 unknown_role.",
        json_schema_extra={"enum": list(sorted(set(ROLES.values())))})  # type: ignore[dict-item]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    """The chat-completions request body (extra OpenAI fields are forwarded as they are)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False


#: the shared layer's codes -> the proxy's (OpenAI answers 400 for any invalid body)
_CODES = {"invalid_request": "invalid_request_body", "malformed_json": "invalid_request_body",
          "body_too_large": "request_too_large"}
_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          429: "rate_limit_error"}


def proxy_code(status: int, code: str) -> tuple[int, str]:
    """The proxy's ``(status, code)`` for the shared layer's: a body that does not match
    the schema is a 400 ``invalid_request_body`` (as OpenAI answers), not a 422."""
    code = _CODES.get(code, code)
    if code == "invalid_request_body":
        status = 400
    return status, code


def openai_error(status: int, code: str, message: str, details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None, *, type_: str | None = None
                 ) -> JSONResponse:
    """The proxy's renderer for :func:`bastion.web.errors.install_error_handlers` and
    :class:`bastion.web.auth.AuthMiddleware`: OpenAI's ``{"error": {"message", "type",
    "param", "code"}}``."""
    status, code = proxy_code(status, code)
    details = details or {}
    param = details.get("param")
    if param is None and details.get("problems"):
        param = details["problems"][0].get("field") or None
    type_ = type_ or _TYPES.get(status, "server_error" if status >= 500
                                else "invalid_request_error")
    return JSONResponse(status_code=status, headers=headers, content={"error": {
        "message": message, "type": type_, "param": param, "code": code}})


def _bad_value(o: Any) -> str | None:
    """Why a parsed body cannot be forwarded as JSON: ``invalid_unicode`` (a lone UTF-16
    surrogate) or ``invalid_number`` (NaN or Infinity, which Python's parser accepts but
    JSON does not); None when it can."""
    if isinstance(o, str):
        return "invalid_unicode" if _SURROGATE.search(o) else None
    if isinstance(o, float):
        return None if math.isfinite(o) else "invalid_number"
    if isinstance(o, dict):
        for k, v in o.items():
            why = _bad_value(k) or _bad_value(v)
            if why:
                return why
    if isinstance(o, list):
        for v in o:
            why = _bad_value(v)
            if why:
                return why
    return None


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bastion_llm_requests_total",
            "Chat requests by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.errors = Counter(
            "bastion_llm_errors_total",
            "Rejected or failed requests by error code (client and upstream)",
            ["code"],
            registry=self.registry,
        )
        self.flagged = Counter(
            "bastion_llm_flagged_total",
            "Flagged messages by role and action",
            ["role", "action"],
            registry=self.registry,
        )
        self.leaks = Counter(
            "bastion_llm_output_leaks_total",
            "Answers withheld for leaks",
            ["kind"],
            registry=self.registry,
        )
        self.tools = Counter(
            "bastion_llm_tool_calls_dropped_total",
            "Forbidden tool calls dropped",
            registry=self.registry,
        )
        self.tools_withheld = Counter(
            "bastion_llm_tool_calls_withheld_total",
            "Tool calls withheld for carrying a secret or an unlisted URL host",
            registry=self.registry,
        )
        self.event_failures = Counter(
            "bastion_llm_event_write_failures_total",
            "Requests whose events could not be written to the event store",
            registry=self.registry,
        )
        self.screen_s = Histogram(
            "bastion_llm_screen_seconds", "Time to screen a request", registry=self.registry
        )
        self.upstream_s = Histogram(
            "bastion_llm_upstream_seconds", "Upstream latency", registry=self.registry
        )


@dataclass
class _Req:
    """What one chat request did, gathered for its events."""

    rid: str
    client_id: str
    model: str | None = None
    stream: bool = False
    verdict: str = "allow"
    reasons: list[dict[str, Any]] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    threshold: float | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    answer: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    t0: float = field(default_factory=time.perf_counter)
    written: bool = False


#: who may call what (routes not listed, ``/healthz`` and the docs, are public)
RULES = RouteRules([
    ("POST", "/v1/chat/completions", CLIENT), ("GET", "/v1/models", CLIENT),
    ("GET", "/v1/events", READER), ("GET", "/metrics", READER),
])
OPEN_WARNING = ("OPEN MODE: the guard proxy needs no API key; anyone who can reach this "
                "port can chat through it and read every client's prompt excerpts as admin")

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics_endpoint(request: Request, _: Identity = require_role("reader")) -> Response:
    from bastion.web.metrics import metrics_response

    return metrics_response(request.app.state.metrics.registry)


@router.get("/v1/events")
async def events_endpoint(
    request: Request,
    kind: list[str] | None = Query(default=None, max_length=20),
    request_id: str | None = Query(default=None, max_length=256),
    client_id: str | None = Query(default=None, max_length=128),
    since: float | None = Query(default=None),
    limit: int = Query(default=100, ge=1, le=1000),
    include_inputs: bool = Query(default=False, description="Admin only: prompt excerpts "
                                 "and tool arguments in the payloads."),
    ident: Identity = require_role("reader"),
) -> Response:
    """The LLM events of the store, newest first: a reader sees them without prompt
    excerpts or tool arguments; an admin may ask for them whole."""
    if include_inputs and ident.role != "admin":
        return openai_error(403, "forbidden", "include_inputs=true needs an admin key (a "
                            "reader sees events without prompt excerpts or tool arguments)")
    kinds = [k for part in (kind or []) for k in part.split(",") if k] or None
    bad = [k[:40] for k in kinds or [] if k not in ev.EVENT_KINDS]
    if bad:
        return openai_error(400, "bad_kind", f"unknown event kind(s) {bad[:5]}; use "
                            f"{', '.join(ev.EVENT_KINDS)}", {"param": "kind"})
    if since is not None and not math.isfinite(since):
        return openai_error(400, "bad_since", "since must be finite epoch seconds",
                            {"param": "since"})
    elog: LlmEventLog = request.app.state.events
    rows = await run_in_threadpool(elog.query, kinds=kinds, request_id=request_id,
                                   client_id=client_id, since=since, limit=limit)
    out = [e.as_dict() for e in rows]
    if not include_inputs:
        for d in out:
            d["payload"] = redact(d["payload"])
    return JSONResponse({"count": len(out), "events": out})


@router.get("/v1/models")
async def models(request: Request, _: Identity = require_role("client")) -> Response:
    """The upstream's model list (forwarded, secrets masked)."""
    st = request.app.state
    try:
        r = await st.client().get(f"{st.upstream}/models", headers=st.upstream_headers(request))
    except httpx.HTTPError as exc:
        st.metrics.errors.labels("upstream_unreachable").inc()
        return openai_error(502, "upstream_unreachable",
                            f"upstream unreachable: {type(exc).__name__}", type_="upstream_error")
    return Response(st.events.scrub(r.content.decode("utf-8", errors="replace")).encode(),
                    status_code=r.status_code, media_type=r.headers.get("content-type"))


def create_guard_app(
    upstream: str,
    *,
    guard: LlmGuard,
    events: LlmEventLog | ev.EventStore | str | None = None,
    api_key_env: str | None = None,
    admin_token: str | None = None,
    timeout: float = 60.0,
    max_body_bytes: int = 4_000_000,
    max_scan_chars: int = 200_000,
    max_answer_bytes: int = 20_000_000,
    hold_back_chars: int = 64,
    limits: Any = None,
    key_fn: Any = None,
    open_mode: bool = False,
    key_refresh_s: float = 2.0,
) -> Any:
    """Build the guard proxy app (see module doc).

    Args:
        upstream: a base URL like ``http://host:8000/v1``.
        guard: the screening logic and policy.
        events: where events go: an :class:`LlmEventLog`, an
            :class:`~bastion.store.events.EventStore`, a store URL, or None (an
            in-memory store, lost at exit). Secrets, the upstream key and the admin
            token are masked in whatever is written.
        api_key_env: environment variable with the upstream key (else none is sent: the
            client's ``Authorization`` is its Bastion key and is never forwarded).
        admin_token: the admin identity (at least 32 characters; default
            ``$BASTION_ADMIN_TOKEN``). Other callers present an API key of the
            ``api_keys`` table beside the event store (``bastion keys create``): role
            ``client`` for chat and models (the client name of events and rate limits is
            the key's, never ``X-Client-Id``), ``reader`` for events (redacted: no
            excerpts or tool arguments) and metrics; ``admin`` also for
            ``include_inputs=true``. ``/healthz`` is public.
        open_mode: no key needed (local demos): a caller without a key is an admin named
            by its ``X-Client-Id``; a warning is logged at start-up.
        limits: the per-key rate limit, in-flight cap and overall deadline (the upstream
            and the whole streamed answer included) of
            :class:`bastion.web.limits.HttpLimits`; None: the defaults. ``timeout`` stays
            the upstream's per-read timeout. ``key_fn``: the rate limit's key.
    """
    if not upstream.startswith(("http://", "https://")):
        from bastion.errors import BastionError

        raise BastionError(
            f"upstream {redact_url(upstream)!r} is not an http(s) URL",
            hint="pass a base URL like http://host:8000/v1",
        )
    base = upstream.rstrip("/")
    key = os.environ.get(api_key_env) if api_key_env else None
    token = admin_token or os.environ.get(ADMIN_TOKEN_ENV, "").strip() or None
    elog = events if isinstance(events, LlmEventLog) else LlmEventLog(
        events if events is not None else "sqlite:///:memory:")
    elog.add_mask(*guard.secrets, key, token)
    from bastion.web.keys import KeyStore

    auth = Authenticator(KeyStore(elog.store), admin_token=token, open_mode=open_mode,
                         refresh_s=key_refresh_s)
    metrics = _Metrics()
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["client"] = httpx.AsyncClient(timeout=timeout)
        if auth.open_mode:
            log.warning(OPEN_WARNING)
        elif auth.key_count() == 0 and not auth.admin_token_set:
            log.warning("no API key exists and no admin token is set: every route but "
                        "/healthz answers 401 (create keys with bastion keys create "
                        "--events URL --client NAME --role client)")
        await write([elog.audit_row(
            "start", "llm_guard", f"guard proxy started in front of {redact_url(base)}",
            {"upstream": redact_url(base), "upstream_key": "configured" if key else "none",
             "max_scan_chars": max_scan_chars, "max_body_bytes": max_body_bytes,
             **guard.describe()})], None)
        try:
            yield
        finally:
            await state["client"].aclose()

    app = FastAPI(title="Bastion LLM guard", lifespan=lifespan,
                  description="OpenAI-compatible guard proxy. Every route but /healthz "
                  "needs an API key (Authorization: Bearer; bastion keys create).")
    from bastion.web.limits import HttpLimits, LimitsMiddleware

    app.state.limits = limits = limits if limits is not None else HttpLimits(deadline_s=300.0)
    # our own 504 / SSE error frame (and verdict event) comes this long before the
    # limits middleware would cut the request
    margin = min(0.5, 0.1 * limits.deadline_s)
    app.state.on_limit = lambda reason, status: metrics.errors.labels(reason).inc()
    app.state.guard = guard
    app.state.events = elog
    app.state.metrics = metrics
    app.state.auth = auth
    app.state.upstream = base
    app.state.upstream_headers = lambda request: _headers(request)
    app.state.client = lambda: client()
    app.include_router(router)

    def on_error(request: Request, status: int, code: str) -> None:
        """Count every 4xx; a refused chat request also leaves its verdict event."""
        status, code = proxy_code(status, code)
        metrics.errors.labels(code).inc()
        if request.method == "POST" and request.url.path == "/v1/chat/completions":
            rq = _Req(rid=uuid.uuid4().hex, client_id=_client_of(request, None),
                      verdict="reject", error={"code": code})
            metrics.requests.labels("client_error").inc()
            try:  # a small SQLite/PostgreSQL write; the answer goes out right after
                elog.write([*rq.rows, verdict_row(rq, "client_error", status)])
            except Exception as exc:
                metrics.event_failures.inc()
                log.warning("cannot write guard events: %s", type(exc).__name__)

    def on_internal(request: Request, exc: BaseException) -> None:
        metrics.requests.labels("internal_error").inc()
        log.error("guard proxy bug: %s", type(exc).__name__)

    install_error_handlers(app, render=openai_error, on_error=on_error,
                           on_internal=on_internal)
    app.add_middleware(_CountBody, limit=max_body_bytes)
    app.add_middleware(AuthMiddleware, auth=auth, rules=RULES, render=openai_error,
                       on_refused=lambda status, code: metrics.errors.labels(code).inc())
    # outermost: the bucket is keyed on the verified key (``key:<client>``), or the
    # peer address without a valid key, so made-up tokens do not escape it
    app.add_middleware(LimitsMiddleware, limits=limits, key_fn=key_fn or auth.key_fn,
                       on_reject=app.state.on_limit, error_style="openai")

    def client() -> httpx.AsyncClient:
        if "client" not in state:  # app used without lifespan (e.g. some test clients)
            state["client"] = httpx.AsyncClient(timeout=timeout)
        return state["client"]

    async def write(rows: list[dict[str, Any]], rq: _Req | None) -> None:
        if rq is not None:
            rq.written = True
        try:
            await run_in_threadpool(elog.write, rows)
        except Exception as exc:  # never fail the client for the log; count and say so
            metrics.event_failures.inc()
            log.warning("cannot write %d guard events: %s", len(rows), type(exc).__name__)

    def verdict_row(rq: _Req, outcome: str, status: int) -> dict[str, Any]:
        p: dict[str, Any] = {
            "stage": "request", "verdict": rq.verdict, "outcome": outcome, "status": status,
            "model": rq.model, "stream": rq.stream, "threshold": rq.threshold,
            "reasons": rq.reasons, "scores": rq.scores,
            "latency_s": round(time.perf_counter() - rq.t0, 4),
        }
        if rq.answer:
            p["answer"] = rq.answer
        if rq.error:
            p["error"] = rq.error
        return elog.row(ev.VERDICT, p, request_id=rq.rid, client_id=rq.client_id)

    async def finish(rq: _Req, outcome: str, response: Response) -> Response:
        """Count the outcome, write the request's events, then answer."""
        metrics.requests.labels(outcome).inc()
        await write([*rq.rows, verdict_row(rq, outcome, response.status_code)], rq)
        return response

    async def client_error(rq: _Req | None, status: int, message: str, code: str,
                           param: str | None = None) -> Response:
        metrics.errors.labels(code).inc()
        resp = openai_error(status, code, message, {"param": param})
        if rq is None:
            rq = _Req(rid=uuid.uuid4().hex, client_id="anonymous")
        rq.verdict = "reject"
        rq.error = {"code": code, "message": message}
        return await finish(rq, "client_error", resp)

    async def upstream_error(rq: _Req, status: int, message: str, code: str,
                             upstream_status: int | None = None) -> Response:
        metrics.errors.labels(code).inc()
        rq.error = {"code": code, "message": message, "upstream_status": upstream_status}
        return await finish(rq, "upstream_error",
                            openai_error(status, code, message, type_="upstream_error"))

    def _headers(request: Request) -> dict[str, str]:
        """The upstream's headers: its key from ``api_key_env``. The client's own
        ``Authorization`` carries its Bastion key and is never forwarded."""
        h = {"Content-Type": "application/json"}
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def _client_of(request: Request, user: Any) -> str:
        """The client a request counts for: the verified key's client; only in open mode
        the ``X-Client-Id`` label (or the body's ``user``)."""
        ident = request.scope.get("state", {}).get("identity")
        if isinstance(ident, Identity) and ident.source != "open":
            return ident.client
        cid = request.headers.get("x-client-id")
        if cid is not None and CLIENT_ID_PATTERN.match(cid):
            return cid
        return user if isinstance(user, str) and CLIENT_ID_PATTERN.match(user) else "anonymous"

    def _screen_record(rq: _Req, screened: ScreenResult, messages: list[dict[str, Any]]) -> None:
        rq.threshold = guard.threshold
        rq.scores = [{"index": i, "role": r, "score": round(s, 4)} for i, r, s in screened.scores]
        for f in screened.flags:
            metrics.flagged.labels(f.role, f.action).inc()
            m = messages[f.index]
            reason = {
                "index": f.index, "role": f.role,
                "source": "tool" if f.role in ("tool", "function") else "message",
                "score": round(f.score, 4), "threshold": guard.threshold,
                "action": f.action, "excerpt": elog.excerpt(f.excerpt),
            }
            for k in ("name", "tool_call_id"):
                if isinstance(m.get(k), str):
                    reason[k] = m[k][:128]
            rq.reasons.append(reason)
            rq.rows.append(elog.audit_row(
                f.action, "prompt_injection",
                f"{f.action} {reason['source']} content of message {f.index} ({f.role}): "
                f"detector score {f.score:.3f} >= threshold {guard.threshold:.3f}",
                {"index": f.index, "role": f.role, "score": f.score,
                 "threshold": guard.threshold, "excerpt": reason["excerpt"]},
                request_id=rq.rid, client_id=rq.client_id))
        rq.verdict = screened.action

    def _leak_rows(rq: _Req, kind: str | None, score: float) -> None:
        monitor = f"llm_{kind or 'unknown'}_leak"
        what = "a configured secret" if kind == "secret" else "the system prompt"
        metrics.leaks.labels(kind or "").inc()
        rq.answer["withheld"] = kind
        rq.answer["leak_score"] = round(score, 4)
        rq.rows.append(elog.row(ev.ALERT, {
            "monitor": monitor, "severity": "critical" if kind == "secret" else "warning",
            "message": f"the upstream answer would have disclosed {what}; withheld",
            "value": score, "threshold": 1.0 if kind == "secret" else guard.overlap_threshold,
        }, request_id=rq.rid, client_id=rq.client_id))
        rq.rows.append(elog.audit_row(
            "redact", monitor, f"answer withheld: it would have disclosed {what}",
            {"kind": kind, "score": score}, request_id=rq.rid, client_id=rq.client_id))

    def _tool_rows(rq: _Req, dropped: list[str], kept: int) -> None:
        metrics.tools.inc(len(dropped))
        rq.answer["tool_calls_dropped"] = dropped
        rq.rows.append(elog.audit_row(
            "drop_tool_calls", "forbidden_tool",
            f"dropped calls to forbidden tool(s) {', '.join(dropped)}; kept {kept}",
            {"dropped": dropped, "kept": kept}, request_id=rq.rid, client_id=rq.client_id))

    async def _read_capped(resp: httpx.Response) -> bytes | None:
        buf = bytearray()
        async for chunk in resp.aiter_bytes():
            buf += chunk
            if len(buf) > max_answer_bytes:
                return None
        return bytes(buf)

    _chat_errors = {c: {"description": d} for c, d in (
        (400, "Invalid body, or blocked as a prompt injection"),
        (401, "No, unknown or revoked API key"), (403, "The key's role may not chat"),
        (413, "Body or content to screen too large"), (422, "Unknown role"),
        (502, "Upstream unreachable, failing or malformed"), (504, "Upstream timed out"))}

    @app.post("/v1/chat/completions", responses=_chat_errors,  # type: ignore[arg-type]
              dependencies=[require_role("client")])
    async def chat(body: ChatRequest, request: Request) -> Response:
        rq = _Req(rid=uuid.uuid4().hex, client_id="anonymous", model=body.model,
                  stream=bool(body.stream))
        cid = request.headers.get("x-client-id")
        if cid is not None and not CLIENT_ID_PATTERN.match(cid):
            return await client_error(rq, 400, "X-Client-Id must be 1-128 characters from "
                                      "A-Z a-z 0-9 _ . : @ -", "bad_client_id")
        user = getattr(body, "user", None)
        rq.client_id = _client_of(request, user)
        payload = body.model_dump(exclude_unset=True)
        why = _bad_value(payload)
        if why == "invalid_unicode":
            return await client_error(rq, 400, "the request holds lone UTF-16 surrogates "
                                      "(not valid Unicode text)", why)
        if why:
            return await client_error(rq, 400, "the request holds NaN or Infinity, which "
                                      "JSON does not allow", why)
        try:  # canonical roles (User, human -> user); an unknown role is refused
            messages = prepare_messages(payload["messages"])
        except RequestRefused as exc:
            return await client_error(rq, exc.status, exc.message, exc.code, exc.param)
        untrusted = sum(len(t) for m in messages if m["role"] not in guard.trusted_roles
                        for _, t in message_pieces(m))
        if untrusted > max_scan_chars:
            return await client_error(
                rq, 413, f"content to screen over {max_scan_chars} characters cannot be "
                f"screened whole ({untrusted} characters)", "content_too_long")
        t0 = time.perf_counter()
        screened = await run_in_threadpool(guard.screen, messages)
        metrics.screen_s.observe(time.perf_counter() - t0)
        _screen_record(rq, screened, messages)
        if screened.blocked:
            return await finish(rq, "blocked", openai_error(
                400, "bastion_blocked_prompt_injection",
                "the request was blocked by Bastion guard: it looks like a prompt injection"))
        payload["messages"] = screened.messages
        try:  # the upstream call ends just before the request's deadline, with our answer
            async with deadline_scope(margin=margin):
                return await _forward(rq, request, payload, system_prompt_of(messages))
        except TimeoutError:
            return await upstream_error(rq, 504, "the request took longer than its deadline "
                                        f"of {limits.deadline_s:g} s", "deadline_exceeded")

    async def _forward(rq: _Req, request: Request, payload: dict[str, Any],
                       system_prompt: str) -> Response:
        """Forward a screened request and check the answer (or start relaying it)."""
        headers = _headers(request)
        t1 = time.perf_counter()
        try:
            req = client().build_request("POST", f"{base}/chat/completions", json=payload,
                                         headers=headers)
            resp = await client().send(req, stream=True)
        except httpx.TimeoutException:
            return await upstream_error(rq, 504, "upstream timed out", "upstream_timeout")
        except httpx.HTTPError as exc:
            return await upstream_error(rq, 502, f"upstream unreachable: {type(exc).__name__}",
                                        "upstream_unreachable")
        if resp.status_code >= 400:
            try:
                raw = await _read_capped(resp) or b""
            except httpx.HTTPError:
                raw = b""
            finally:
                await resp.aclose()
            if resp.status_code >= 500:
                return await upstream_error(rq, 502, f"upstream answered HTTP {resp.status_code}",
                                            "upstream_error", resp.status_code)
            code = f"upstream_http_{resp.status_code}"
            metrics.errors.labels(code).inc()
            rq.error = {"code": code, "upstream_status": resp.status_code}
            try:
                obj = json.loads(elog.scrub(raw.decode("utf-8", errors="replace")))
            except json.JSONDecodeError:
                obj = None
            if not (isinstance(obj, dict) and isinstance(obj.get("error"), dict)):
                obj = {"error": {"message": f"upstream answered HTTP {resp.status_code}",
                                 "type": "upstream_error", "param": None, "code": code}}
            return await finish(rq, "upstream_error", JSONResponse(obj, resp.status_code))
        if payload.get("stream"):
            return await _start_stream(rq, resp, system_prompt, t1)
        try:
            answer = await _read_capped(resp)
        except httpx.TimeoutException:
            return await upstream_error(rq, 504, "upstream timed out", "upstream_timeout")
        except httpx.HTTPError as exc:
            return await upstream_error(rq, 502, f"upstream broke off: {type(exc).__name__}",
                                        "upstream_unreachable")
        finally:
            await resp.aclose()
        metrics.upstream_s.observe(time.perf_counter() - t1)
        if answer is None:
            return await upstream_error(rq, 502, f"upstream answer over {max_answer_bytes} "
                                        "bytes", "upstream_answer_too_large")
        try:
            data = json.loads(answer.decode("utf-8", errors="replace"))
            if not isinstance(data, dict):
                raise TypeError
            data, found = await run_in_threadpool(
                lambda: screen_answer(guard, data, system_prompt, rid=rq.rid, model=rq.model))
        except (json.JSONDecodeError, RecursionError, TypeError):
            return await upstream_error(rq, 502, "upstream answer is malformed",
                                        "upstream_malformed")
        rq.answer["chars"] = found.chars
        _answer_rows(rq, found, system_prompt)
        outcome = "redacted" if found.leak else ("flagged" if rq.reasons else "allowed")
        return await finish(rq, outcome, JSONResponse(data))

    def _answer_rows(rq: _Req, found: AnswerCheck, system_prompt: str) -> None:
        """The events of an answer's findings: a leak, dropped or withheld tool calls."""
        if found.leak is not None:
            _leak_rows(rq, found.leak.kind, found.leak.score)
        if found.dropped:
            _tool_rows(rq, found.dropped, found.kept_calls)
        if found.withheld:
            _withheld_rows(rq, found.withheld, found.kept_calls, system_prompt)

    def _withheld_rows(rq: _Req, withheld: list[ToolCallCheck], kept: int,
                       system_prompt: str) -> None:
        metrics.tools_withheld.inc(len(withheld))
        rq.answer["tool_calls_withheld"] = [w.name for w in withheld]
        for w in withheld:
            kinds = sorted({r["kind"] for r in w.reasons})
            rq.rows.append(elog.row(ev.ALERT, {
                "monitor": "llm_tool_call_exfiltration", "severity": "critical",
                "message": f"tool call to {w.name or '?'} withheld: its arguments carry "
                           f"{', '.join(kinds)}",
                "tool": w.name, "reasons": w.reasons, "value": 1.0, "threshold": 1.0,
            }, request_id=rq.rid, client_id=rq.client_id))
            rq.rows.append(elog.audit_row(
                "withhold_tool_call", "llm_tool_call_exfiltration",
                f"withheld a call to {w.name or '?'} ({', '.join(kinds)}); kept {kept}",
                {"tool": w.name, "reasons": w.reasons, "kept": kept},
                request_id=rq.rid, client_id=rq.client_id))

    async def _start_stream(rq: _Req, resp: httpx.Response, system_prompt: str, t1: float
                            ) -> Response:
        """Read up to the first valid chunk before answering, so an upstream that streams
        nothing usable is a 502, not an empty 200."""
        relay = StreamRelay(guard, system_prompt, rid=rq.rid, min_hold_back=hold_back_chars,
                            max_chars=max_answer_bytes)
        blocks = resp.aiter_bytes()
        head = b""
        seen = 0
        try:
            async for data in blocks:
                seen += len(data)
                head += await run_in_threadpool(relay.feed, data)
                if relay.valid or relay.stopped or seen > max_answer_bytes:
                    break
        except httpx.TimeoutException:
            await resp.aclose()
            return await upstream_error(rq, 504, "upstream timed out", "upstream_timeout")
        except httpx.HTTPError as exc:
            await resp.aclose()
            return await upstream_error(rq, 502, f"upstream broke off: {type(exc).__name__}",
                                        "upstream_unreachable")
        if not relay.valid:
            await resp.aclose()
            if relay.error == "upstream_error":
                return await upstream_error(rq, 502, "upstream answered its stream with an "
                                            "error", "upstream_error")
            return await upstream_error(rq, 502, "upstream stream holds no chat-completion "
                                        "chunk", "upstream_malformed")
        return StreamingResponse(
            _relay_stream(rq, resp, blocks, relay, head, t1),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def _relay_stream(
        rq: _Req, resp: httpx.Response, blocks: AsyncIterator[bytes], relay: StreamRelay,
        head: bytes, t1: float,
    ) -> AsyncIterator[bytes]:
        """Relay the stream: every block is parsed and scanned in a worker thread (the
        event loop only moves bytes), and everything but the hold-back goes out at once."""
        outcome = "client_disconnected"

        async def flush(outcome_: str) -> None:
            metrics.requests.labels(outcome_).inc()
            await write([*rq.rows, verdict_row(rq, outcome_, 200)], rq)

        try:
            try:
                if head:
                    yield head
                while not relay.stopped:
                    try:  # never across a yield: the scope cancels this task
                        async with deadline_scope(margin=margin):
                            data = await blocks.__anext__()
                            out = await run_in_threadpool(relay.feed, data)
                    except StopAsyncIteration:
                        break
                    if out:
                        yield out
                if relay.error:
                    raise _StreamError(relay.error)
            except (httpx.HTTPError, _StreamError, TimeoutError) as exc:
                late = isinstance(exc, TimeoutError) and not isinstance(exc, httpx.HTTPError)
                code = (str(exc) if isinstance(exc, _StreamError)
                        else "deadline_exceeded" if late
                        else "upstream_timeout" if isinstance(exc, httpx.TimeoutException)
                        else "upstream_unreachable")
                msg = (f"the request took longer than its deadline of {limits.deadline_s:g} s"
                       if late else "the upstream stream broke off")
                metrics.errors.labels(code).inc()
                rq.error = {"code": code, "message": msg}
                outcome = "deadline_exceeded" if late else "upstream_error"
                err = {"message": msg, "type": "server_error" if late else "upstream_error",
                       "param": None, "code": code}
                yield f"data: {json.dumps({'error': err})}\n\n".encode()
                await flush(outcome)
                yield b"data: [DONE]\n\n"
                return
            metrics.upstream_s.observe(time.perf_counter() - t1)
            out = relay.withheld_frames() if relay.leak else await run_in_threadpool(
                relay.finish)
            rq.answer["chars"] = relay.chars
            if relay.leak is not None:
                _leak_rows(rq, relay.leak.kind, relay.leak.score)
                outcome = "redacted"
            elif relay.error:  # the last line broke the limits
                rq.error = {"code": relay.error, "message": "the upstream stream broke off"}
                metrics.errors.labels(relay.error).inc()
                outcome = "upstream_error"
            else:
                _answer_rows(rq, relay.check, relay.system_prompt)
                outcome = "redacted" if relay.check.withheld else (
                    "flagged" if rq.reasons else "allowed")
            yield out
            await flush(outcome)
            yield b"data: [DONE]\n\n"
        finally:
            await resp.aclose()
            if not rq.written:  # the client went away (or we were cancelled)
                metrics.requests.labels(outcome).inc()
                rows = [*rq.rows, verdict_row(rq, outcome, 200)]
                rq.written = True
                try:  # in a finally that may be cancelled: write without awaiting
                    elog.write(rows)
                except Exception as exc:
                    metrics.event_failures.inc()
                    log.warning("cannot write %d guard events: %s", len(rows),
                                type(exc).__name__)

    return app


class _CountBody:
    """Count the bytes of a request body as they arrive (chunked uploads have no
    ``Content-Length``; a larger ``Content-Length`` is refused at the first read) and stop
    reading at ``limit`` with a 413, which the app's error handler turns into an
    OpenAI-style error."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = 0
        too_big = f"request body over {self.limit} bytes"
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                seen = self.limit + 1  # refused at the first read, before any byte

        async def counted() -> Any:
            nonlocal seen
            if seen > self.limit:
                raise StarletteHTTPException(413, too_big)
            msg = await receive()
            if msg.get("type") == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise StarletteHTTPException(413, too_big)
            return msg

        await self.app(scope, counted, send)


class _StreamError(Exception):
    """The upstream sent an error object in its stream."""
