"""Monitors over windows of events, each turning numbers into :class:`Signal` s.

A monitor reads what it needs from the :class:`~bastion.store.events.EventStore`
(``evaluate(store, after_id=..., upto_id=...)``: the events with
``after_id < id <= upto_id``; the controller passes the id of the last model change as
``after_id`` so evidence about an old model does not count against a new one). Monitors
keep no state between calls, so ``bastion heal --once`` in a fresh process sees exactly
what a long-running controller sees.

- :class:`InputDriftMonitor`: the latest window of logged inputs against the reference:
  per-feature KS with a multiple-testing correction (and PSI), and an MMD test.
- :class:`HealthMonitor`: label-free health: the champion's confidence distribution (KS
  against the reference's), its entropy, and the prediction mix (chi-square against the
  reference's class mix).
- :class:`AccuracyMonitor`: the 0/1 error stream from feedback labels, through River's
  ADWIN (or Page-Hinkley), plus the windowed accuracy against a floor.
- :class:`AlertRateMonitor`: the share of flagged/blocked requests against what the
  detectors' calibrated false-positive rates predict (one-sided binomial test).
- :class:`ClientAlertMonitor`: the same per client (Bonferroni over clients), so one
  client running an evasion or extraction campaign stands out; plus a rank test of each
  client's detector scores against the other clients' (:func:`client_score_shift`),
  which notices adversarial inputs that mostly stay under the detectors' thresholds.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field

from bastion.store import events as ev

Severity = Literal["info", "warning", "critical"]


class Signal(BaseModel):
    """What one monitor concluded from one window."""

    monitor: str
    fired: bool
    severity: Severity = "info"
    message: str
    value: float | None = None
    threshold: float | None = None
    client_id: str | None = None
    evidence: dict[str, Any] = Field(default_factory=dict)
    window: dict[str, Any] = Field(default_factory=dict)


class Monitor(Protocol):
    name: str

    def evaluate(self, store: ev.EventStore, *, after_id: int, upto_id: int
                 ) -> list[Signal]: ...


def _window_info(events: list[ev.Event]) -> dict[str, Any]:
    if not events:
        return {"n": 0}
    return {"n": len(events), "first_id": events[0].id, "last_id": events[-1].id,
            "from": events[0].at, "to": events[-1].at}


def _binom_greater(k: int, n: int, p: float) -> float:
    from scipy.stats import binomtest

    if n == 0:
        return 1.0
    return float(binomtest(int(k), int(n), min(max(p, 1e-9), 1 - 1e-9),
                           alternative="greater").pvalue)


#: score keys of prediction events that are not per-input detector scores
_NOT_INPUT_SCORES = frozenset({"extraction", "quarantine"})


#: store state key: ``{detector: [scores of clean held-out reference inputs]}``, written by
#: whoever calibrates the guard's detectors (the service), read by the per-client monitors
REFERENCE_SCORES_KEY = "detector_reference_scores"


def reference_scores(store: ev.EventStore) -> dict[str, list[float]] | None:
    """The clean reference's detector scores recorded in ``store`` (None when absent)."""
    ref = store.get_state(REFERENCE_SCORES_KEY)
    return ref if isinstance(ref, dict) and ref else None


