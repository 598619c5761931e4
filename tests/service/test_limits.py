"""Limits that degrade gracefully (issue 14, item 3), played as an attacker would, over
real sockets against uvicorn on 127.0.0.1: slow heads and bodies are cut with 408, idle
sockets closed, slow sockets cannot silence /v1/health, a flooding key gets 429 while
another key is served, a full guard queue sheds 503, a request past its deadline gets
504, and bad limit options are one clear line. Limits are small so every test is quick."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from bastion.service.app import create_app
from bastion.service.server import ServiceThread
from bastion.web.limits import (
    HttpLimits,
    LimitsMiddleware,
    TokenBuckets,
    deadline_remaining,
    deadline_scope,
    server_options,
)

HEADER_S, BODY_S, KEEPALIVE_S, DEADLINE_S = 0.8, 0.8, 0.5, 2.0
LIMITS = HttpLimits(header_timeout_s=HEADER_S, body_timeout_s=BODY_S,
                    keepalive_timeout_s=KEEPALIVE_S, rate_limit_per_s=5, rate_limit_burst=5,
                    rate_limit_delay_s=0, deadline_s=DEADLINE_S, max_inflight=32)


@pytest.fixture(scope="module")
def service(svc_models, svc_mlflow, tmp_path_factory, make_config):
    d = tmp_path_factory.mktemp("svc-limits")
    cfg = make_config(svc_models[0], d / "events.db", svc_mlflow, model_name="svc-limits",
                      max_batch=16, max_queue_rows=4, limits=LIMITS)
    app = create_app(cfg)
    from bastion.web.keys import KeyStore

    store = KeyStore(app.state.service.store)
    KEYS.clear()
    for name in ("slow-body", "flooder", "other-key", "queue-a", "queue-b", "queue-c",
                 "deadline", "rotator"):
        KEYS[name] = store.create(name, "client")[0]
    KEYS["admin"] = store.create("limits-admin", "admin")[0]
    with ServiceThread(app) as st:
        yield st, app.state.service


#: real API keys by name (created by the ``service`` fixture): the rate limit keys on the
#: verified key, so made-up tokens would only be 401s charged to the peer address
KEYS: dict[str, str] = {}


def _conn(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_until_closed(s: socket.socket, limit_s: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the socket, and when it closed
    (seconds from now)."""
    t0 = time.monotonic()
    buf = b""
    s.settimeout(limit_s)
    while time.monotonic() - t0 < limit_s:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        buf += chunk
    return buf, time.monotonic() - t0


def _batch(digits: Any, n: int) -> list:
    return np.asarray(digits.x_test[:n]).tolist()


def _hold_guard(svc: Any) -> Any:
    """Make the guard look busy (a long pass in progress); returns the release function."""
    co = svc._coalescer
    with co._cv:
        co._busy = True

    def release() -> None:
        with co._cv:
            co._busy = False
            co._cv.notify_all()

    return release


def test_slow_header_is_cut_with_408(service):
    st, _ = service
    s = _conn(st.port)
    t0 = time.monotonic()
    s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
    got = b""
    for i in range(20):  # one header line every 0.15 s: never a complete head
        try:
            s.sendall(b"X-Drip-%d: a\r\n" % i)
        except OSError:
            break
        time.sleep(0.15)
        s.settimeout(0.01)
        try:
            got += s.recv(65536)
        except TimeoutError:
            pass
        except ConnectionResetError:
            break
        if got:
            break
    rest, _ = _read_until_closed(s, 3)
    took = time.monotonic() - t0
    s.close()
    got += rest
    assert got.startswith(b"HTTP/1.1 408"), got[:80]
    assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert HEADER_S * 0.9 <= took < HEADER_S + 2.0


