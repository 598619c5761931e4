"""Monitors on synthetic event windows: each fires on its condition and not on clean."""

from __future__ import annotations

import numpy as np

from bastion.runtime.monitors import (
    AccuracyMonitor,
    AlertRateMonitor,
    ClientAlertMonitor,
    HealthMonitor,
    InputDriftMonitor,
)
from bastion.store import events as ev
from bastion.store.events import EventStore


def _preds(store, rng, n, *, conf=(0.9, 1.0), flag_rate=0.0, client="c", shift=0.0,
           labels=None):
    rows = []
    for i in range(n):
        lab = int(rng.integers(0, 3)) if labels is None else int(labels[i])
        rows.append({"kind": ev.PREDICTION, "client_id": client, "request_id": f"{client}{i}",
                     "payload": {"label": lab, "champion_label": lab,
                                 "confidence": float(rng.uniform(*conf)), "entropy": 0.1,
                                 "verdict": "flag" if rng.random() < flag_rate else "allow",
                                 "fired": [],
                                 "input": (rng.normal(size=4) + shift).round(4).tolist()}})
    store.append_many(rows)


def test_health_and_drift_monitors(tmp_path):
    rng = np.random.default_rng(0)
    ref_p = np.zeros((600, 3))
    ref_p[np.arange(600), rng.integers(0, 3, 600)] = rng.uniform(0.9, 1.0, 600)
    ref_x = rng.normal(size=(600, 4))
    health = HealthMonitor(ref_p, window=150, min_window=100)
    drift = InputDriftMonitor(ref_x, window=150, min_window=100, n_permutations=100)
    s = EventStore(f"sqlite:///{tmp_path / 'a.db'}")
    _preds(s, rng, 150)
    (h,) = health.evaluate(s, after_id=0, upto_id=s.last_id())
    (d,) = drift.evaluate(s, after_id=0, upto_id=s.last_id())
    assert not h.fired and not d.fired
    s2 = EventStore(f"sqlite:///{tmp_path / 'b.db'}")
    _preds(s2, rng, 150, conf=(0.4, 0.9), shift=0.6, labels=np.zeros(150))
    (h,) = health.evaluate(s2, after_id=0, upto_id=s2.last_id())
    (d,) = drift.evaluate(s2, after_id=0, upto_id=s2.last_id())
    assert h.fired and "confidence fell" in h.message and "mix" in h.message
    assert h.evidence["p_confidence"] < 1e-6 and h.evidence["mean_confidence"] < 0.7
    assert d.fired and d.evidence["ks"]["n_drifted"] >= 2
    # too few events: no conclusion
    s3 = EventStore(f"sqlite:///{tmp_path / 'c.db'}")
    _preds(s3, rng, 20)
    (h,) = health.evaluate(s3, after_id=0, upto_id=s3.last_id())
    assert not h.fired and "need 100" in h.message


def test_accuracy_monitor(tmp_path):
    rng = np.random.default_rng(1)
    s = EventStore(f"sqlite:///{tmp_path / 'a.db'}")
    _preds(s, rng, 400, labels=np.zeros(400))
    truth = np.where(np.arange(400) < 200, 0, np.where(rng.random(400) < 0.5, 1, 0))
    s.append_many([{"kind": ev.FEEDBACK, "request_id": f"c{i}",
                    "payload": {"label": int(t)}} for i, t in enumerate(truth)])
    mon = AccuracyMonitor(min_feedback=30)
    (a,) = mon.evaluate(s, after_id=0, upto_id=s.last_id())
    assert a.fired and a.severity == "critical" and "adwin" in a.message
    assert a.evidence["error_after"] > a.evidence["error_before"]
    # only the first, clean half: quiet
    first_half = s.query(kinds=ev.FEEDBACK, limit=200)[-1].id
    (a,) = mon.evaluate(s, after_id=0, upto_id=first_half)
    assert not a.fired
    # wrong from the start: the change detector sees no change, the level test does
    s2 = EventStore(f"sqlite:///{tmp_path / 'b.db'}")
    _preds(s2, rng, 200, labels=np.zeros(200))
    s2.append_many([{"kind": ev.FEEDBACK, "request_id": f"c{i}",
                     "payload": {"label": int(rng.random() < 0.4)}} for i in range(200)])
    (a,) = AccuracyMonitor(expected_accuracy=0.98).evaluate(s2, after_id=0,
                                                             upto_id=s2.last_id())
    assert a.fired and "expected" in a.message


