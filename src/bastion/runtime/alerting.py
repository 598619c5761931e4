"""Alerts out: the healing controller's alerts, with a lifecycle, delivered to receivers.

**Lifecycle.** The controller writes an ``alert`` event when a monitor (per client)
starts firing (``status: "firing"``, once per episode) and another when it stops
(``status: "resolved"``). Both carry a :func:`fingerprint` of the alert's identity labels
(``alertname``, ``model``, ``client_id``), as Alertmanager fingerprints its alerts.

**Delivery.** :class:`AlertDispatcher` tails the event store for ``alert`` events (so the
alerts of a ``bastion heal`` running in another process go out too), de-duplicates them
by fingerprint (a firing alert already firing, or a resolution of an alert that is not
firing, is dropped and recorded as ``deduplicated``) and hands each notification to one
worker thread per receiver, through a bounded queue: :meth:`AlertDispatcher.poll` never
waits for a receiver, so a dead or slow receiver never blocks a request or the
controller. A worker posts with a timeout and retries connection errors, timeouts, 408,
429 and 5xx with exponential back-off (``Retry-After`` honoured, capped); another 4xx is
final. Every attempt is a ``delivery`` event in the store (receiver name, fingerprint,
attempt, outcome, HTTP status, duration; never the URL, which for Slack is itself a
secret, nor the signing secret). The dispatcher's cursor and the set of firing
fingerprints are kept in the store's state, under a lease, so a restart or a second
service instance sends nothing twice. A dispatcher that starts on a store without state
replays the history silently and sends only the alerts still firing.

**Receivers** (:class:`ReceiverConfig`, in the service config under ``alerting``):

- ``alertmanager``: the JSON body Alertmanager posts to its ``webhook_config`` receivers
  (``version: "4"``, ``groupKey``, ``status``, ``alerts: [{status, labels, annotations,
  startsAt, endsAt, generatorURL, fingerprint}]``, ...), so anything that consumes
  Alertmanager webhooks consumes Bastion's.
- ``webhook``: one alert as JSON, signed: ``X-Bastion-Timestamp: <unix seconds>`` and
  ``X-Bastion-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>``
  (:func:`verify_signature` checks one). The secret comes from ``secret_env`` (an
  environment variable) or ``secret``; it is a :class:`pydantic.SecretStr` and never
  appears in a repr, a log line or an event.
- ``slack``: a Slack incoming-webhook body (``text`` plus one coloured attachment).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from bastion.errors import BastionError
from bastion.store import events as ev

log = logging.getLogger("bastion.alerting")

SIGNATURE_HEADER = "X-Bastion-Signature"
TIMESTAMP_HEADER = "X-Bastion-Timestamp"
STATE_ALERTS_OUT = "alerts_out"
ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "not resolved yet"

__all__ = ["AlertDispatcher", "AlertingConfig", "Notification", "ReceiverConfig",
           "alert_labels", "alertmanager_payload", "fingerprint", "sign", "slack_payload",
           "verify_signature", "webhook_payload"]


# -- identity ----------------------------------------------------------------------------
def alert_labels(monitor: str, model: str, client_id: str | None = None) -> dict[str, str]:
    """The identity labels of an alert (what its fingerprint is computed over)."""
    labels = {"alertname": f"Bastion_{monitor}", "monitor": monitor, "model": model}
    if client_id:
        labels["client_id"] = str(client_id)
    return labels


def fingerprint(labels: dict[str, str]) -> str:
    """16 hex digits identifying an alert by its labels (order does not matter)."""
    text = json.dumps(sorted((str(k), str(v)) for k, v in labels.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- configuration ---------------------------------------------------------------------
class ReceiverConfig(BaseModel):
    """One receiver. ``url``: http(s) only; ``timeout_s`` per attempt; ``max_attempts``
    in all; back-off ``backoff_s * 2**(attempt-1)`` (jittered, at most ``max_backoff_s``);
    ``send_resolved``: also send resolutions. ``webhook`` needs ``secret_env`` or
    ``secret`` (the HMAC key)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["alertmanager", "webhook", "slack"]
    url: SecretStr
    secret: SecretStr | None = None
    secret_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_s: float = Field(default=5.0, gt=0.0, le=120.0)
    max_attempts: int = Field(default=5, ge=1, le=50)
    backoff_s: float = Field(default=1.0, ge=0.0, le=600.0)
    max_backoff_s: float = Field(default=60.0, ge=0.0, le=3600.0)
    send_resolved: bool = True

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: SecretStr) -> SecretStr:
        u = urlsplit(v.get_secret_value())
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("receiver url must be http:// or https:// with a host")
        return v

    @model_validator(mode="after")
    def _secret_for_webhook(self) -> ReceiverConfig:
        if self.kind == "webhook" and self.secret is None and not self.secret_env:
            raise ValueError(f"receiver {self.name!r}: a webhook receiver signs its "
                             "bodies; set secret_env (or secret)")
        return self

    def signing_key(self) -> bytes | None:
        """The HMAC key: ``$secret_env`` first, then ``secret``; None for other kinds.

        Raises:
            BastionError: a webhook receiver whose secret is missing or empty.
        """
        if self.kind != "webhook":
            return None
        val = os.environ.get(self.secret_env, "") if self.secret_env else ""
        if not val.strip() and self.secret is not None:
            val = self.secret.get_secret_value()
        if not val.strip():
            raise BastionError(f"alert receiver {self.name!r} has no signing secret",
                               hint=f"export {self.secret_env or 'a variable'} and name it "
                               "in secret_env")
        return val.strip().encode()


