"""The guard proxy's events, written into the shared Bastion event store.

The proxy writes to the same :class:`~bastion.store.events.EventStore` as the model
service (``bastion serve``), so one store (one SQLite file, or later one PostgreSQL
database) holds both surfaces, and the service's ``GET /v1/events`` shows LLM events
beside the model's. Every LLM event carries ``payload["surface"] == "llm"``.

Which store kinds the proxy uses, and why:

- ``verdict``: one per chat request, written when the request is finished: the screening
  verdict (``allow``, ``block``, ``strip``, ``wrap``; ``reject`` for a client's mistake),
  the reasons (which message, its role, whether it was a message or a tool/document
  result, its score against the threshold, the action, a short masked excerpt), the
  scores of every screened message, and the outcome (``allowed``, ``flagged``,
  ``blocked``, ``redacted``, ``upstream_error``, ``client_error``) with the HTTP status.
  The proxy never writes ``prediction`` events: the model service's monitors (alert rate
  per client, drift, accuracy) read the latest ``prediction`` events, and chat traffic in
  that window would skew them and shrink it.
- ``audit``: each policy decision with its evidence, in the shape of the healing
  controller's audit records (``actor``, ``action``, ``monitor``, ``done``,
  ``decision``, ``evidence``): ``block``/``strip``/``wrap`` of flagged input,
  ``redact`` of a leaking answer, ``drop_tool_calls`` of forbidden tool calls. The
  proxy's start (policy, thresholds, how many secrets, never their values) is audited too.
- ``alert``: an answer that would have leaked a configured secret or the system prompt
  (``monitor`` = ``llm_secret_leak`` / ``llm_system_prompt_leak``).

Never logged: API keys (the upstream key and the client's ``Authorization`` header) and
configured secrets. Every string in a payload is masked (each secret and key replaced by
``***``, case-insensitively, *before* cutting) and excerpts are cut to 200 characters;
whole prompts are never stored.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from bastion.store import events as ev

__all__ = ["LlmEventLog", "SURFACE", "ACTOR", "llm_events", "is_llm_event"]

SURFACE = "llm"
ACTOR = "llm_guard"
MASK = "***"


def is_llm_event(e: ev.Event) -> bool:
    """Whether a stored event was written by the LLM guard proxy."""
    return isinstance(e.payload, dict) and e.payload.get("surface") == SURFACE


def llm_events(
    store: ev.EventStore,
    *,
    kinds: Sequence[str] | str | None = None,
    request_id: str | None = None,
    client_id: str | None = None,
    since: float | None = None,
    limit: int = 100,
    newest_first: bool = True,
    scan_limit: int = 100_000,
) -> list[ev.Event]:
    """The latest ``limit`` LLM events of ``store`` (newest first by default), with the
    store's filters. Other surfaces' events are skipped; at most ``scan_limit`` events
    are read to find them."""
    out: list[ev.Event] = []
    before: int | None = None
    scanned = 0
    page = max(200, min(5000, 4 * limit))
    while len(out) < limit and scanned < scan_limit:
        batch = store.query(kinds=kinds, request_id=request_id, client_id=client_id,
                            since=since, before_id=before, limit=page, newest_first=True)
        if not batch:
            break
        scanned += len(batch)
        out += [e for e in batch if is_llm_event(e)]
        before = batch[-1].id - 1
        if before < 1:
            break
    out = out[:limit]
    return out if newest_first else out[::-1]


class LlmEventLog:
    """Masks, marks (``surface: "llm"``) and writes the proxy's events into an
    :class:`~bastion.store.events.EventStore` (see the module doc).

    Args:
        store: an open store, or its URL (``sqlite:///PATH``; the default
            ``sqlite:///:memory:`` keeps events for the life of the process only).
        mask: strings that must never be stored (secrets, API keys); empty ones are
            ignored.
        excerpt_chars: length of the excerpts of flagged content.
    """

    def __init__(
        self,
        store: ev.EventStore | str = "sqlite:///:memory:",
        *,
        mask: Iterable[str | None] = (),
        excerpt_chars: int = 200,
    ) -> None:
        self._owned = not isinstance(store, ev.EventStore)
        self.store = ev.EventStore(store) if isinstance(store, str) else store
        self.excerpt_chars = int(excerpt_chars)
        #: events this log wrote, by kind (since it was opened)
        self.written: Counter[str] = Counter()
        self._mask: re.Pattern[str] | None = None
        self.set_mask(mask)

    def set_mask(self, mask: Iterable[str | None]) -> None:
        """Replace the strings to mask (longest first, so one secret inside another is
        masked whole)."""
        words = sorted({m for m in mask if m and m.strip()}, key=len, reverse=True)
        self._words = words
        self._mask = re.compile("|".join(re.escape(w) for w in words), re.I) if words else None

    def add_mask(self, *words: str | None) -> None:
        """Mask these strings too."""
        self.set_mask([*self._words, *words])

    # -- cleaning ----------------------------------------------------------------------
    def scrub(self, s: str) -> str:
        """``s`` with every masked string replaced by ``***``."""
        return self._mask.sub(MASK, s) if self._mask is not None else s

    def excerpt(self, s: str) -> str:
        """A masked excerpt: masked first, then cut (a secret on the cut is never half
        kept)."""
        return self.scrub(s)[: self.excerpt_chars]

    def _clean(self, o: Any) -> Any:
        if isinstance(o, str):
            return self.scrub(o)
        if isinstance(o, dict):
            return {str(k): self._clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [self._clean(v) for v in o]
        return o

    # -- writing -----------------------------------------------------------------------
    def row(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        request_id: str | None = None,
        client_id: str | None = None,
    ) -> dict[str, Any]:
        """One event row for :meth:`write` (masked, marked as an LLM event)."""
        return {"kind": kind, "payload": {"surface": SURFACE, **self._clean(payload)},
                "request_id": request_id, "client_id": client_id, "ts": time.time()}

    def audit_row(
        self,
        action: str,
        monitor: str,
        decision: str,
        evidence: dict[str, Any],
        *,
        request_id: str | None = None,
        client_id: str | None = None,
    ) -> dict[str, Any]:
        """An ``audit`` row in the healing controller's shape (``done`` is True: the proxy
        applied the decision)."""
        return self.row(ev.AUDIT, {"actor": ACTOR, "action": action, "monitor": monitor,
                                   "done": True, "decision": decision,
                                   "evidence": evidence},
                        request_id=request_id, client_id=client_id)

    def write(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Append ``rows`` in one transaction (durable when this returns); their ids."""
        if not rows:
            return []
        ids = self.store.append_many(rows)
        self.written.update(str(r["kind"]) for r in rows)
        return ids

    # -- reading -----------------------------------------------------------------------
    def query(self, **filters: Any) -> list[ev.Event]:
        """LLM events of this store (:func:`llm_events`'s filters)."""
        return llm_events(self.store, **filters)

    def count(self, kind: str | None = None) -> int:
        """How many LLM events (of ``kind``) the store holds."""
        return len(llm_events(self.store, kinds=kind, limit=10**9, scan_limit=10**9))

    def close(self) -> None:
        """Close the store if this log opened it."""
        if self._owned:
            self.store.close()
