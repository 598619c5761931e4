"""The guard proxy's answer checks, as plain functions the proxy runs off its event loop.

- :class:`StreamRelay`: a streamed (SSE) answer, fed block by block as bytes arrive
  (:meth:`~StreamRelay.feed` returns the frames to send now). It parses the chunks,
  scans the text incrementally (:class:`~bastion.llm.outscan.OutputScanner`, linear in the
  answer), sends everything but the scanner's hold-back as soon as it is scanned, and keeps
  tool calls until the end of the stream: their fragments are assembled, checked (forbidden
  tools, secrets, unlisted URL hosts) and only then sent whole. Upstream chunks are
  re-framed: only ``role``, ``content``, ``tool_calls`` and ``finish_reason`` reach the
  client (not ``logprobs``, whose alternative tokens the scan does not read).
- :func:`screen_answer`: the same checks on a whole (non-streamed) chat completion, every
  choice of it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from bastion.llm.guard import WITHHELD, LlmGuard, _content_text, _strings
from bastion.llm.outscan import ToolCallCheck, Verdict

__all__ = ["StreamRelay", "AnswerCheck", "screen_answer", "tool_notice"]

def tool_notice(dropped: list[str], withheld: list[ToolCallCheck]) -> str:
    """The text that replaces blocked or withheld tool calls in an answer."""
    out = []
    if dropped:
        out.append(f"[tool call to {', '.join(dropped)} blocked by Bastion guard]")
    for w in withheld:
        kinds = ", ".join(dict.fromkeys(r["kind"] for r in w.reasons))
        out.append(f"[tool call to {w.name or '?'} withheld by Bastion guard: {kinds}]")
    return " ".join(out)


@dataclass
class AnswerCheck:
    """What the checks of one answer found."""

    leak: Verdict | None = None
    dropped: list[str] = field(default_factory=list)  # calls to forbidden tools
    withheld: list[ToolCallCheck] = field(default_factory=list)
    kept_calls: int = 0
    chars: int = 0


def _check_calls(guard: LlmGuard, calls: list[Any], system_prompt: str,
                 res: AnswerCheck) -> list[Any]:
    kept, dropped = guard.filter_tool_calls(calls)
    kept, withheld = guard.check_tool_calls(kept, system_prompt)
    res.dropped += dropped
    res.withheld += withheld
    res.kept_calls += len(kept)
    return kept


def screen_answer(guard: LlmGuard, data: dict[str, Any], system_prompt: str, *,
                  rid: str, model: str | None) -> tuple[dict[str, Any], AnswerCheck]:
    """Check a whole chat completion (every choice); the answer to send and the findings.
    Raises ``TypeError`` when it is not a chat completion."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not all(
            isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices):
        raise TypeError("not a chat completion")
    res = AnswerCheck()
    texts = []
    for ch in choices:
        ch.pop("logprobs", None)
        msg = ch["message"]
        texts.append(_content_text(msg) or "")
        texts += _strings({k: v for k, v in msg.items()
                           if k not in ("role", "content", "tool_calls", "function_call")})
    text = "\n".join(t for t in texts if t)
    res.chars = len(_content_text(choices[0]["message"]) or "")
    verdict = guard.output_scanner(system_prompt).feed(text, final=True)
    if not verdict.leak:  # the rest of the answer (ids, fingerprints...) for secrets
        rest = "\n".join(_strings({k: v for k, v in data.items() if k != "choices"}))
        verdict = guard.output_scanner("").feed(rest, final=True)
    if verdict.leak:
        res.leak = verdict
        safe: dict[str, Any] = {k: data[k] for k in ("object", "created", "usage") if k in data}
        safe.update(id=f"chatcmpl-{rid}", model=model or "", choices=[
            {"index": ch.get("index", i), "finish_reason": "content_filter",
             "message": {"role": "assistant", "content": WITHHELD}}
            for i, ch in enumerate(choices)])
        return safe, res
    for ch in choices:
        msg = ch["message"]
        n0 = (len(res.dropped), len(res.withheld))
        calls = msg.get("tool_calls")
        if calls is not None:
            kept = _check_calls(guard, calls if isinstance(calls, list) else [calls],
                                system_prompt, res)
            if kept:
                msg["tool_calls"] = kept
            else:
                msg.pop("tool_calls", None)
        if msg.get("function_call") is not None:  # the legacy single call
            fc = msg["function_call"]
            if not _check_calls(guard, [{"type": "function", "function": fc}],
                                system_prompt, res):
                msg.pop("function_call", None)
        new_dropped = res.dropped[n0[0]:]
        new_withheld = res.withheld[n0[1]:]
        if new_dropped or new_withheld:
            msg["content"] = ((msg.get("content") or "") if isinstance(msg.get("content"), str)
                              else "") + tool_notice(new_dropped, new_withheld)
            if not msg.get("tool_calls") and not msg.get("function_call"):
                ch["finish_reason"] = "content_filter"
    return data, res


