"""What a ``reader`` may see of a stored event: the payload without client data or text.

:data:`CLIENT_TEXT_KEYS` names the payload keys that carry a client's data or words (model
inputs, a text's words in an explanation, the LLM proxy's prompt excerpts, tool-call
arguments, tracebacks that may quote them); :func:`redact` removes them at any depth.
Only an ``admin`` who asks (``include_inputs=true``) gets whole payloads. Both apps'
events routes use it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CLIENT_TEXT_KEYS", "redact"]

CLIENT_TEXT_KEYS = frozenset({
    "input", "inputs", "excerpt", "excerpts", "prompt", "prompts", "content", "text",
    "words", "messages", "arguments", "answer_text", "traceback"})


def redact(o: Any) -> Any:
    """``o`` without :data:`CLIENT_TEXT_KEYS` (at any depth)."""
    if isinstance(o, dict):
        return {k: redact(v) for k, v in o.items() if k not in CLIENT_TEXT_KEYS}
    if isinstance(o, list):
        return [redact(v) for v in o]
    return o