def client_score_shift(events: list[ev.Event], *, min_requests: int = 20,
                       min_auc: float = 0.75, exclude: frozenset[str] = _NOT_INPUT_SCORES,
                       reference: dict[str, list[float]] | None = None
                       ) -> dict[str, dict[str, Any]]:
    """Per client and detector: are the client's detector scores higher than the other
    clients'? A one-sided Mann-Whitney U test of the client's logged scores
    (``payload["scores"]``) against every other client's in the same window.

    This uses the whole score distribution, not only the scores above the detector's
    threshold, so a client whose inputs all lean towards "suspicious" (an evasion
    campaign: adversarial inputs that mostly stay under the thresholds) stands out after
    a few dozen requests where the flagged share alone would not. Scores of clients are
    exchangeable under the null hypothesis (clients sending the same kind of inputs), so
    the test needs no calibration, and a drift that shifts every client's scores alike
    does not single anybody out.

    With ``reference`` (``{detector: clean held-out scores}``) the client's scores must also
    be higher than the clean reference's: the reported p-value is the larger of the two
    tests' and the AUC the smaller (an intersection-union test, still of level alpha). So a
    clean client is not singled out just because the only other client in the window sends
    unusually typical inputs (an extraction stream of near-duplicates, say).

    Returns ``{client: {"p_value", "auc", "detector", "n", "n_others"}}`` for each client
    with at least ``min_requests`` scored requests (and as many from the others): the
    detector with the smallest p-value (not yet corrected for the number of detectors or
    clients) and its AUC (the probability that one of the client's scores exceeds one of
    the others'). ``min_auc`` is not applied here; callers compare ``auc`` with it.
    """
    from scipy.stats import mannwhitneyu

    per: dict[str, dict[str, list[float]]] = {}
    for e in events:
        sc = e.payload.get("scores")
        if not e.client_id or not isinstance(sc, dict) or \
                "quarantine" in (e.payload.get("fired") or []):
            continue
        d = per.setdefault(e.client_id, {})
        for k, v in sc.items():
            if k not in exclude and isinstance(v, int | float) and np.isfinite(v):
                d.setdefault(k, []).append(float(v))
    dets = sorted({k for d in per.values() for k in d})
    out: dict[str, dict[str, Any]] = {}
    for c, mine in per.items():
        best: dict[str, Any] | None = None
        for k in dets:
            a = mine.get(k, [])
            b = [v for o, d in per.items() if o != c for v in d.get(k, [])]
            if len(a) < min_requests or len(b) < min_requests:
                continue
            if np.ptp(a + b) == 0:
                continue  # every score equal: nothing to rank
            r = mannwhitneyu(a, b, alternative="greater", method="asymptotic")
            auc = float(r.statistic) / (len(a) * len(b))
            pv = float(r.pvalue)
            extra: dict[str, Any] = {}
            ref = [float(v) for v in (reference or {}).get(k, [])
                   if isinstance(v, int | float) and np.isfinite(v)]
            if len(ref) >= min_requests and np.ptp(a + ref) > 0:
                rr = mannwhitneyu(a, ref, alternative="greater", method="asymptotic")
                auc_ref = float(rr.statistic) / (len(a) * len(ref))
                extra = {"auc_others": auc, "auc_reference": auc_ref,
                         "n_reference": len(ref)}
                pv, auc = max(pv, float(rr.pvalue)), min(auc, auc_ref)
            if best is None or pv < best["p_value"]:
                best = {"p_value": pv, "auc": auc, "detector": k, "n": len(a),
                        "n_others": len(b), "n_detectors": 0, **extra}
        if best is not None:
            best["n_detectors"] = len(dets)
            out[c] = best
    return out


def score_shift_signal(monitor: str, client: str, res: dict[str, Any] | None, k: int, n: int,
                       m: int, *, alpha: float, min_auc: float,
                       window: dict[str, Any]) -> Signal | None:
    """A firing :class:`Signal` when ``res`` (one client's :func:`client_score_shift`
    entry) is significant after Bonferroni over ``m`` clients and its detectors, with an
    AUC of at least ``min_auc``; else None. ``k``/``n``: the client's flagged requests."""
    if res is None:
        return None
    p = min(1.0, res["p_value"] * max(m, 1) * max(int(res["n_detectors"]), 1))
    if p >= alpha or res["auc"] < min_auc:
        return None
    return Signal(
        monitor=monitor, fired=True, severity="critical", client_id=client,
        message=(f"client {client}: {res['detector']} scores higher than the other "
                 f"clients'{' and the clean reference' if 'auc_reference' in res else ''}"
                 f" (AUC {res['auc']:.2f} over {res['n']} requests, p = {p:.2g} "
                 f"after Bonferroni over {m} clients and {res['n_detectors']} detectors; "
                 f"{k} of {n} requests flagged)"),
        value=res["auc"], threshold=min_auc,
        evidence={"test": "score_shift", "flagged": k, "n": n, "p_value_bonferroni": p,
                  "clients_judged": m, **res}, window=window)


