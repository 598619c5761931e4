"""Prometheus metrics of one service instance (a private ``CollectorRegistry`` per app, so
two apps in one process never share counters).

Counters and histograms are updated in the request path; the monitor gauges and the
healing counters are fed from the event store (:meth:`ServiceMetrics.observe_event`), so a
controller running in another process (``bastion heal``) shows up here too.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bastion.web.metrics import ChildCache

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _StoreErrors:
    """A collector reading the event store's failed-write count at scrape time."""

    def __init__(self) -> None:
        self.store: Any = None

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        c = CounterMetricFamily("bastion_event_store_errors",
                                "Failed writes to the event store", labels=[])
        c.add_metric([], float(getattr(self.store, "write_errors", 0)))
        yield c


class ServiceMetrics:
    """The service's metrics; ``render()`` gives the exposition text."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("bastion_http_requests_total", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("bastion_http_request_duration_seconds",
                                 "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.predictions = Counter("bastion_predictions_total",
                                   "Answered inputs by verdict and answering model",
                                   ["verdict", "answered_by"], registry=r)
        self.detector_fired = Counter("bastion_detector_fired_total",
                                      "Inputs on which a detector fired", ["detector"],
                                      registry=r)
        self.batch_size = Histogram("bastion_predict_batch_size", "Inputs per predict request",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
                                    registry=r)
        self.feedback = Counter("bastion_feedback_total", "Feedback labels by agreement",
                                ["correct"], registry=r)
        self.accuracy = Gauge("bastion_feedback_accuracy",
                              "Accuracy of the answers over the latest feedback labels",
                              registry=r)
        self.monitor_value = Gauge("bastion_monitor_value",
                                   "Latest value of each monitor (drift: smallest p-value; "
                                   "accuracy: windowed accuracy; alert rate: share)",
                                   ["monitor"], registry=r)
        self.monitor_fired = Gauge("bastion_monitor_fired",
                                   "1 when the monitor fired at the latest healing step",
                                   ["monitor"], registry=r)
        self.alerts = Counter("bastion_alerts_total", "Alerts raised by monitor",
                              ["monitor"], registry=r)
        self.healing = Counter("bastion_healing_actions_total",
                               "Healing decisions by action and outcome",
                               ["action", "done"], registry=r)
        self.model_changes = Counter("bastion_model_changes_total",
                                     "Alias moves, traffic switches and quarantines",
                                     ["type"], registry=r)
        self.champion = Gauge("bastion_champion_version", "Champion version serving now",
                              registry=r)
        self.quarantined = Gauge("bastion_quarantined_clients", "Quarantined clients",
                                 registry=r)
        self.client_errors = Counter("bastion_client_errors_total",
                                     "Rejected requests by error code", ["code"], registry=r)
        self.limited = Counter("bastion_http_limited_total",
                               "Requests and connections refused by a limit, by reason and "
                               "status (429 rate limit, 503 overload, 408 slow client, 504 "
                               "deadline, 431 head too large; 0: connection closed)",
                               ["reason", "status"], registry=r)

        self.fallback_active = Gauge("bastion_traffic_on_fallback",
                                     "1 while traffic goes to the fallback model", registry=r)
        self.fpr_scale = Gauge("bastion_guard_fpr_scale",
                               "Factor on every detector's calibrated false-positive rate "
                               "set by the healing controller (1: as calibrated)",
                               registry=r)
        self.squeeze_bits = Gauge("bastion_guard_squeeze_bits",
                                  "Bit depth inputs are squeezed to before a model answers "
                                  "(0: no squeezing)", registry=r)
        self.deliveries = Counter("bastion_alert_deliveries_total",
                                  "Alert delivery attempts by receiver and outcome "
                                  "(delivered, retrying, failed, dropped, abandoned, "
                                  "deduplicated)", ["receiver", "outcome"], registry=r)
        self._store_errors = _StoreErrors()
        r.register(self._store_errors)

        # children of the request-path metrics, by label values (``labels()`` validates
        # and locks on every call)
        self._child = ChildCache().child

    def request(self, route: str, method: str, status: str) -> Any:
        """The ``bastion_http_requests_total`` child for these labels."""
        return self._child(self.requests, route, method, status)

    def route_latency(self, route: str) -> Any:
        """The ``bastion_http_request_duration_seconds`` child of ``route``."""
        return self._child(self.latency, route)

    def prediction(self, verdict: str, answered_by: str) -> Any:
        """The ``bastion_predictions_total`` child for these labels."""
        return self._child(self.predictions, verdict, answered_by)

    def fired(self, detector: str) -> Any:
        """The ``bastion_detector_fired_total`` child of ``detector``."""
        return self._child(self.detector_fired, detector)

    def limit(self, reason: str, status: int) -> None:
        """Count one refusal by a limit (the ``on_reject`` of :mod:`bastion.web.limits`)."""
        self._child(self.limited, reason, str(status)).inc()

    def watch_store(self, store: Any) -> None:
        """Export ``store.write_errors`` as ``bastion_event_store_errors_total``."""
        self._store_errors.store = store

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_event(self, kind: str, payload: dict[str, Any]) -> None:
        """Update the monitor/healing metrics from one stored event (the LLM guard
        proxy's events, ``surface: "llm"`` in a shared store, have their own metrics)."""
        if payload.get("surface") == "llm":
            return
        if kind == "alert":
            if payload.get("status") != "resolved":
                self.alerts.labels(str(payload.get("monitor", "unknown"))).inc()
        elif kind == "delivery":
            self.deliveries.labels(str(payload.get("receiver") or "none"),
                                   str(payload.get("outcome", "unknown"))).inc()
        elif kind == "audit":
            self.healing.labels(str(payload.get("action", "unknown")),
                                "true" if payload.get("done") else "false").inc()
        elif kind == "model_change":
            self.model_changes.labels(str(payload.get("type", "unknown"))).inc()
        elif kind == "healing_step":
            for s in payload.get("signals") or []:
                mon = str(s.get("monitor", "unknown"))
                v = s.get("value")
                if isinstance(v, int | float):
                    self.monitor_value.labels(mon).set(float(v))
                self.monitor_fired.labels(mon).set(1.0 if s.get("fired") else 0.0)
