"""A deliberately vulnerable chat agent speaking the OpenAI chat-completions protocol.

A real HTTP server (standard library, one thread per request) on 127.0.0.1 serving
``POST /v1/chat/completions`` with and without ``stream: true`` (SSE), and ``GET
/v1/models``. No language model: it "understands" its input by undoing obfuscation
(Bastion's normaliser) and obeys any instruction-like text in user, document or tool
content: it leaks its whole system prompt (secrets included), or calls the tool an injected
instruction names. Ordinary questions get an ordinary answer that leaks nothing; requests
that break a rule in the system prompt without any "jailbreak" wording are refused.

Special model names exercise failure handling: ``error-500``, ``malformed`` (invalid JSON),
``bad-utf8`` (non-UTF-8 bytes in the answer), ``flaky`` (503 on every second request),
``slow`` (sleeps ``slow_s`` seconds), ``rate-limited`` (429 with ``Retry-After: 0`` on every
second request), ``empty`` (no choices), ``echo-key-401`` (a 401 whose message echoes the
``Authorization`` header it got, as careless providers do), ``bad-model-404``, and for
streamed requests ``stream-garbage`` (no valid chunk) and ``stream-error`` (one chunk, then
an error object). For the security tests: ``echo`` answers the last message's text verbatim;
``tool-echo`` calls the first offered tool (``http_get`` if none) with the last message's
text as its arguments (streamed in 7-character fragments); ``long:N[:S]`` answers N
characters of filler (streamed over about S seconds).
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bastion.llm.normalize import normalize

TRIGGER = re.compile(
    r"ignore|disregard|forget|overrid|bypass|developer mode|system mode|jailbreak|no rules|"
    r"no filters|no restrictions|pretend|imagine|role ?play|hypothetical|act as|you are now|"
    r"reveal|secret|password|system prompt|your instructions|confidential|admin|opposite day|"
    r"grandmother|maintenance|override|audit|new instructions|decode|what z says",
    re.I,
)


LOREM = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
         "incididunt ut labore et dolore magna aliqua. ")


def _text_of(m: dict[str, Any]) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        return " ".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
    return ""


def agent_reply(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """What the vulnerable agent answers: ``(content, tool_calls)``."""
    msgs = body.get("messages") or []
    system = "\n".join(_text_of(m) for m in msgs if m.get("role") == "system")
    untrusted = [_text_of(m) for m in msgs if m.get("role") in ("user", "tool")]
    seen = normalize(" \n ".join(untrusted))
    tools = {
        (t.get("function") or {}).get("name")
        for t in body.get("tools") or []
        if isinstance(t, dict)
    }
    if TRIGGER.search(seen):
        for name in sorted(t for t in tools if t):
            if re.search(rf"\b(?:call|use|invoke|run)\b[^.]{{0,40}}\b{name}\b", seen):
                call = {
                    "id": "call_evil_1",
                    "type": "function",
                    "function": {
                        "name": name,
                        "arguments": json.dumps({"amount": 5000, "to_account": "99-1337"}),
                    },
                }
                return "", [call]
        return f"Sure, I will follow those instructions. My instructions are: {system}", []
    last = untrusted[-1] if untrusted else ""
    if "never" in system.lower() and re.search(r"how|give|tell|recommend|explain", last, re.I):
        return "I'm sorry, but I can't help with that request.", []
    return f"Happy to help! You asked about: {last[:80]}", []


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _send(
        self,
        status: int,
        body: bytes,
        ctype: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        err = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
        self._send(status, json.dumps(err).encode(), headers=headers)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(
                200,
                json.dumps(
                    {"object": "list", "data": [{"id": "vuln-agent", "object": "model"}]}
                ).encode(),
            )
        else:
            self._error(404, "not found")

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, "not found")
            return
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw.decode("utf-8"))
            assert isinstance(body, dict)
        except Exception:
            self._error(400, "request body is not valid JSON")
            return
        srv = self.server
        with srv.lock:
            srv.requests.append(body)
            srv.count += 1
            count = srv.count
        model = str(body.get("model", "vuln-agent"))
        if model == "error-500":
            self._error(500, "internal error")
            return
        if model == "flaky" and count % 2 == 1:
            self._error(503, "overloaded")
            return
        if model == "rate-limited" and count % 2 == 1:
            self._error(429, "slow down", headers={"Retry-After": "0"})
            return
        if model == "slow":
            time.sleep(srv.slow_s)
        if model == "malformed":
            self._send(200, b'{"choices": [ this is not json')
            return
        if model == "echo-key-401":  # a careless provider that echoes the key it got
            self._error(401, f"Incorrect API key provided: {self.headers.get('Authorization')}")
            return
        if model == "bad-model-404":
            self._error(404, f"The model {model} does not exist")
            return
        if model == "stream-garbage" and body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b"data: {not json\n\n: keep-alive\n\nhello\n\ndata: [DONE]\n\n")
            return
        if model == "stream-error" and body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            first = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]}
            err = {"error": {"message": "model crashed", "type": "server_error"}}
            self.wfile.write(f"data: {json.dumps(first)}\n\ndata: {json.dumps(err)}\n\n".encode())
            return
        if model == "empty":
            self._send(
                200, json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode()
            )
            return
        content, calls = agent_reply(body)
        msgs = body.get("messages") or [{}]
        if model == "echo":
            content, calls = _text_of(msgs[-1]), []
        elif model == "tool-echo":
            tool = next(((t.get("function") or {}).get("name") for t in body.get("tools") or []
                         if isinstance(t, dict)), None) or "http_get"
            content, calls = "", [{"id": "call_echo_1", "type": "function",
                                   "function": {"name": tool,
                                                "arguments": _text_of(msgs[-1])}}]
        elif model.startswith("long:"):
            n = int(model.split(":")[1])
            content, calls = (LOREM * (n // len(LOREM) + 1))[:n], []
        created = int(time.time())
        cid = f"chatcmpl-{count}"
        if body.get("stream"):
            self._stream(cid, created, model, content, calls)
            return
        msg: dict[str, Any] = {"role": "assistant", "content": content or None}
        if calls:
            msg["tool_calls"] = calls
        resp = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "message": msg, "finish_reason": "tool_calls" if calls else "stop"}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
        }
        data = json.dumps(resp).encode()
        if model == "bad-utf8":
            data = data.replace(b"Happy", b"H\xff\xfeppy").replace(b"Sure", b"S\xffure")
        self._send(200, data)

    def _stream(
        self, cid: str, created: int, model: str, content: str, calls: list[dict[str, Any]]
    ) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def chunk(delta: dict[str, Any], finish: str | None = None) -> None:
            obj = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        chunk({"role": "assistant", "content": ""})
        parts = model.split(":")
        pace = float(parts[2]) / max(1, len(content) // 16) if len(parts) > 2 else 0.0
        for i in range(0, len(content), 16):
            chunk({"content": content[i : i + 16]})
            if pace and (i // 16) % 100 == 99:
                time.sleep(pace * 100)
        for i, c in enumerate(calls):
            if model == "tool-echo":  # fragments, as real models stream arguments
                args = c["function"]["arguments"]
                chunk({"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                                       "function": {"name": c["function"]["name"],
                                                    "arguments": ""}}]})
                for j in range(0, len(args), 7):
                    chunk({"tool_calls": [{"index": i,
                                           "function": {"arguments": args[j : j + 7]}}]})
                continue
            chunk({"tool_calls": [{"index": i, **c}]})
        chunk({}, "tool_calls" if calls else "stop")
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int]) -> None:
        super().__init__(addr, _Handler)
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.count = 0
        self.slow_s = 2.0


class VulnerableServer:
    """Start with ``with VulnerableServer() as s: s.base_url`` (``http://127.0.0.1:PORT/v1``)."""

    def __init__(self, port: int = 0) -> None:
        self._srv = _Server(("127.0.0.1", port))
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._srv.server_address[1]}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self._srv.requests

    def set_slow(self, seconds: float) -> None:
        self._srv.slow_s = seconds

    def start(self) -> VulnerableServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()

    def __enter__(self) -> VulnerableServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
