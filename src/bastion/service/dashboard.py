"""What the dashboard draws, summarised from the event store.

- traffic: answered inputs per time bucket, one series per verdict (allow, flag, block);
- drift: ``-log10 p`` of the input-drift and health monitors at each healing step
  (higher = stronger evidence of drift; 3 is p = 0.001);
- accuracy: share of the answers that feedback labels confirm, per time bucket;
- alerts, the healing timeline (audit decisions and model changes), the model versions.

Summaries read at most the latest ``max_events`` predictions, so the page stays fast on
a long-running store.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from bastion.service import schemas as s
from bastion.store import events as ev

VERDICTS = ("allow", "flag", "block")


def _strip(e: ev.Event) -> s.EventOut:
    """An event without inputs, client text or tracebacks (what a reader may see)."""
    from bastion.service.deps import event_out

    return event_out(e)


def _edges(t0: float, t1: float, n: int) -> np.ndarray:
    if t1 <= t0:
        t1 = t0 + 1.0
    return np.linspace(t0, t1, n + 1)


def dashboard_data(svc: Any, *, buckets: int = 40, models: s.ModelsResponse,
                   health: s.HealthResponse, max_events: int = 5000) -> s.DashboardData:
    from bastion.runtime.monitors import labelled_feedback

    store: ev.EventStore = svc.store
    now = time.time()
    preds = store.query(kinds=ev.PREDICTION, limit=max_events, newest_first=True)
    traffic: list[s.Series] = []
    accuracy: list[s.Series] = []
    bucket_s = 0.0
    if preds:
        t0, t1 = min(e.ts for e in preds), max(now, max(e.ts for e in preds))
        edges = _edges(t0, t1, buckets)
        bucket_s = float(edges[1] - edges[0])
        mids = (edges[:-1] + edges[1:]) / 2
        ts = np.asarray([e.ts for e in preds])
        verdict = np.asarray([str(e.payload.get("verdict", "allow")) for e in preds])
        idx = np.clip(np.searchsorted(edges, ts, side="right") - 1, 0, buckets - 1)
        for v in VERDICTS:
            counts = np.bincount(idx[verdict == v], minlength=buckets)
            traffic.append(s.Series(name=v, points=[
                s.Point(t=float(m), v=float(c)) for m, c in zip(mids, counts, strict=True)]))
        pairs = labelled_feedback(store, after_id=0, upto_id=store.last_id(), limit=2000)
        pairs = [(p, f) for p, f in pairs if f.ts >= t0]
        if pairs:
            fts = np.asarray([f.ts for _, f in pairs])
            ok = np.asarray([p.payload.get("label") == f.payload.get("label")
                             for p, f in pairs], dtype=float)
            fidx = np.clip(np.searchsorted(edges, fts, side="right") - 1, 0, buckets - 1)
            n = np.bincount(fidx, minlength=buckets)
            k = np.bincount(fidx, weights=ok, minlength=buckets)
            accuracy.append(s.Series(name="accuracy", points=[
                s.Point(t=float(mids[i]), v=float(k[i] / n[i])) for i in range(buckets)
                if n[i] > 0]))
    drift: dict[str, list[s.Point]] = {"input_drift": [], "health": []}
    for e in store.query(kinds=ev.HEALING_STEP, limit=200, newest_first=True)[::-1]:
        for sig in e.payload.get("signals") or []:
            mon = sig.get("monitor")
            val = sig.get("value")
            if mon in drift and isinstance(val, int | float) and math.isfinite(val):
                drift[mon].append(s.Point(t=e.ts, v=min(10.0, -math.log10(max(val, 1e-10)))))
    alerts = [_strip(e) for e in store.query(kinds=ev.ALERT, limit=50, newest_first=True)]
    explanations = [_strip(e) for e in store.query(kinds=ev.EXPLANATION, limit=6,
                                                    newest_first=True)]
    # the LLM guard proxy may share this store: its policy decisions are not healing steps
    healing = [_strip(e) for e in store.query(kinds=[ev.AUDIT, ev.MODEL_CHANGE], limit=300,
                                              newest_first=True)
               if e.payload.get("surface") != "llm"][:100]
    return s.DashboardData(
        now=now, bucket_s=bucket_s, traffic=traffic,
        drift=[s.Series(name=k, points=v) for k, v in drift.items()],
        accuracy=accuracy, alerts=alerts, healing=healing, models=models, health=health,
        explanations=explanations)