def test_silent_and_idle_keepalive_sockets_are_closed(service):
    st, _ = service
    silent = _conn(st.port)  # connects and never sends a byte
    data, took = _read_until_closed(silent, 5)
    silent.close()
    assert data == b"" and took < HEADER_S + 2.0
    ka = _conn(st.port)  # one request, then idle on a keep-alive connection
    ka.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    ka.settimeout(5)
    first = ka.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    rest, took = _read_until_closed(ka, 5)
    ka.close()
    assert b"HTTP/1.1" not in rest and took < KEEPALIVE_S + 2.0


def test_slow_body_is_cut_with_408(service):
    st, svc = service
    before = _limited(svc, "body_timeout", "408")
    s = _conn(st.port)
    t0 = time.monotonic()
    s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"X-API-Key: " + KEYS["slow-body"].encode()
              + b"\r\nContent-Length: 5000\r\n\r\n{\"inputs\": [")
    got = b""
    for _ in range(30):
        try:
            s.sendall(b"0.0, ")
        except OSError:
            break
        time.sleep(0.1)
        s.settimeout(0.01)
        try:
            got += s.recv(65536)
        except TimeoutError:
            pass
        except ConnectionResetError:
            break
        if got:
            break
    rest, _ = _read_until_closed(s, 3)
    took = time.monotonic() - t0
    s.close()
    got += rest
    assert got.startswith(b"HTTP/1.1 408"), got[:80]
    assert took < BODY_S + 2.0
    assert _limited(svc, "body_timeout", "408") == before + 1


def _limited(svc: Any, reason: str, status: str) -> float:
    v = svc.metrics.registry.get_sample_value(
        "bastion_http_limited_total", {"reason": reason, "status": status})
    return float(v or 0.0)


def test_300_slow_connections_do_not_silence_health(service):
    st, _ = service
    socks = []
    try:
        for _ in range(300):
            s = _conn(st.port)
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # a head never finished
            socks.append(s)
        with httpx.Client(base_url=st.url, timeout=5) as c:
            for _ in range(5):
                t = time.monotonic()
                r = c.get("/v1/health")
                assert r.status_code == 200 and r.json()["status"] in ("ok", "degraded")
                assert time.monotonic() - t < 2.0
        # and every slow socket is cut by the header timeout
        deadline = time.monotonic() + HEADER_S + 5
        cut = 0
        for s in socks:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                continue
            cut += data.startswith(b"HTTP/1.1 408")
        assert cut == len(socks)
    finally:
        for s in socks:
            s.close()


def test_flooding_key_gets_429_while_another_key_is_served(service, digits):
    st, svc = service
    body = {"inputs": _batch(digits, 1)}
    with httpx.Client(base_url=st.url, timeout=10) as c:
        codes = [c.post("/v1/predict", json=body, headers={"X-API-Key": KEYS["flooder"]})
                 for _ in range(20)]
        limited = [r for r in codes if r.status_code == 429]
        assert len(limited) >= 10 and codes[0].status_code == 200
        r = limited[0]
        assert int(r.headers["retry-after"]) >= 1
        err = r.json()["error"]
        assert err["code"] == "rate_limited" and err["details"]["retry_after_s"] >= 1
        # another key (a bearer token) is served; health is never rate limited
        ok = c.post("/v1/predict", json=body,
                    headers={"Authorization": f"Bearer {KEYS['other-key']}"})
        assert ok.status_code == 200, ok.text
        for _ in range(10):
            assert c.get("/v1/health", headers={"X-API-Key": KEYS["flooder"]}).status_code == 200
        m = c.get("/metrics", headers={"X-API-Key": KEYS["admin"]}).text
        assert 'bastion_http_limited_total{reason="rate_limited",status="429"}' in m


def test_rotating_made_up_tokens_does_not_escape_the_limit(service, digits):
    """Unverified tokens are charged to the peer address, not to a bucket of their own:
    a client inventing a new token per request is still limited."""
    st, _ = service
    body = {"inputs": _batch(digits, 1)}
    with httpx.Client(base_url=st.url, timeout=10) as c:
        codes = [c.post("/v1/predict", json=body,
                        headers={"Authorization": f"Bearer made-up-{i}"}).status_code
                 for i in range(20)]
    assert codes[0] == 401 and codes.count(429) >= 10, codes