class AlertingConfig(BaseModel):
    """``receivers``; ``external_url`` (the service's address, for ``generatorURL`` and
    links); ``queue_size``: notifications waiting per receiver at most (more are
    dropped, and recorded)."""

    model_config = ConfigDict(extra="forbid")

    receivers: list[ReceiverConfig] = Field(default_factory=list)
    external_url: str | None = None
    queue_size: int = Field(default=1000, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _unique_names(self) -> AlertingConfig:
        names = [r.name for r in self.receivers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"receiver names must be unique: {', '.join(dup)}")
        return self


# -- notifications and payloads -------------------------------------------------------
@dataclass
class Notification:
    """One alert state change to deliver."""

    fingerprint: str
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: str
    ends_at: str
    event_id: int
    generator_url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_alert(self) -> dict[str, Any]:
        """Alertmanager's alert object."""
        return {"status": self.status, "labels": dict(self.labels),
                "annotations": dict(self.annotations), "startsAt": self.starts_at,
                "endsAt": self.ends_at, "generatorURL": self.generator_url,
                "fingerprint": self.fingerprint}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def alertmanager_payload(n: Notification, *, receiver: str,
                         external_url: str | None = None) -> dict[str, Any]:
    """Alertmanager's webhook body (version 4) for one notification."""
    group = {"alertname": n.labels.get("alertname", "")}
    return {"version": "4", "groupKey": "{}:" + json.dumps(group, sort_keys=True)
            + f":{n.fingerprint}", "truncatedAlerts": 0, "status": n.status,
            "receiver": receiver, "groupLabels": group, "commonLabels": dict(n.labels),
            "commonAnnotations": dict(n.annotations), "externalURL": external_url or "",
            "alerts": [n.as_alert()]}


def webhook_payload(n: Notification) -> dict[str, Any]:
    """The generic webhook body: one alert, plus the event id it came from."""
    return {**n.as_alert(), "source": "bastion", "event_id": n.event_id, **n.extra}


def slack_payload(n: Notification) -> dict[str, Any]:
    """A Slack incoming-webhook body."""
    firing = n.status == "firing"
    who = f" (client {n.labels['client_id']})" if n.labels.get("client_id") else ""
    head = (f"{'[FIRING]' if firing else '[RESOLVED]'} {n.labels.get('alertname', '')}"
            f" on {n.labels.get('model', '')}{who}")
    fields = [{"title": "severity", "value": n.labels.get("severity", ""), "short": True},
              {"title": "since", "value": n.starts_at, "short": True}]
    if not firing:
        fields.append({"title": "resolved at", "value": n.ends_at, "short": True})
    return {"text": head, "attachments": [{
        "color": "danger" if firing else "good", "title": head,
        "text": n.annotations.get("summary", ""), "fields": fields,
        "footer": f"bastion fingerprint {n.fingerprint}"}]}


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of ``timestamp + "." + body``."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(secret: bytes | str, body: bytes, timestamp: str, signature: str, *,
                     tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """Whether ``signature`` (the ``X-Bastion-Signature`` header) signs ``body`` with
    ``timestamp`` (``X-Bastion-Timestamp``), and the timestamp is within
    ``tolerance_s`` of now (an old, replayed body is refused)."""
    key = secret.encode() if isinstance(secret, str) else secret
    try:
        ts = float(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(key, timestamp, body), str(signature))


# -- delivery ----------------------------------------------------------------------------
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class _Worker:
    """One receiver's queue and thread."""

    def __init__(self, disp: AlertDispatcher, rc: ReceiverConfig, queue_size: int) -> None:
        import httpx

        self.disp, self.rc = disp, rc
        self.key = rc.signing_key()
        self.q: queue.Queue[Notification] = queue.Queue(maxsize=queue_size)
        self.client = httpx.Client(timeout=rc.timeout_s, follow_redirects=False)
        self.thread = threading.Thread(target=self._run, name=f"bastion-alerts-{rc.name}",
                                       daemon=True)
        self.thread.start()

    def body(self, n: Notification) -> tuple[bytes, dict[str, str]]:
        kind = self.rc.kind
        if kind == "alertmanager":
            doc = alertmanager_payload(n, receiver=self.rc.name,
                                       external_url=self.disp.config.external_url)
        elif kind == "slack":
            doc = slack_payload(n)
        else:
            doc = webhook_payload(n)
        body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "bastion-alerts/1"}
        if self.key is not None:
            ts = str(int(time.time()))
            headers[TIMESTAMP_HEADER] = ts
            headers[SIGNATURE_HEADER] = sign(self.key, ts, body)
        return body, headers

    def _run(self) -> None:
        stop = self.disp._stop
        while not stop.is_set():
            try:
                n = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.deliver(n)
            except Exception as exc:  # never let one notification end the worker
                self.disp._record(self.rc, n, 0, "failed", error=type(exc).__name__)
        self.client.close()

    def deliver(self, n: Notification) -> None:
        rc, stop = self.rc, self.disp._stop
        url = rc.url.get_secret_value()
        for attempt in range(1, rc.max_attempts + 1):
            body, headers = self.body(n)  # signed afresh: the timestamp is per attempt
            t0 = time.perf_counter()
            status: int | None = None
            error: str | None = None
            retry_after: float | None = None
            try:
                r = self.client.post(url, content=body, headers=headers)
                status = r.status_code
                ra = r.headers.get("retry-after", "")
                retry_after = float(ra) if ra.replace(".", "", 1).isdigit() else None
            except Exception as exc:  # connection refused, timeout, reset ...
                error = type(exc).__name__
            ms = round((time.perf_counter() - t0) * 1000, 1)
            if status is not None and 200 <= status < 300:
                self.disp._record(rc, n, attempt, "delivered", status=status, ms=ms)
                return
            final = attempt >= rc.max_attempts or (
                status is not None and status not in _RETRY_STATUS)
            self.disp._record(rc, n, attempt, "failed" if final else "retrying",
                              status=status, error=error, ms=ms)
            if final:
                return
            delay = min(rc.backoff_s * 2 ** (attempt - 1), rc.max_backoff_s)
            delay *= 0.5 + random.random() / 2
            if retry_after is not None:
                delay = min(max(delay, retry_after), rc.max_backoff_s)
            if stop.wait(delay):
                self.disp._record(rc, n, attempt, "abandoned",
                                  error="dispatcher stopped before the next attempt")
                return


