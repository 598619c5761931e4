"""Limits that degrade gracefully, shared by ``bastion serve`` and ``bastion guard-llm``.

Two layers, both configured by one :class:`HttpLimits`:

**Connection layer** (a subclass of uvicorn's HTTP protocol, :func:`server_options`).
uvicorn alone arms no timer until a first response is sent (its ``timeout_keep_alive``
only runs between requests), so a client that connects and then sends its request head
or body byte by byte holds a socket for ever; and its ``limit_concurrency`` counts idle
sockets too and answers 503 only once a request head is complete. Here:

- ``header_timeout_s``: a request head (request line and headers) must be complete this
  long after the connection opens or after the first byte of the next request on a
  keep-alive connection; otherwise ``408`` (when some bytes came) and the connection is
  closed. ``max_header_bytes``: a longer head gets ``431`` and a close.
- ``body_timeout_s``: the whole body must arrive this long after its head; otherwise
  ``408`` (when no answer has started) and a close.
- ``keepalive_timeout_s``: an idle keep-alive connection is closed (uvicorn's own timer).
- ``max_connections``: open sockets. A new socket over the cap evicts the oldest *idle*
  one (no request in progress: a slow or silent client, or a keep-alive socket); when
  every socket is busy with a request, the newcomer's request gets ``503`` and a close.
  File descriptors therefore stay bounded (:func:`raise_fd_limit` lifts the soft
  ``RLIMIT_NOFILE`` to the hard limit at start-up and the cap is lowered to fit).

**Request layer** (:class:`LimitsMiddleware`, pure ASGI, outermost):

- a token bucket per key (``rate_limit_per_s`` with bursts of ``rate_limit_burst``;
  ``0`` turns it off): ``429`` with ``Retry-After`` (whole seconds) and
  ``{"error": {"code": "rate_limited", "message", "details"}}``. The key comes from
  ``key_fn(scope) -> str``; the default (:func:`default_key`) is the SHA-256 of the
  bearer token or ``X-API-Key`` when one is sent, else the client address. An unverified
  token is a fresh bucket, so an app with API keys passes a ``key_fn`` that returns the
  *verified* key id (and the address for unknown tokens). A client that keeps sending
  while limited has its 429 held back ``min(Retry-After, rate_limit_delay_s)`` seconds
  (a tarpit: a client that ignores ``Retry-After`` is slowed to the pace it was asked
  for, at the cost of a sleeping coroutine), at most ``rate_limit_max_delayed`` at once
  (beyond that the 429 goes out at once, so held answers cannot fill the sockets);
- ``max_inflight``: requests being handled at once; over it, ``503`` with
  ``Retry-After`` at once (nothing queues in memory);
- ``deadline_s``: the overall time of a request, its whole (streamed) answer included:
  ``504`` if no answer has started; a started ``text/event-stream`` answer ends with an
  SSE ``data: {"error": {"code": "deadline_exceeded", ...}}`` frame and ``[DONE]``; any
  other started answer is cut (connection closed). Code inside a request can read the
  time left with :func:`deadline_remaining`, or bound an upstream call or a relay with
  ``async with deadline_scope(margin=...)`` to end its answer itself, just before.

The health and metrics routes (``exempt``) skip the bucket and the in-flight cap (so a
flood cannot hide the service's state), but not the connection timeouts or the deadline.
Every refusal is counted through ``on_reject(reason, status)``.

This module imports only the standard library and pydantic (uvicorn lazily).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import math
import resource
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bastion.errors import BastionError

__all__ = ["HttpLimits", "LimitsMiddleware", "Overloaded", "TokenBuckets", "default_key",
           "deadline_remaining", "deadline_scope", "raise_fd_limit", "server_options",
           "LIMIT_OPTIONS", "EXEMPT_PATHS"]

#: health and metrics: never rate limited or shed (timeouts and the deadline still apply)
EXEMPT_PATHS: tuple[str, ...] = ("/v1/health", "/healthz", "/metrics")
#: file descriptors kept free for files, the event store and threads
FD_RESERVE = 128

OnReject = Callable[[str, int], None]
ErrorStyle = Literal["bastion", "openai"]


class HttpLimits(BaseModel):
    """The limits of one HTTP app (see the module docs); every field has a safe default."""

    model_config = ConfigDict(extra="forbid")

    header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    keepalive_timeout_s: float = Field(default=5.0, gt=0, le=3600)
    max_header_bytes: int = Field(default=65_536, ge=1024, le=16_777_216)
    max_connections: int = Field(default=2048, ge=1, le=1_000_000)
    max_inflight: int = Field(default=64, ge=1, le=100_000)
    rate_limit_per_s: float = Field(default=100.0, ge=0)
    rate_limit_burst: int = Field(default=200, ge=1, le=10_000_000)
    rate_limit_delay_s: float = Field(default=1.0, ge=0, le=60)
    rate_limit_max_delayed: int = Field(default=256, ge=0, le=100_000)
    deadline_s: float = Field(default=30.0, gt=0, le=86_400)
    max_keys: int = Field(default=100_000, ge=1)

    @classmethod
    def build(cls, **fields: Any) -> HttpLimits:
        """Validate ``fields`` (None values are left at their defaults) with one
        :class:`BastionError` line naming the CLI option and what it accepts."""
        fields = {k: v for k, v in fields.items() if v is not None}
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            e = exc.errors()[0]
            name = str((e.get("loc") or ("limits",))[0])
            opt = {v: k for k, v in LIMIT_OPTIONS.items()}.get(name, name)
            got = e.get("input")
            raise BastionError(f"{opt} {got!r} is not allowed: {e.get('msg')}",
                               hint=_LIMIT_HINTS.get(name, "see bastion.web.limits")) from None

    def with_overrides(self, **fields: Any) -> HttpLimits:
        """A copy with ``fields`` (not None) replaced, validated like :meth:`build`."""
        return HttpLimits.build(**{**self.model_dump(), **{k: v for k, v in fields.items()
                                                            if v is not None}})


#: CLI option -> field (both commands use the same names)
LIMIT_OPTIONS: dict[str, str] = {
    "--header-timeout": "header_timeout_s", "--body-timeout": "body_timeout_s",
    "--keepalive-timeout": "keepalive_timeout_s", "--max-connections": "max_connections",
    "--max-inflight": "max_inflight", "--rate-limit": "rate_limit_per_s",
    "--rate-burst": "rate_limit_burst", "--deadline": "deadline_s",
    "--max-header-bytes": "max_header_bytes", "--rate-delay": "rate_limit_delay_s",
}
_LIMIT_HINTS = {
    "header_timeout_s": "seconds, above 0 (default 10)",
    "body_timeout_s": "seconds, above 0 (default 30)",
    "keepalive_timeout_s": "seconds, above 0 (default 5)",
    "max_connections": "a whole number of sockets, at least 1 (default 2048)",
    "max_inflight": "a whole number of requests, at least 1 (default 64)",
    "rate_limit_per_s": "requests per second per key, 0 turns the limit off (default 100)",
    "rate_limit_burst": "a whole number of requests, at least 1 (default 200)",
    "deadline_s": "seconds, above 0 (default 30)",
    "max_header_bytes": "bytes, at least 1024 (default 65536)",
    "rate_limit_delay_s": "seconds a limited client's 429 is held back, 0 to 60 (default 1)",
}


class Overloaded(BastionError):
    """The service's queue is full: answer 503 with ``Retry-After: retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, hint="retry later")
        self.retry_after_s = int(retry_after_s)


