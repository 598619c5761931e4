"""A per-client alert monitor that judges each client against the *other* clients.

:class:`~bastion.runtime.monitors.ClientAlertMonitor` compares a client's flagged share
with the detectors' calibrated false-positive rate. Under a natural drift every client's
inputs get flagged more often, so it would single out (and the default policy would
quarantine) ordinary clients. :class:`RelativeClientAlertMonitor` (same name,
``client_alert_rate``, so the same rules apply) tests a client's flagged share against
``max(expected_rate, share of the other clients)``: one client running an evasion or
extraction campaign stands out; a drift that touches everyone does not (the input-drift,
health and alert-rate monitors report that instead). Both monitors also run the score
test (:func:`~bastion.runtime.monitors.client_score_shift`): a client whose detector
scores sit above the other clients' (most adversarial inputs stay under the thresholds,
but their scores lean high) is singled out after a few dozen requests.
"""

from __future__ import annotations

from typing import Any

from bastion.runtime.monitors import (
    Signal,
    _binom_greater,
    _window_info,
    client_score_shift,
    reference_scores,
    score_shift_signal,
)
from bastion.store import events as ev


class RelativeClientAlertMonitor:
    """See the module docs. Arguments as for ``ClientAlertMonitor`` (including its score
    test, which already compares each client with the others); ``min_ratio``: the
    client's share must also be at least this multiple of the others' share."""

    name = "client_alert_rate"

    def __init__(self, *, expected_rate: float = 0.05, window: int = 1000,
                 min_requests: int = 20, alpha: float = 0.001, min_rate: float = 0.3,
                 min_ratio: float = 2.0, score_test: bool = True,
                 min_auc: float = 0.75) -> None:
        self.expected_rate, self.window = float(expected_rate), int(window)
        self.min_requests, self.alpha, self.min_rate = int(min_requests), float(alpha), \
            float(min_rate)
        self.min_ratio = float(min_ratio)
        self.score_test, self.min_auc = bool(score_test), float(min_auc)

    def evaluate(self, store: ev.EventStore, *, after_id: int, upto_id: int) -> list[Signal]:
        events = store.recent(ev.PREDICTION, self.window, after_id=after_id, before_id=upto_id)
        per: dict[str, list[int]] = {}
        for e in events:
            if not e.client_id or "quarantine" in (e.payload.get("fired") or []):
                continue
            per.setdefault(e.client_id, []).append(
                int(e.payload.get("verdict", "allow") != "allow"))
        total_k = sum(sum(v) for v in per.values())
        total_n = sum(len(v) for v in per.values())
        judged = {c: v for c, v in per.items() if len(v) >= self.min_requests}
        m = max(len(judged), 1)
        out: list[Signal] = []
        shift = client_score_shift(events, min_requests=self.min_requests,
                                   reference=reference_scores(store)) \
            if self.score_test else {}
        for c, v in sorted(judged.items()):
            k, n = sum(v), len(v)
            ko, no = total_k - k, total_n - n
            others = ko / no if no else None
            p0 = max(self.expected_rate, others if others is not None else 0.0)
            p = min(1.0, _binom_greater(k, n, min(p0, 0.999)) * m)
            rate = k / n
            if p < self.alpha and rate >= self.min_rate and (
                    others is None or rate >= self.min_ratio * others):
                ev_: dict[str, Any] = {"flagged": k, "n": n, "p_value_bonferroni": p,
                                       "others_rate": others, "clients_judged": m}
                out.append(Signal(
                    monitor=self.name, fired=True, severity="critical", client_id=c,
                    message=(f"client {c}: {k} of {n} requests flagged ({rate:.2f} vs "
                             f"{p0:.3f} for the other clients and the expected rate, "
                             f"p = {p:.2g} after Bonferroni over {m} clients)"),
                    value=rate, threshold=p0, evidence=ev_, window=_window_info(events)))
                continue
            sig = score_shift_signal(self.name, c, shift.get(c), k, n, m, alpha=self.alpha,
                                     min_auc=self.min_auc, window=_window_info(events))
            if sig is not None:
                out.append(sig)
        if not out:
            out.append(Signal(monitor=self.name, fired=False, window=_window_info(events),
                              message=f"no client stands out ({len(judged)} judged)",
                              evidence={"clients_judged": len(judged)}))
        return out