def test_full_queue_sheds_503_and_recovers(service, digits):
    st, svc = service
    release = _hold_guard(svc)
    out: dict[str, httpx.Response] = {}

    def post(name: str, n: int) -> None:
        with httpx.Client(base_url=st.url, timeout=10) as c:
            out[name] = c.post("/v1/predict", json={"inputs": _batch(digits, n)},
                               headers={"X-API-Key": KEYS[f"queue-{name}"]})

    try:
        ta = threading.Thread(target=post, args=("a", 1))
        ta.start()  # taken by the worker, which then waits for the guard
        time.sleep(0.3)
        tb = threading.Thread(target=post, args=("b", 4))
        tb.start()  # queued: 4 inputs wait (the limit)
        time.sleep(0.3)
        post("c", 1)  # would make 5 waiting: shed
        r = out["c"]
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
    finally:
        release()
    ta.join(10)
    tb.join(10)
    assert out["a"].status_code == 200 and out["b"].status_code == 200
    assert _limited(svc, "queue_full", "503") >= 1


def test_request_past_its_deadline_gets_504(service, digits):
    st, svc = service
    release = _hold_guard(svc)
    try:
        with httpx.Client(base_url=st.url, timeout=10) as c:
            t = time.monotonic()
            r = c.post("/v1/predict", json={"inputs": _batch(digits, 1)},
                       headers={"X-API-Key": KEYS["deadline"]})
            took = time.monotonic() - t
            assert r.status_code == 504, r.text
            assert r.json()["error"]["code"] == "deadline_exceeded"
            assert DEADLINE_S * 0.9 <= took < DEADLINE_S + 2.0
            assert c.get("/v1/health").status_code == 200
    finally:
        release()
    assert _limited(svc, "deadline_exceeded", "504") >= 1


# -- the layers alone (no model), both uvicorn HTTP parsers ---------------------------------
async def _echo_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif m["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/early":  # answers before reading the body (a size limit)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _Server:
    def __init__(self, app: Any, limits: HttpLimits, protocol: str) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.rejects: list[tuple[str, int]] = []
        opts = server_options(limits, on_reject=lambda r, s: self.rejects.append((r, s)),
                              protocol=protocol)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off",
                                                    **opts))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        t = time.monotonic()
        while not self.server.started and time.monotonic() - t < 10:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.mark.parametrize("protocol", ["httptools", "h11"])
def test_connection_layer_with_both_parsers(protocol):
    lim = HttpLimits(header_timeout_s=0.5, body_timeout_s=0.5, max_connections=8,
                     max_header_bytes=2048)
    with _Server(_echo_app, lim, protocol) as srv:
        s = _conn(srv.port)  # slow head
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        data, took = _read_until_closed(s, 5)
        assert data.startswith(b"HTTP/1.1 408") and took < 2.5, (protocol, data[:60])
        s = _conn(srv.port)  # slow body
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        data, took = _read_until_closed(s, 5)
        assert data.startswith(b"HTTP/1.1 408") and took < 2.5, (protocol, data[:60])
        s = _conn(srv.port)  # an endless head
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096)
        data, _ = _read_until_closed(s, 5)  # (h11 enforces the cap itself: 400)
        assert data.startswith(b"HTTP/1.1 431" if protocol == "httptools" else b"HTTP/1.1 400"), (
            protocol, data[:60])
        # an answered request's unread body is not the next request's head
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.port}", timeout=5) as c:
            for _ in range(2):
                assert c.post("/early", content=b"a" * 1_000_000).status_code == 413
                r = c.post("/", content=b"next")  # same keep-alive connection
                assert r.status_code == 200 and r.content == b"next", (protocol, r.text)
        # 30 idle sockets against a cap of 8: the oldest idle ones are closed, and a real
        # request still gets its answer
        idle = [_conn(srv.port) for _ in range(30)]
        time.sleep(0.2)
        with httpx.Client(timeout=5) as c:
            r = c.post(f"http://127.0.0.1:{srv.port}/", content=b"hello")
            assert r.status_code == 200 and r.content == b"hello"
        closed = 0
        for s in idle:
            s.settimeout(0.05)
            try:
                closed += s.recv(10) == b""
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed += 1
            s.close()
        assert closed >= 30 - 8
        assert ("connection_evicted", 0) in srv.rejects
        assert ("header_timeout", 408) in srv.rejects and ("body_timeout", 408) in srv.rejects