def test_alert_rate_monitors(tmp_path):
    rng = np.random.default_rng(2)
    s = EventStore(f"sqlite:///{tmp_path / 'a.db'}")
    _preds(s, rng, 150, flag_rate=0.02, client="alice")
    _preds(s, rng, 40, flag_rate=0.9, client="mallory")
    (g,) = AlertRateMonitor(expected_rate=0.02, window=200).evaluate(
        s, after_id=0, upto_id=s.last_id())
    assert g.fired and g.evidence["flagged"] >= 30
    sigs = ClientAlertMonitor(expected_rate=0.02).evaluate(s, after_id=0, upto_id=s.last_id())
    assert [x.client_id for x in sigs if x.fired] == ["mallory"]
    quiet = EventStore(f"sqlite:///{tmp_path / 'b.db'}")
    _preds(quiet, rng, 200, flag_rate=0.02, client="alice")
    (g,) = AlertRateMonitor(expected_rate=0.02).evaluate(quiet, after_id=0,
                                                        upto_id=quiet.last_id())
    assert not g.fired
    assert not any(x.fired for x in ClientAlertMonitor(expected_rate=0.02).evaluate(
        quiet, after_id=0, upto_id=quiet.last_id()))


def _scored(store, client, scores):
    store.append_many([{"kind": ev.PREDICTION, "client_id": client,
                        "request_id": f"{client}-{i}",
                        "payload": {"verdict": "allow", "fired": [],
                                    "scores": {"outlier": float(s), "extraction": 0.99}}}
                       for i, s in enumerate(scores)])


def test_client_score_test_notices_high_scores_under_the_threshold(tmp_path):
    from bastion.runtime.monitors import client_score_shift

    rng = np.random.default_rng(3)
    s = EventStore(f"sqlite:///{tmp_path / 's.db'}")
    for c in ("alice", "bob", "carol"):
        _scored(s, c, rng.normal(0, 1, 80))
    _scored(s, "mallory", rng.normal(1.5, 1, 30))  # higher, but never flagged
    mon = ClientAlertMonitor(expected_rate=0.02)
    sigs = mon.evaluate(s, after_id=0, upto_id=s.last_id())
    fired = [x for x in sigs if x.fired]
    assert [x.client_id for x in fired] == ["mallory"]
    assert fired[0].evidence["test"] == "score_shift"
    assert fired[0].evidence["detector"] == "outlier"  # extraction scores are not used
    shift = client_score_shift(s.recent(ev.PREDICTION, 1000), min_requests=20)
    assert shift["mallory"]["auc"] > 0.75 and shift["alice"]["auc"] < 0.6
    # off: only flagged shares count, and nobody is flagged
    assert not any(x.fired for x in ClientAlertMonitor(expected_rate=0.02, score_test=False)
                   .evaluate(s, after_id=0, upto_id=s.last_id()))
    # the same score distribution for everybody: nobody stands out
    q = EventStore(f"sqlite:///{tmp_path / 'q.db'}")
    for c in ("alice", "bob", "carol", "dave"):
        _scored(q, c, rng.normal(0, 1, 80))
    assert not any(x.fired for x in mon.evaluate(q, after_id=0, upto_id=q.last_id()))


def test_client_score_test_judges_against_the_clean_reference_too(tmp_path):
    """A clean client beside an extraction-like client whose inputs score unusually low is
    singled out when judged only against the other clients; with the clean reference's
    scores recorded in the store it is not, and an attacker still is."""
    from bastion.runtime.monitors import REFERENCE_SCORES_KEY

    rng = np.random.default_rng(5)
    mon = ClientAlertMonitor(expected_rate=0.02)
    s = EventStore(f"sqlite:///{tmp_path / 's.db'}")
    _scored(s, "bob", rng.normal(0, 1, 45))      # clean
    _scored(s, "eve", rng.normal(-1.5, 0.5, 90))  # near-duplicates: lower than clean
    fired = [x.client_id for x in mon.evaluate(s, after_id=0, upto_id=s.last_id()) if x.fired]
    assert fired == ["bob"]  # the flaw the reference fixes
    s.set_state(REFERENCE_SCORES_KEY, {"outlier": rng.normal(0, 1, 400).tolist()})
    sigs = mon.evaluate(s, after_id=0, upto_id=s.last_id())
    assert not any(x.fired for x in sigs)
    # an evasion client beside a clean one still fires against both
    a = EventStore(f"sqlite:///{tmp_path / 'a.db'}")
    a.set_state(REFERENCE_SCORES_KEY, {"outlier": rng.normal(0, 1, 400).tolist()})
    _scored(a, "bob", rng.normal(0, 1, 60))
    _scored(a, "mallory", rng.normal(1.5, 1, 40))
    got = [x for x in mon.evaluate(a, after_id=0, upto_id=a.last_id()) if x.fired]
    assert [x.client_id for x in got] == ["mallory"]
    assert got[0].evidence["auc_reference"] > 0.75 and "clean reference" in got[0].message