class StreamRelay:
    """Relay one SSE answer (see module doc). Not thread-safe: one call at a time.

    After each :meth:`feed`, ``leak`` (a leak was found: send :meth:`withheld_frames`),
    ``error`` (an error code: the upstream broke off or sent an error) or ``done``
    (``[DONE]`` seen) may be set; :meth:`finish` sends the rest at the end.
    """

    def __init__(self, guard: LlmGuard, system_prompt: str, *, rid: str,
                 min_hold_back: int = 64, max_chars: int = 20_000_000) -> None:
        self.guard = guard
        self.system_prompt = system_prompt
        self.rid = rid
        # the per-piece checks only (see OutputScanner: the complete normaliser would
        # double the cost of a fast stream)
        self.scanner = guard.output_scanner(system_prompt, min_hold_back=min_hold_back,
                                            complete=False)
        self.hold_back = self.scanner.hold_back
        self.max_chars = int(max_chars)
        self._buf = b""
        self._pending = ""  # scanned, not sent yet (the hold-back)
        self._role_sent = False
        self.chars = 0
        self.valid = 0  # valid chat-completion chunks seen
        self.calls: dict[int, dict[str, Any]] = {}
        self._call_chars = 0
        self.meta: dict[str, Any] = {}
        self.finish_reason: str | None = None
        self.leak: Verdict | None = None
        self.error: str | None = None
        self.done = False
        self.check = AnswerCheck()

    @property
    def stopped(self) -> bool:
        return self.done or self.leak is not None or self.error is not None

    def frame(self, delta: dict[str, Any], reason: str | None = None) -> bytes:
        obj = {
            "id": self.meta.get("id") or f"chatcmpl-{self.rid}",
            "object": "chat.completion.chunk",
            "created": self.meta.get("created") or int(time.time()),
            "model": self.meta.get("model") or "",
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
        }
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def _take(self, chunk: dict[str, Any], text: list[str]) -> None:
        if "error" in chunk and not chunk.get("choices"):
            self.error = "upstream_error"
            return
        self.valid += 1
        if self.valid == 1:
            for k in ("id", "created", "model"):
                if isinstance(chunk.get(k), str | int):
                    self.meta[k] = chunk[k]
        for ch in chunk.get("choices") or ():
            if not isinstance(ch, dict):
                continue
            delta = ch.get("delta")
            if isinstance(delta, dict):
                c = delta.get("content")
                if isinstance(c, str):
                    text.append(c)
                if "tool_calls" in delta and isinstance(delta["tool_calls"], list):
                    for tc in delta["tool_calls"]:
                        self._take_call(tc)
                if "function_call" in delta and isinstance(delta["function_call"], dict):
                    self._take_call({"index": -1, "function": delta["function_call"]})
            if ch.get("finish_reason"):
                self.finish_reason = str(ch["finish_reason"])[:64]

    def _take_call(self, tc: Any) -> None:
        if not isinstance(tc, dict):
            return
        try:
            i = int(tc.get("index", 0))
        except (TypeError, ValueError):
            i = 0
        cur = self.calls.setdefault(i, {"id": None, "type": "function",
                                        "function": {"name": "", "arguments": ""}})
        if isinstance(tc.get("id"), str) and not cur["id"]:
            cur["id"] = tc["id"]
        f = tc.get("function")
        fn: dict[str, Any] = f if isinstance(f, dict) else {}
        for k in ("name", "arguments"):
            v = fn.get(k)
            if isinstance(v, str):
                cur["function"][k] += v
                self._call_chars += len(v)
            elif v is not None:  # a non-string fragment: kept as JSON, checked as such
                s = json.dumps(v)
                cur["function"][k] += s
                self._call_chars += len(s)

    def feed(self, data: bytes) -> bytes:
        """Take the next bytes of the stream; the frames to send now."""
        if self.stopped:
            return b""
        lines = (self._buf + data).split(b"\n")
        self._buf = lines.pop()
        if len(self._buf) > self.max_chars:
            self.error = "upstream_answer_too_large"
            return b""
        text: list[str] = []
        for raw in lines:
            raw = raw.strip()
            if not raw.startswith(b"data:"):
                continue  # comments, keep-alives, event names
            raw = raw[5:].strip()
            if raw == b"[DONE]":
                self.done = True
                break
            try:
                chunk = orjson.loads(raw)
            except (orjson.JSONDecodeError, RecursionError):
                continue  # a malformed chunk (invalid UTF-8 included) is skipped
            if not isinstance(chunk, dict) or not (
                    isinstance(chunk.get("choices"), list) or "error" in chunk):
                continue
            self._take(chunk, text)
            if self.error:
                break
        new = "".join(text)
        self.chars += len(new)
        if self.chars + self._call_chars > self.max_chars:
            self.error = "upstream_answer_too_large"
            return b""
        if new:
            v = self.scanner.feed(new)
            if v.leak:
                self.leak = v
                return b""
            self._pending += new
        upto = len(self._pending) - self.hold_back
        if upto > 0 or (self.valid and not self._role_sent):
            delta: dict[str, Any] = {"content": self._pending[:max(0, upto)]}
            if not self._role_sent:
                delta = {"role": "assistant", **delta}
                self._role_sent = True
            self._pending = self._pending[max(0, upto):]
            return self.frame(delta)
        return b""

    def withheld_frames(self) -> bytes:
        """The end of a stream whose text leaked: the notice and ``content_filter``."""
        return self.frame({"content": " " + WITHHELD}, "content_filter")

    def finish(self) -> bytes:
        """The end of a stream: the last checks, then the held-back text, the checked
        tool calls and the final frame (or, when the last checks find a leak, the
        notice: ``leak`` is set). ``check`` says what was dropped or withheld."""
        out = b""
        if self._buf and not self.done:  # a last line without its newline
            rest, self._buf = self._buf + b"\n", b""
            out = self.feed(rest)
            if self.stopped and not self.done:
                return out + (self.withheld_frames() if self.leak else b"")
        v = self.scanner.flush()
        if v.leak:
            self.leak = v
            return out + self.withheld_frames()
        if self._pending:
            out += self.frame({"content": self._pending})
            self._pending = ""
        reason = self.finish_reason or "stop"
        if self.calls:
            order = sorted(self.calls)
            calls = [self.calls[i] for i in order]
            kept = _check_calls(self.guard, calls, self.system_prompt, self.check)
            if kept:
                out += self.frame({"tool_calls": [{"index": i, **c}
                                                  for i, c in enumerate(kept)]})
            if self.check.dropped or self.check.withheld:
                out += self.frame({"content": tool_notice(self.check.dropped,
                                                          self.check.withheld)})
                if not kept:
                    reason = "content_filter"
        return out + self.frame({}, reason)