# -- errors ---------------------------------------------------------------------------------
def error_doc(code: str, message: str, details: dict[str, Any] | None = None,
              style: ErrorStyle = "bastion") -> dict[str, Any]:
    """The error body of either app: Bastion's ``{code, message, details}``, or (for the
    OpenAI-compatible proxy) the same plus OpenAI's ``type`` and ``param``."""
    err: dict[str, Any] = {"code": code, "message": message, "details": details or {}}
    if style == "openai":
        err["type"] = "server_error" if code in ("overloaded", "deadline_exceeded",
                                                 "connections_full") else "requests"
        err["param"] = None
    return {"error": err}


_REASONS = {408: b"Request Timeout", 429: b"Too Many Requests", 431:
            b"Request Header Fields Too Large", 503: b"Service Unavailable",
            504: b"Gateway Timeout"}


def _raw_response(status: int, doc: dict[str, Any]) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 answer, for the protocol layer."""
    body = json.dumps(doc).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, _REASONS.get(status, b"Error"),
                                            len(body))) + body


async def _send_error(send: Any, status: int, doc: dict[str, Any],
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(doc).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# -- file descriptors --------------------------------------------------------------------------
def raise_fd_limit() -> int:
    """Lift the soft ``RLIMIT_NOFILE`` to the hard limit (capped at 1,048,576); return the
    soft limit now in force. Safe to call more than once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1_048_576
    want = min(want, 1_048_576)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return int(want if soft == resource.RLIM_INFINITY else soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return int(want)
    except (ValueError, OSError):
        return int(soft)


def connection_cap(limits: HttpLimits, fd_soft: int) -> int:
    """``max_connections``, lowered so that the sockets fit the fd limit with a reserve."""
    return max(1, min(limits.max_connections, fd_soft - FD_RESERVE))


# -- connection layer ----------------------------------------------------------------------------
def _noop(reason: str, status: int) -> None:
    return None


def server_options(limits: HttpLimits, *, on_reject: OnReject | None = None,
                   error_style: ErrorStyle = "bastion", protocol: str = "auto"
                   ) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config``/``uvicorn.run`` that enforce the
    connection layer of ``limits``: ``http`` (the protocol class), ``timeout_keep_alive``.

    Raises the soft fd limit (:func:`raise_fd_limit`) and lowers the connection cap to
    fit it. ``protocol``: ``auto`` (httptools when installed, else h11), ``httptools`` or
    ``h11``. Each call makes a new class: one per server (the class holds its sockets)."""
    cap = connection_cap(limits, raise_fd_limit())
    return {"http": protocol_class(limits, cap=cap, on_reject=on_reject,
                                   error_style=error_style, protocol=protocol),
            "timeout_keep_alive": limits.keepalive_timeout_s, "limit_concurrency": None,
            "h11_max_incomplete_event_size": limits.max_header_bytes}


def protocol_class(limits: HttpLimits, *, cap: int | None = None,
                   on_reject: OnReject | None = None, error_style: ErrorStyle = "bastion",
                   protocol: str = "auto") -> type:
    """uvicorn's HTTP protocol with the header/body timeouts, the head-size limit and the
    connection cap with eviction of idle sockets (see the module docs)."""
    base: type
    if protocol in ("auto", "httptools"):
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
        except ImportError:
            if protocol == "httptools":
                raise
            from uvicorn.protocols.http.h11_impl import H11Protocol as base
    elif protocol == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    else:
        raise BastionError(f"unknown HTTP protocol {protocol!r}", hint="auto, httptools or h11")

    count = on_reject or _noop
    max_conn = int(cap if cap is not None else limits.max_connections)
    header_s, body_s = float(limits.header_timeout_s), float(limits.body_timeout_s)
    max_head = int(limits.max_header_bytes)
    # sockets with no request in progress, oldest first (dicts keep insertion order)
    idle: dict[Any, None] = {}
    r408 = _raw_response(408, error_doc("request_timeout", "the request was not received "
                                        "in time; the connection is closed", style=error_style))
    r431 = _raw_response(431, error_doc("headers_too_large", f"the request head is over "
                                        f"{max_head} bytes", style=error_style))
    full = json.dumps(error_doc("connections_full", "the server has no free connection; "
                                "retry later", {"retry_after_s": 1}, style=error_style)).encode()

    async def refuse(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length",
                                                     str(len(full)).encode()),
            (b"retry-after", b"1"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": full})

    class LimitedProtocol(base):  # type: ignore[valid-type,misc]
        """uvicorn's protocol plus Bastion's connection limits."""

        bastion_idle = idle
        bastion_cap = max_conn

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._bt_timer: asyncio.TimerHandle | None = None
            self._bt_kind = ""
            self._bt_cycle: Any = None
            self._bt_head = 0  # bytes of the request head being read (httptools)
            self._bt_in_head = False
            self._bt_partial = False  # bytes came since the last answer
            if len(self.connections) > max_conn:
                victim = next(iter(idle), None)
                if victim is not None:
                    del idle[victim]
                    victim._bt_drop("connection_evicted", 0)
                else:  # every socket is busy: this one's request gets a 503
                    self.app = refuse
                    count("connections_full", 503)
            idle[self] = None
            self._bt_arm(header_s, "header")

        def connection_lost(self, exc: Exception | None) -> None:
            idle.pop(self, None)
            self._bt_cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing():
                return
            if self._bt_in_head:  # httptools: inside a request head (h11 caps its own)
                self._bt_head += len(data)
                if self._bt_head > max_head:
                    count("headers_too_large", 431)
                    self.transport.write(r431)
                    self.transport.close()
                    return
            cyc = self.cycle
            if cyc is not None and not cyc.response_complete:
                if cyc is not self._bt_cycle:  # a new request's head is complete
                    self._bt_cycle = cyc
                    self._bt_partial = False
                    idle.pop(self, None)
                    if cyc.more_body:
                        self._bt_arm(body_s, "body")
                    else:
                        self._bt_cancel()
                elif not cyc.more_body and self._bt_kind == "body":
                    self._bt_cancel()
            elif data:
                # between answers: the next request's head (or the unread rest of an
                # answered request's body); uvicorn's keep-alive timer is off now
                self._bt_partial = True
                if self._bt_timer is None:
                    self._bt_arm(header_s, "header")

        def on_message_begin(self) -> None:  # httptools only
            super().on_message_begin()
            self._bt_in_head, self._bt_head = True, 0

        def on_headers_complete(self) -> None:  # httptools only
            self._bt_in_head = False
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._bt_cancel()
            self._bt_partial = False
            if not self.transport.is_closing() and not getattr(self, "pipeline", None):
                idle.pop(self, None)
                idle[self] = None  # newest idle socket

        def _bt_arm(self, seconds: float, kind: str) -> None:
            self._bt_cancel()
            self._bt_kind = kind
            self._bt_timer = self.loop.call_later(seconds, self._bt_expire)

        def _bt_cancel(self) -> None:
            t = getattr(self, "_bt_timer", None)
            if t is not None:
                t.cancel()
                self._bt_timer = None
            self._bt_kind = ""

        def _bt_expire(self) -> None:
            kind, self._bt_timer = self._bt_kind, None
            if self.transport.is_closing():
                return
            cyc = self.cycle
            if kind == "header":
                if self._bt_partial:
                    count("header_timeout", 408)
                    self.transport.write(r408)
                else:
                    count("idle_timeout", 0)  # connected and silent: just closed
            elif kind == "body":
                count("body_timeout", 408)
                if cyc is not None and not cyc.response_started:
                    cyc.disconnected = True
                    cyc.message_event.set()
                    self.transport.write(r408)
            self.transport.close()

        def _bt_drop(self, reason: str, status: int) -> None:
            self._bt_cancel()
            count(reason, status)
            if not self.transport.is_closing():
                self.transport.close()

    LimitedProtocol.__name__ = f"Limited{base.__name__}"
    return LimitedProtocol


# -- request layer -------------------------------------------------------------------------------
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "bastion_deadline", default=None)


def deadline_remaining() -> float | None:
    """Seconds left before the current request's deadline (None outside a request run by
    :class:`LimitsMiddleware`); never negative."""
    d = _DEADLINE.get()
    if d is None:
        return None
    return max(0.0, d - asyncio.get_running_loop().time())


def deadline_scope(seconds: float | None = None, *, margin: float = 0.0) -> asyncio.Timeout:
    """``async with deadline_scope(margin=0.5):`` raises :class:`TimeoutError` in the block
    ``margin`` seconds before the current request's deadline (or after ``seconds``, when
    sooner; no limit outside a request with neither). For a route that wants to end its
    own answer (an upstream call, a stream relay: its own error frame and event) before
    :class:`LimitsMiddleware` cuts it."""
    loop = asyncio.get_running_loop()
    d = _DEADLINE.get()
    if d is not None:
        d -= margin
    if seconds is not None:
        t = loop.time() + seconds
        d = t if d is None else min(d, t)
    return asyncio.timeout_at(d)


def default_key(scope: dict[str, Any]) -> str:
    """The SHA-256 of the bearer token or ``X-API-Key`` when one is sent, else the client
    address (see the module docs on unverified tokens)."""
    for k, v in scope.get("headers") or ():
        if k == b"authorization":
            scheme, _, cred = v.partition(b" ")
            if scheme.lower() == b"bearer" and cred.strip():
                return "key:" + hashlib.sha256(cred.strip()).hexdigest()
        elif k == b"x-api-key" and v.strip():
            return "key:" + hashlib.sha256(v.strip()).hexdigest()
    client = scope.get("client")
    return f"ip:{client[0]}" if client else "ip:unknown"


class TokenBuckets:
    """One token bucket per key (``rate`` tokens a second, ``burst`` at most), for at most
    ``max_keys`` keys (the least recently seen key is forgotten first)."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = float(rate), float(burst), int(max_keys)
        self._b: dict[str, list[float]] = {}

    def _bucket(self, key: str, now: float) -> list[float]:
        """``key``'s bucket, refilled to ``now`` (created full; most recent last)."""
        b = self._b.pop(key, None)
        if b is None:
            b = [self.burst, now]
            if len(self._b) >= self.max_keys:
                del self._b[next(iter(self._b))]
        else:
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        self._b[key] = b
        return b

    def _wait(self, b: list[float]) -> float:
        return (1.0 - b[0]) / self.rate if self.rate > 0 else 1.0

    def take(self, key: str, now: float | None = None) -> float:
        """Take a token for ``key``: 0.0 when granted, else the seconds until one is."""
        b = self._bucket(key, time.monotonic() if now is None else now)
        if b[0] >= 1.0:
            b[0] -= 1.0
            return 0.0
        return self._wait(b)

    def lease(self, key: str, n: int, now: float | None = None) -> tuple[int, float]:
        """Take up to ``n`` (at least one) tokens of ``key``'s bucket: ``(granted, seconds
        until one more is there)`` (the wait is 0 when something was granted)."""
        b = self._bucket(key, time.monotonic() if now is None else now)
        granted = int(min(max(int(n), 1), math.floor(b[0])))
        b[0] -= granted
        return (granted, 0.0) if granted > 0 else (0, self._wait(b))