def test_inflight_cap_sheds_503_but_not_health():
    import asyncio

    gate = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] != "/v1/health":
            await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    lim = HttpLimits(max_inflight=2, rate_limit_per_s=0)
    app = LimitsMiddleware(slow, limits=lim)

    async def main() -> list[int]:
        async def call(path: str) -> int:
            st: dict[str, int] = {}

            async def send(m: Any) -> None:
                if m["type"] == "http.response.start":
                    st["s"] = m["status"]

            async def receive() -> Any:
                return {"type": "http.request", "body": b"", "more_body": False}

            await app({"type": "http", "path": path, "headers": [], "client": ("1.2.3.4", 1)},
                      receive, send)
            return st["s"]

        held = [asyncio.create_task(call("/work")) for _ in range(2)]
        await asyncio.sleep(0.05)
        over = await call("/work")
        health = await call("/v1/health")
        gate.set()
        return [over, health, *await asyncio.gather(*held)]

    assert asyncio.run(main()) == [503, 200, 200, 200]


def test_a_flooding_clients_429_is_held_back_but_not_without_bound():
    import asyncio

    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call(app: Any) -> tuple[int, float, dict[bytes, bytes]]:
        st: dict[str, Any] = {}

        async def send(m: Any) -> None:
            if m["type"] == "http.response.start":
                st["s"], st["h"] = m["status"], dict(m["headers"])

        t = time.monotonic()
        await app({"type": "http", "path": "/x", "headers": [], "client": ("9.9.9.9", 1)},
                  None, send)
        return st["s"], time.monotonic() - t, st["h"]

    async def main() -> None:
        held = LimitsMiddleware(ok, limits=HttpLimits(rate_limit_per_s=2, rate_limit_burst=1,
                                                      rate_limit_delay_s=0.3))
        assert (await call(held))[0] == 200
        status, took, headers = await call(held)  # limited: answered after 0.3 s
        assert status == 429 and took >= 0.25 and headers[b"retry-after"] == b"1"
        # at most rate_limit_max_delayed held at once: the rest are answered at once
        capped = LimitsMiddleware(ok, limits=HttpLimits(
            rate_limit_per_s=0.1, rate_limit_burst=1, rate_limit_delay_s=5,
            rate_limit_max_delayed=2))
        await call(capped)
        t = time.monotonic()
        tasks = [asyncio.create_task(call(capped)) for _ in range(3)]
        done, _ = await asyncio.wait(tasks, timeout=1.0)
        assert len(done) == 1 and next(iter(done)).result()[0] == 429
        assert time.monotonic() - t < 1.5
        for x in tasks:
            x.cancel()

    asyncio.run(main())


def test_token_bucket_refills_and_forgets_old_keys():
    b = TokenBuckets(rate=2.0, burst=2, max_keys=2)
    assert b.take("a", 0.0) == 0 and b.take("a", 0.0) == 0
    assert b.take("a", 0.0) == pytest.approx(0.5)
    assert b.take("a", 0.5) == 0  # one token back after 0.5 s at 2/s
    b.take("b", 1.0)
    b.take("c", 1.0)  # three keys, room for two: "a" (least recent) is forgotten
    assert "a" not in b._b and len(b._b) == 2