class InputDriftMonitor:
    """Input drift of the latest ``window`` logged inputs against ``reference``.

    Args:
        reference: clean reference inputs ``(n, *input_shape)``.
        window: inputs per test; no test below ``min_window``.
        alpha: significance level of each test (after the per-feature correction).
        correction: ``holm`` or ``bh`` for the per-feature KS tests.
        mmd: also run the multivariate MMD test (with at least ``3 / alpha``
            permutations, so that its p-value can reach ``alpha``).
        seed: random seed (MMD).
    """

    name = "input_drift"

    def __init__(self, reference: np.ndarray, *, window: int = 200, min_window: int = 100,
                 alpha: float = 0.001, correction: str = "holm", mmd: bool = True,
                 n_permutations: int = 300, seed: int = 0) -> None:
        from bastion.detect.drift import FeatureDriftTest, MMDDriftTest

        ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
        self.window = int(window)
        self.min_window = int(min_window)
        self.ks = FeatureDriftTest(alpha=alpha, correction=correction).fit(ref)
        # enough permutations that a p-value below alpha is reachable at all
        perms = max(int(n_permutations), int(np.ceil(3.0 / alpha)))
        self.mmd = MMDDriftTest(alpha=alpha, n_permutations=perms, max_reference=300,
                                seed=seed).fit(ref) if mmd else None
        self.n_features = ref.shape[1]

    def evaluate(self, store: ev.EventStore, *, after_id: int, upto_id: int) -> list[Signal]:
        events = [e for e in store.recent(ev.PREDICTION, self.window, after_id=after_id,
                                          before_id=upto_id)
                  if isinstance(e.payload.get("input"), list)
                  and len(e.payload["input"]) == self.n_features]
        if len(events) < self.min_window:
            return [Signal(monitor=self.name, fired=False, window=_window_info(events),
                           message=f"{len(events)} logged inputs; need {self.min_window}")]
        x = np.asarray([e.payload["input"] for e in events], dtype=np.float64)
        # repeated identical queries are a pattern of their own (replay, extraction), not
        # a change of the input distribution, and they would bias both tests: test the
        # distinct inputs
        x = np.unique(x, axis=0)
        if len(x) < max(self.min_window // 2, 10):
            return [Signal(monitor=self.name, fired=False, window=_window_info(events),
                           message=f"only {len(x)} distinct inputs in the window",
                           evidence={"n_distinct": len(x)})]
        ks = self.ks.test(x)
        ev_: dict[str, Any] = {"ks": ks.as_dict(), "n_distinct": len(x)}
        fired = ks.drift
        p = ks.p_value
        if self.mmd is not None:
            mm = self.mmd.test(x)
            ev_["mmd"] = mm.as_dict()
            fired = fired or mm.drift
            p = min(p, mm.p_value)
        which = [k for k in ("ks", "mmd") if ev_.get(k, {}).get("drift")]
        msg = (f"input drift: {', '.join(which)} (smallest p = {p:.2g}, "
               f"{ks.details['n_drifted']} features drifted)" if fired
               else f"no input drift (smallest p = {p:.2g})")
        return [Signal(monitor=self.name, fired=fired, severity="warning" if fired else "info",
                       message=msg, value=p, threshold=self.ks.alpha, evidence=ev_,
                       window=_window_info(events))]


class HealthMonitor:
    """Label-free health of the champion's answers.

    Args:
        reference_proba: the champion's probabilities on clean reference inputs.
        window: predictions per test; no test below ``min_window``.
        alpha: significance level of the confidence KS test and the mix chi-square.
    """

    name = "health"

    def __init__(self, reference_proba: np.ndarray, *, window: int = 200,
                 min_window: int = 100, alpha: float = 0.001) -> None:
        p = np.asarray(reference_proba, dtype=np.float64)
        self.ref_conf = p.max(1)
        q = np.clip(p, 1e-12, 1)
        self.ref_entropy = float((-(q * np.log(q)).sum(1)).mean())
        k = p.shape[1]
        self.ref_mix = np.bincount(p.argmax(1), minlength=k) / len(p)
        self.window, self.min_window, self.alpha = int(window), int(min_window), float(alpha)

    def evaluate(self, store: ev.EventStore, *, after_id: int, upto_id: int) -> list[Signal]:
        from scipy.stats import chisquare, ks_2samp

        events = store.recent(ev.PREDICTION, self.window, after_id=after_id, before_id=upto_id)
        events = [e for e in events if "confidence" in e.payload]
        if len(events) < self.min_window:
            return [Signal(monitor=self.name, fired=False, window=_window_info(events),
                           message=f"{len(events)} predictions; need {self.min_window}")]
        conf = np.asarray([e.payload["confidence"] for e in events], dtype=np.float64)
        ent = np.asarray([e.payload.get("entropy", 0.0) for e in events], dtype=np.float64)
        labels = [int(e.payload.get("champion_label", -1)) for e in events]
        k = len(self.ref_mix)
        counts = np.bincount([c for c in labels if 0 <= c < k], minlength=k).astype(float)
        # one-sided: the window is less confident (its CDF lies above the reference's)
        ks = ks_2samp(self.ref_conf, conf, alternative="less")
        exp = np.clip(self.ref_mix, 1e-3, None)
        exp = exp / exp.sum() * counts.sum()
        chi = chisquare(counts, exp)
        p_conf, p_mix = float(ks.pvalue), float(chi.pvalue)
        fired = p_conf < self.alpha or p_mix < self.alpha
        parts = []
        if p_conf < self.alpha:
            parts.append(f"confidence fell ({conf.mean():.3f} vs {self.ref_conf.mean():.3f})")
        if p_mix < self.alpha:
            parts.append("prediction mix changed")
        return [Signal(
            monitor=self.name, fired=fired, severity="warning" if fired else "info",
            message=("unhealthy: " + "; ".join(parts)) if fired else "healthy",
            value=min(p_conf, p_mix), threshold=self.alpha, window=_window_info(events),
            evidence={"mean_confidence": float(conf.mean()),
                      "reference_mean_confidence": float(self.ref_conf.mean()),
                      "mean_entropy": float(ent.mean()),
                      "reference_mean_entropy": self.ref_entropy,
                      "p_confidence": p_conf, "p_mix": p_mix,
                      "mix": (counts / max(counts.sum(), 1)).round(4).tolist(),
                      "reference_mix": self.ref_mix.round(4).tolist()})]


def labelled_feedback(store: ev.EventStore, *, after_id: int, upto_id: int,
                      limit: int | None = 5000) -> list[tuple[ev.Event, ev.Event]]:
    """``(prediction, feedback)`` pairs for feedback in ``(after_id, upto_id]``, oldest
    first (the latest ``limit``); the last feedback per request id wins."""
    if limit:
        fbs = store.recent(ev.FEEDBACK, limit, after_id=after_id, before_id=upto_id)
    else:
        fbs = store.query(kinds=ev.FEEDBACK, after_id=after_id, before_id=upto_id, limit=None)
    last: dict[str, ev.Event] = {}
    for f in fbs:
        if f.request_id:
            last[f.request_id] = f
    if not last:
        return []
    preds: dict[str, ev.Event] = {}
    ids = list(last)
    for i in range(0, len(ids), 500):
        for p in store.query(kinds=ev.PREDICTION, request_id=ids[i:i + 500], limit=None):
            preds.setdefault(str(p.request_id), p)
    pairs = [(preds[r], f) for r, f in last.items() if r in preds]
    return sorted(pairs, key=lambda t: t[1].id)


class AccuracyMonitor:
    """Errors from feedback labels: a streaming change detector and a floor.

    Args:
        method: ``adwin`` or ``page-hinkley`` (River), on the 0/1 error stream, rising
            errors only.
        min_feedback: no conclusion below this many labelled answers.
        min_accuracy: also fire when the accuracy over the latest ``window`` labelled
            answers is below this (``None``: off).
        window: labelled answers for the windowed accuracy.
        expected_accuracy: the champion's accuracy on trusted data; also fire when the
            window's error rate is significantly above ``1 - expected_accuracy +
            tolerance`` (one-sided binomial test at ``alpha``). This catches a model
            that was wrong from its first labelled answer on, where a change detector
            sees no change.
        options: passed to the River detector.
    """

    name = "accuracy"

    def __init__(self, *, method: str = "adwin", min_feedback: int = 30,
                 min_accuracy: float | None = None, window: int = 200,
                 expected_accuracy: float | None = None, tolerance: float = 0.05,
                 alpha: float = 0.001, options: dict[str, Any] | None = None) -> None:
        self.method = method
        self.min_feedback = int(min_feedback)
        self.min_accuracy = min_accuracy
        self.window = int(window)
        self.expected_accuracy = expected_accuracy
        self.tolerance = float(tolerance)
        self.alpha = float(alpha)
        self.options = dict(options or {})

    def evaluate(self, store: ev.EventStore, *, after_id: int, upto_id: int) -> list[Signal]:
        from bastion.detect.drift import StreamDriftDetector

        pairs = labelled_feedback(store, after_id=after_id, upto_id=upto_id)
        if len(pairs) < self.min_feedback:
            return [Signal(monitor=self.name, fired=False, evidence={"n_feedback": len(pairs)},
                           message=f"{len(pairs)} labelled answers; need {self.min_feedback}")]
        errors = []
        for p, f in pairs:
            pred = p.payload.get("label")
            if pred is None:
                pred = p.payload.get("champion_label")
            errors.append(int(pred is None or int(pred) != int(f.payload.get("label", -1))))
        det = StreamDriftDetector(self.method, direction="up", **self.options)
        for e in errors:
            det.update(e)
        recent = np.asarray(errors[-self.window:], dtype=float)
        acc = 1.0 - float(recent.mean())
        floor_hit = self.min_accuracy is not None and acc < self.min_accuracy
        stream_hit = det.n_detections_ > 0
        p_level = None
        level_hit = False
        if self.expected_accuracy is not None:
            allowed = min(1.0 - float(self.expected_accuracy) + self.tolerance, 1.0)
            p_level = _binom_greater(int(recent.sum()), len(recent), allowed)
            level_hit = p_level < self.alpha
        fired = floor_hit or stream_hit or level_hit
        evidence = {"n_feedback": len(errors), "window_accuracy": acc,
                    "overall_accuracy": 1.0 - float(np.mean(errors)),
                    "detector": self.method, "detections": det.detections_[-5:],
                    "error_before": det.mean_before_, "error_after": det.mean_after_,
                    "min_accuracy": self.min_accuracy,
                    "expected_accuracy": self.expected_accuracy,
                    "tolerance": self.tolerance, "p_level": p_level}
        why = []
        if stream_hit:
            b = float("nan") if det.mean_before_ is None else det.mean_before_
            a = float("nan") if det.mean_after_ is None else det.mean_after_
            why.append(f"{self.method} saw the error rate rise ({b:.3f} -> {a:.3f})")
        if floor_hit:
            why.append(f"window accuracy {acc:.3f} below {self.min_accuracy}")
        if level_hit:
            why.append(f"window accuracy {acc:.3f} significantly below the expected "
                       f"{self.expected_accuracy:.3f} - {self.tolerance} (p = {p_level:.2g})")
        return [Signal(monitor=self.name, fired=fired,
                       severity="critical" if fired else "info",
                       message=("accuracy dropped: " + "; ".join(why)) if fired
                       else f"accuracy {acc:.3f} on {len(recent)} labelled answers",
                       value=acc, threshold=self.min_accuracy, evidence=evidence,
                       window={"n": len(errors), "first_id": pairs[0][1].id,
                               "last_id": pairs[-1][1].id})]


class AlertRateMonitor:
    """Flagged/blocked share of the latest ``window`` predictions vs ``expected_rate``.

    Args:
        expected_rate: the share of clean traffic the guard flags (about the sum of the
            detectors' calibrated false-positive rates).
        window, min_window: predictions per test.
        alpha: significance level of the one-sided binomial test.
        min_rate: also require the observed rate to reach this share (guards against
            alarms on tiny excesses over a large window).
    """

    name = "alert_rate"

    def __init__(self, *, expected_rate: float = 0.05, window: int = 200,
                 min_window: int = 50, alpha: float = 0.001, min_rate: float = 0.1) -> None:
        self.expected_rate, self.window, self.min_window = float(expected_rate), int(window), \
            int(min_window)
        self.alpha, self.min_rate = float(alpha), float(min_rate)

    def evaluate(self, store: ev.EventStore, *, after_id: int, upto_id: int) -> list[Signal]:
        events = store.recent(ev.PREDICTION, self.window, after_id=after_id, before_id=upto_id)
        events = [e for e in events if "quarantine" not in (e.payload.get("fired") or [])]
        n = len(events)
        if n < self.min_window:
            return [Signal(monitor=self.name, fired=False, window=_window_info(events),
                           message=f"{n} predictions; need {self.min_window}")]
        k = sum(1 for e in events if e.payload.get("verdict", "allow") != "allow")
        by_det = Counter(d for e in events for d in (e.payload.get("fired") or []))
        p = _binom_greater(k, n, self.expected_rate)
        rate = k / n
        fired = p < self.alpha and rate >= self.min_rate
        return [Signal(monitor=self.name, fired=fired, severity="warning" if fired else "info",
                       message=(f"alert rate {rate:.3f} vs expected {self.expected_rate:.3f} "
                                f"(p = {p:.2g})"),
                       value=rate, threshold=self.expected_rate, window=_window_info(events),
                       evidence={"flagged": k, "n": n, "p_value": p,
                                 "by_detector": dict(by_det)})]


class ClientAlertMonitor:
    """Per-client flagged/blocked share over the latest ``window`` predictions.

    Args:
        expected_rate: the share of clean traffic the guard flags.
        window: predictions considered (all clients).
        min_requests: clients with fewer requests in the window are not judged.
        alpha: family-wise significance level (Bonferroni over the judged clients, and
            over the detectors for the score test).
        min_rate: the client's rate must also reach this share.
        score_test: also fire when the client's detector scores are significantly higher
            than the other clients' (:func:`client_score_shift`, Bonferroni over clients
            and detectors) with an AUC of at least ``min_auc``: this notices an evasion
            campaign whose inputs mostly stay under the detectors' thresholds.
    """

    name = "client_alert_rate"

    def __init__(self, *, expected_rate: float = 0.05, window: int = 1000,
                 min_requests: int = 20, alpha: float = 0.001, min_rate: float = 0.3,
                 score_test: bool = True, min_auc: float = 0.75) -> None:
        self.expected_rate, self.window = float(expected_rate), int(window)
        self.min_requests, self.alpha, self.min_rate = int(min_requests), float(alpha), \
            float(min_rate)
        self.score_test, self.min_auc = bool(score_test), float(min_auc)

    def evaluate(self, store: ev.EventStore, *, after_id: int, upto_id: int) -> list[Signal]:
        events = store.recent(ev.PREDICTION, self.window, after_id=after_id, before_id=upto_id)
        per: dict[str, list[int]] = {}
        for e in events:
            if not e.client_id or "quarantine" in (e.payload.get("fired") or []):
                continue
            per.setdefault(e.client_id, []).append(
                int(e.payload.get("verdict", "allow") != "allow"))
        judged = {c: v for c, v in per.items() if len(v) >= self.min_requests}
        out = []
        m = max(len(judged), 1)
        shift = client_score_shift(events, min_requests=self.min_requests,
                                   reference=reference_scores(store)) \
            if self.score_test else {}
        for c, v in sorted(judged.items()):
            k, n = sum(v), len(v)
            p = min(1.0, _binom_greater(k, n, self.expected_rate) * m)
            sig = score_shift_signal(self.name, c, shift.get(c), k, n, m, alpha=self.alpha,
                                     min_auc=self.min_auc, window=_window_info(events))
            if p < self.alpha and k / n >= self.min_rate:
                out.append(Signal(
                    monitor=self.name, fired=True, severity="critical", client_id=c,
                    message=(f"client {c}: {k} of {n} requests flagged "
                             f"({k / n:.2f} vs expected {self.expected_rate:.3f}, "
                             f"p = {p:.2g} after Bonferroni over {m} clients)"),
                    value=k / n, threshold=self.expected_rate,
                    evidence={"flagged": k, "n": n, "p_value_bonferroni": p,
                              "clients_judged": m}, window=_window_info(events)))
            elif sig is not None:
                out.append(sig)
        if not out:
            out.append(Signal(monitor=self.name, fired=False, window=_window_info(events),
                              message=f"no client stands out ({len(judged)} judged)",
                              evidence={"clients_judged": len(judged)}))
        return out