class LimitsMiddleware:
    """Pure ASGI: the per-key rate limit, the in-flight cap and the deadline (see the
    module docs). Add it last (outermost)."""

    def __init__(self, app: Any, *, limits: HttpLimits,
                 key_fn: Callable[[dict[str, Any]], str] | None = None,
                 exempt: tuple[str, ...] = EXEMPT_PATHS, on_reject: OnReject | None = None,
                 error_style: ErrorStyle = "bastion", buckets: Any = None) -> None:
        self.app, self.limits = app, limits
        self.key_fn = key_fn or default_key
        self.exempt = frozenset(exempt)
        self.count = on_reject or _noop
        self.style: ErrorStyle = error_style
        # ``buckets``: any object with :meth:`TokenBuckets.take` (e.g. buckets shared by
        # several processes); used only when the rate limit is on
        self.buckets = None if limits.rate_limit_per_s <= 0 else (
            buckets if buckets is not None else TokenBuckets(
                limits.rate_limit_per_s, limits.rate_limit_burst, limits.max_keys))
        self.inflight = 0
        self.delayed = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lim = self.limits
        counted = scope.get("path", "") not in self.exempt
        if counted:
            if self.buckets is not None:
                wait = self.buckets.take(self.key_fn(scope))
                if wait > 0:
                    retry = max(1, math.ceil(wait))
                    self.count("rate_limited", 429)
                    hold = min(wait, lim.rate_limit_delay_s)
                    if hold > 0 and self.delayed < lim.rate_limit_max_delayed:
                        self.delayed += 1
                        try:
                            await asyncio.sleep(hold)
                        finally:
                            self.delayed -= 1
                    await _send_error(send, 429, error_doc(
                        "rate_limited", f"too many requests: the limit is "
                        f"{lim.rate_limit_per_s:g} a second (bursts of "
                        f"{lim.rate_limit_burst}); retry after {retry} s",
                        {"retry_after_s": retry, "limit_per_s": lim.rate_limit_per_s,
                         "burst": lim.rate_limit_burst}, self.style),
                        [(b"retry-after", str(retry).encode())])
                    return
            if self.inflight >= lim.max_inflight:
                self.count("overloaded", 503)
                await _send_error(send, 503, error_doc(
                    "overloaded", f"the server is handling {lim.max_inflight} requests "
                    "already; retry later", {"retry_after_s": 1,
                                             "max_inflight": lim.max_inflight}, self.style),
                    [(b"retry-after", b"1")])
                return
        await self._run(scope, receive, send, counted)

    async def _run(self, scope: dict[str, Any], receive: Any, send: Any,
                   counted: bool) -> None:
        """Run the app in this task with a timer: at the deadline, a 504 goes out at once
        from a side task (when no answer has started; the app's own sends are dropped
        from then on) and this task is cancelled (a sync route's thread cannot be: its
        result is dropped when it ends)."""
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        st = {"started": False, "over": False, "sse": False, "gone": False}
        answer: list[asyncio.Task[Any]] = []
        lim = self.limits

        async def send_w(message: Any) -> None:
            if st["over"]:
                return  # the deadline answered for the app
            if message["type"] == "http.response.start":
                st["started"] = True
                for k, v in message.get("headers") or ():
                    if k.lower() == b"content-type" and v.startswith(b"text/event-stream"):
                        st["sse"] = True
            await send(message)

        async def receive_w() -> Any:
            message = await receive()
            if message.get("type") == "http.disconnect":
                st["gone"] = True
            return message

        def expire() -> None:
            st["over"] = True
            self.count("deadline_exceeded", 504)
            if not st["started"]:
                answer.append(loop.create_task(_send_error(send, 504, self._late())))
            if me is not None:
                me.cancel()

        timer = loop.call_later(lim.deadline_s, expire)
        token = _DEADLINE.set(loop.time() + lim.deadline_s)
        if counted:
            self.inflight += 1
        try:
            try:
                await self.app(scope, receive_w, send_w)
                if st["over"]:
                    await asyncio.sleep(0)  # take the cancellation meant for the app
            except asyncio.CancelledError:
                if not st["over"] or me is None or me.uncancel() > 0:
                    raise  # cancelled by someone else (a shutdown)
            except Exception:
                if st["gone"] or st["over"]:
                    return  # the client left (or a slow body was cut), or we answered
                raise
        finally:
            timer.cancel()
            _DEADLINE.reset(token)
            if counted:
                self.inflight -= 1
        if not st["over"]:
            return
        if answer:
            await answer[0]
        elif st["sse"]:
            await send({"type": "http.response.body", "more_body": False, "body":
                        f"data: {json.dumps(self._late())}\n\ndata: [DONE]\n\n".encode()})
        # otherwise the started answer stays incomplete and uvicorn closes the connection

    def _late(self) -> dict[str, Any]:
        d = self.limits.deadline_s
        return error_doc("deadline_exceeded", f"the request took longer than its deadline "
                         f"of {d:g} s", {"deadline_s": d}, self.style)