def test_token_bucket_lease_grants_what_is_there_and_never_more():
    """The Ray Serve replicas lease tokens in batches from one shared bucket a key."""
    b = TokenBuckets(rate=4.0, burst=5)
    assert b.lease("k", 3, now=0.0) == (3, 0.0)
    assert b.lease("k", 10, now=0.0) == (2, 0.0)  # only two left: never an overdraft
    granted, wait = b.lease("k", 1, now=0.0)
    assert granted == 0 and wait == pytest.approx(0.25)
    assert b.lease("k", 10, now=0.5) == (2, 0.0)  # 0.5 s at 4/s refilled two
    assert b.take("k", 0.5) == pytest.approx(0.25)  # take and lease share the bucket


# -- options ------------------------------------------------------------------------------
@pytest.mark.parametrize("args,opt", [
    (["--rate-limit", "-1"], "--rate-limit"), (["--header-timeout", "0"], "--header-timeout"),
    (["--max-connections", "0"], "--max-connections"), (["--deadline", "-5"], "--deadline"),
    (["--max-inflight", "0"], "--max-inflight"), (["--max-queue", "0"], "--max-queue"),
    (["--rate-burst", "0"], "--rate-burst"), (["--body-timeout", "0"], "--body-timeout"),
    (["--rate-delay", "-1"], "--rate-delay"),
])
def test_bad_limit_options_are_one_clear_line(args, opt):
    import typer

    from bastion.cli.serve import register

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """test app"""

    register(app)
    r = CliRunner().invoke(app, ["serve", "--model", "builtin:x", "--reference",
                                 "builtin:digits", *args])
    assert r.exit_code != 0
    msg = str(r.exception)
    assert opt in msg and "\n" not in msg, msg


def test_bad_guard_llm_limit_option_is_one_clear_line():
    from bastion.cli.llm import register

    app = typer_app(register)
    r = CliRunner().invoke(app, ["guard-llm", "--upstream", "http://127.0.0.1:9/v1",
                                 "--deadline", "0"])
    assert r.exit_code != 0
    msg = str(r.exception)
    assert "--deadline" in msg and "\n" not in msg, msg


def typer_app(register: Any) -> Any:
    import typer

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """test app"""

    register(app)
    return app


def test_deadline_answers_504_at_once_even_while_a_sync_route_blocks_its_thread():
    from fastapi import FastAPI

    app = FastAPI()
    release = threading.Event()

    @app.get("/slow")
    def slow() -> dict[str, str]:  # a sync route: runs in a worker thread
        release.wait(10)
        return {"late": "yes"}

    app.add_middleware(LimitsMiddleware, limits=HttpLimits(deadline_s=0.8))
    with _Server(app, HttpLimits(), "auto") as srv, httpx.Client(timeout=10) as c:
        try:
            t = time.monotonic()
            r = c.get(f"http://127.0.0.1:{srv.port}/slow")
            took = time.monotonic() - t
            assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
            assert 0.7 <= took < 2.5
        finally:
            release.set()
        # the connection and the server keep working once the thread ends
        assert c.get(f"http://127.0.0.1:{srv.port}/docs").status_code == 200


def test_deadline_scope_lets_a_route_end_its_own_answer_first():
    import asyncio

    seen: dict[str, Any] = {}

    async def relay(scope: Any, receive: Any, send: Any) -> None:
        seen["left"] = deadline_remaining()
        try:
            async with deadline_scope(margin=0.3):
                await asyncio.sleep(5)  # an upstream that drips for ever
            body = b"done"
        except TimeoutError:
            body = b"my own error frame"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    app = LimitsMiddleware(relay, limits=HttpLimits(deadline_s=0.6, rate_limit_per_s=0))

    async def main() -> list[Any]:
        out: list[Any] = []

        async def send(m: Any) -> None:
            out.append(m.get("status") or m.get("body"))

        t = time.monotonic()
        await app({"type": "http", "path": "/x", "headers": [], "client": None}, None, send)
        out.append(time.monotonic() - t)
        return out

    status, body, took = asyncio.run(main())
    assert status == 200 and body == b"my own error frame" and 0.2 < took < 0.55
    assert 0.5 < seen["left"] <= 0.6
