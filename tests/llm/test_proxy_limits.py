"""The guard proxy's overall deadline (issue 14, item 10, first half): ``--timeout`` is
per upstream read, so an upstream dripping one chunk at a time ran for ever; the
deadline of :mod:`bastion.web.limits` covers the upstream and the whole streamed answer.
A real local upstream drips chunks; a per-key flood gets OpenAI-style 429s."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from keyed import authed_get, authed_post, authed_stream  # noqa: I001

from bastion.llm.guard import LlmGuard
from bastion.llm.proxy import create_guard_app
from bastion.web.limits import HttpLimits

DRIP_S = 0.4


async def dripping_upstream(scope: Any, receive: Any, send: Any) -> None:
    """An OpenAI-compatible upstream that sends one stream chunk every DRIP_S seconds
    (40 chunks), or answers a plain request after 40 * DRIP_S seconds."""
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif m["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    if scope["method"] == "GET":  # /v1/models
        data = b'{"object": "list", "data": [{"id": "drip", "object": "model"}]}'
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})
        return
    req = json.loads(body)
    gone = asyncio.Event()

    async def watch() -> None:  # the client (the proxy) went away: stop dripping
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch())

    def chunk(text: str) -> bytes:
        return ("data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk",
                                       "created": 1, "model": "drip", "choices": [
                                           {"index": 0, "delta": {"content": text},
                                            "finish_reason": None}]}) + "\n\n").encode()

    try:
        if req.get("stream"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            for i in range(40):
                await send({"type": "http.response.body", "more_body": True,
                            "body": chunk(f"w{i} " + "x" * 30)})
                try:
                    await asyncio.wait_for(gone.wait(), DRIP_S)
                    return
                except TimeoutError:
                    pass
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        try:
            await asyncio.wait_for(gone.wait(), 40 * DRIP_S)
            return
        except TimeoutError:
            pass
        doc = {"id": "c1", "object": "chat.completion", "created": 1, "model": "drip",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "late"},
                            "finish_reason": "stop"}]}
        data = json.dumps(doc).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})
    except (asyncio.CancelledError, OSError):
        pass
    finally:
        watcher.cancel()


def _proxy(uvicorn_thread: Any, upstream: str, detector: Any, **limits: Any) -> Any:
    lim = HttpLimits(**limits)
    app = create_guard_app(upstream, guard=LlmGuard(detector), timeout=5, limits=lim)
    th = uvicorn_thread(app)
    th.key()  # a client key for authed_* requests
    return th


CHAT = {"model": "drip", "messages": [{"role": "user", "content": "Tell me a story"}]}


def test_dripping_stream_is_cut_at_the_deadline(uvicorn_thread, keyword_detector):
    with uvicorn_thread(dripping_upstream) as up, \
            _proxy(uvicorn_thread, up.base_url, keyword_detector, deadline_s=2.0) as px:
        t = time.monotonic()
        frames = []
        with authed_stream("POST", px.base_url + "/chat/completions",
                          json={**CHAT, "stream": True}, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    frames.append(line[6:])
        took = time.monotonic() - t
        # a per-read timeout of 5 s never fires (a chunk every 0.4 s); the deadline does
        assert took < 2.0 + 2.0, took
        assert frames[-1] == "[DONE]"
        err = json.loads(frames[-2])["error"]
        assert err["code"] == "deadline_exceeded" and "message" in err and "type" in err
        assert any("w0" in f for f in frames[:-2])  # the answer was relayed until then
        # the proxy ended the stream itself (its relay runs in a deadline scope), so its
        # verdict says why, rather than "client_disconnected"
        (v,) = px.app.state.events.query(kinds="verdict")
        assert v.payload["outcome"] == "deadline_exceeded"
        assert v.payload["error"]["code"] == "deadline_exceeded"


def test_slow_plain_answer_gets_504(uvicorn_thread, keyword_detector):
    with uvicorn_thread(dripping_upstream) as up, \
            _proxy(uvicorn_thread, up.base_url, keyword_detector, deadline_s=1.5) as px:
        t = time.monotonic()
        r = authed_post(px.base_url + "/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 504 and time.monotonic() - t < 1.5 + 2.0
        assert r.json()["error"]["code"] == "deadline_exceeded"
        m = authed_get(px.base_url.removesuffix("/v1") + "/metrics",
                       headers=px.key("ops", "reader")).text
        assert 'bastion_llm_errors_total{code="deadline_exceeded"}' in m


def test_flooding_key_gets_429_on_the_proxy(uvicorn_thread, keyword_detector):
    with uvicorn_thread(dripping_upstream) as up, \
            _proxy(uvicorn_thread, up.base_url, keyword_detector, rate_limit_per_s=0.5,
                   rate_limit_burst=2, rate_limit_delay_s=0) as px, httpx.Client(timeout=10) as c:
        root = px.base_url.removesuffix("/v1")
        k1, k2 = px.key("flooder"), px.key("polite")
        codes = [c.get(px.base_url + "/models", headers=k1) for _ in range(8)]
        limited = [r for r in codes if r.status_code == 429]
        assert codes[0].status_code == 200 and len(limited) >= 4
        assert int(limited[0].headers["retry-after"]) >= 1
        err = limited[0].json()["error"]
        assert err["code"] == "rate_limited" and {"message", "type"} <= set(err)
        assert c.get(root + "/healthz", headers=k1).status_code == 200
        # the bucket is the verified key's: another key is not limited, and made-up
        # tokens share the address's bucket instead of getting fresh ones
        other = c.get(px.base_url + "/models", headers=k2)
        fake = [c.get(px.base_url + "/models", headers={"Authorization": f"Bearer fake{i}"})
                for i in range(8)]
        assert sum(r.status_code == 429 for r in fake) >= 4
        assert other.status_code == 200