class AlertDispatcher:
    """See the module docs.

    Args:
        store: the event store the controller writes alerts to.
        config: the :class:`AlertingConfig`.
        model_name: the served model (the state key; alerts of other models are skipped).

    Raises:
        BastionError: a webhook receiver without a signing secret.
    """

    def __init__(self, store: ev.EventStore, config: AlertingConfig, *, model_name: str,
                 lease_ttl_s: float = 60.0) -> None:
        self.store, self.config, self.model_name = store, config, str(model_name)
        self.lease_ttl_s = float(lease_ttl_s)
        self._stop = threading.Event()
        self._poll_lock = threading.Lock()
        self._owner = f"{os.getpid()}-{id(self)}"
        self.counts: dict[str, int] = {}
        self._count_lock = threading.Lock()
        self.workers = [_Worker(self, rc, config.queue_size) for rc in config.receivers]

    @property
    def state_key(self) -> str:
        return f"{STATE_ALERTS_OUT}:{self.model_name}"

    # -- reading alerts ---------------------------------------------------------------
    def poll(self) -> int:
        """Read new ``alert`` events, de-duplicate, queue the notifications; return how
        many were queued (per receiver counted once). Never waits for a receiver."""
        if not self.workers or self._stop.is_set():
            return 0
        with self._poll_lock:
            if not self.store.acquire_lease(self.state_key, self._owner,
                                            ttl_s=self.lease_ttl_s):
                return 0  # another instance delivers for this store
            try:
                return self._poll()
            finally:
                self.store.release_lease(self.state_key, self._owner)

    def _poll(self) -> int:
        st = self.store.get_state(self.state_key, None)
        fresh = st is None
        st = dict(st or {})
        cursor = int(st.get("cursor", 0))
        active: dict[str, dict[str, Any]] = dict(st.get("active") or {})
        out: list[Notification] = []
        while True:
            batch = self.store.query(kinds=ev.ALERT, after_id=cursor, limit=500)
            if not batch:
                break
            for e in batch:
                cursor = e.id
                n = self._notification(e, active)
                if n is not None:
                    out.append(n)
        if fresh:  # replayed history: send only what is still firing
            out = [n for n in out if n.status == "firing" and n.fingerprint in active]
        for n in out:
            for w in self.workers:
                if n.status == "resolved" and not w.rc.send_resolved:
                    continue
                try:
                    w.q.put_nowait(n)
                except queue.Full:
                    self._record(w.rc, n, 0, "dropped",
                                 error=f"queue full ({self.config.queue_size})")
        self.store.set_state(self.state_key, {"cursor": cursor, "active": active})
        return len(out)

    def _notification(self, e: ev.Event, active: dict[str, dict[str, Any]]
                      ) -> Notification | None:
        p = e.payload
        if p.get("surface") == "llm":
            return None
        model = str(p.get("model") or self.model_name)
        if model != self.model_name:
            return None
        monitor = str(p.get("monitor", "unknown"))
        labels = alert_labels(monitor, model, e.client_id)
        fp = str(p.get("fingerprint") or fingerprint(labels))
        status = "resolved" if p.get("status") == "resolved" else "firing"
        base = self.config.external_url.rstrip("/") if self.config.external_url else ""
        if status == "firing":
            if fp in active:
                self._record(None, None, 0, "deduplicated", fp=fp, event_id=e.id,
                             alert_status=status)
                return None
            sev = str(p.get("severity") or "warning")
            active[fp] = {"starts_at": _iso(e.ts), "event_id": e.id, "severity": sev,
                          "summary": str(p.get("message", ""))[:1000]}
            return Notification(
                fingerprint=fp, status="firing", labels={**labels, "severity": sev},
                annotations={"summary": str(p.get("message", ""))[:1000],
                             "value": "" if p.get("value") is None else str(p["value"]),
                             "threshold": "" if p.get("threshold") is None
                             else str(p["threshold"])},
                starts_at=_iso(e.ts), ends_at=ZERO_TIME, event_id=e.id,
                generator_url=f"{base}/dashboard" if base else "")
        was = active.pop(fp, None)
        if was is None:
            self._record(None, None, 0, "deduplicated", fp=fp, event_id=e.id,
                         alert_status=status)
            return None
        return Notification(
            fingerprint=fp, status="resolved",
            labels={**labels, "severity": str(was.get("severity", "warning"))},
            annotations={"summary": str(p.get("message", ""))[:1000] or was["summary"]},
            starts_at=str(was["starts_at"]), ends_at=_iso(e.ts), event_id=e.id,
            generator_url=f"{base}/dashboard" if base else "",
            extra={"firing_event_id": was.get("event_id")})

    # -- records ----------------------------------------------------------------------
    def _record(self, rc: ReceiverConfig | None, n: Notification | None, attempt: int,
                outcome: str, *, status: int | None = None, error: str | None = None,
                ms: float | None = None, fp: str | None = None, event_id: int | None = None,
                alert_status: str | None = None) -> None:
        payload = {
            "receiver": None if rc is None else rc.name,
            "receiver_kind": None if rc is None else rc.kind,
            "fingerprint": fp if n is None else n.fingerprint,
            "alert_status": alert_status if n is None else n.status,
            "alert_event_id": event_id if n is None else n.event_id,
            "attempt": attempt, "outcome": outcome, "http_status": status, "error": error,
            "duration_ms": ms, "model": self.model_name,
        }
        key = f"{payload['receiver']}:{outcome}"
        with self._count_lock:
            self.counts[key] = self.counts.get(key, 0) + 1
        if outcome in ("failed", "dropped", "abandoned"):
            log.warning("alert delivery %s: receiver=%s fingerprint=%s attempt=%d "
                        "http_status=%s error=%s", outcome, payload["receiver"],
                        payload["fingerprint"], attempt, status, error)
        try:
            self.store.append(ev.DELIVERY, payload)
        except Exception as exc:  # a closed or failing store: the log line is the record
            log.warning("alert delivery not recorded: %s", type(exc).__name__)

    def pending(self) -> int:
        """Notifications waiting in the receivers' queues."""
        return sum(w.q.qsize() for w in self.workers)

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the workers (an attempt under way finishes within its timeout; waiting
        notifications are left undelivered and the back-offs end)."""
        self._stop.set()
        for w in self.workers:
            w.thread.join(timeout=timeout_s)
