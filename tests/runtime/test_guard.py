"""Guarded model: verdicts, reasons, fallback, quarantine, events, feedback."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from bastion.errors import BastionError, DataError
from bastion.runtime.detectors import build_detectors, pgd_attack
from bastion.runtime.guard import GuardedModel, GuardPolicy, record_feedback
from bastion.store import events as ev
from bastion.store.events import EventStore


class _Const:
    """A fallback that always answers class 0 (easy to recognise)."""

    n_classes, input_shape, bounds, queries = 10, (1, 8, 8), (0.0, 1.0), 0

    def predict_proba(self, x):
        p = np.zeros((len(x), 10))
        p[:, 0] = 1.0
        return p


@pytest.fixture(scope="module")
def detectors(digits_cnn, digits_arrays):
    x_tr = digits_arrays[0]
    return build_detectors(digits_cnn, x_tr[:600], fpr=0.02,
                           which=("outlier", "confidence", "squeeze"), seed=0)


def test_clean_allowed_adversarial_flagged_and_fallback(digits_cnn, digits_arrays, detectors,
                                                        tmp_path):
    _, _, x_te, y_te = digits_arrays
    store = EventStore(f"sqlite:///{tmp_path / 'e.db'}")
    g = GuardedModel(digits_cnn, detectors=detectors, fallback=_Const(), store=store,
                     model_version=3, fallback_version=1)
    clean = g.predict(x_te[:100], client_id="alice")
    allowed = [d for d in clean if d.verdict == "allow"]
    assert len(allowed) >= 85
    for d in allowed:
        assert d.answered_by == "champion" and d.model_version == "3"
        assert d.label == int(np.argmax(d.probabilities)) and d.why == "no detector fired"
        # every detector scored the input, none fired, so no reason is given
        assert set(d.scores) == set(detectors) and d.reasons == []
        assert all(d.scores[k] <= g.thresholds[k] for k in detectors)
    acc = np.mean([d.label == y for d, y in zip(clean, y_te[:100], strict=True)
                   if d.verdict == "allow"])
    assert acc > 0.9
    x_adv = pgd_attack(digits_cnn, eps=0.2, steps=10)(x_te[100:160])
    adv = g.predict(x_adv, client_id="mallory")
    flagged = [d for d in adv if d.verdict == "flag"]
    assert len(flagged) >= 25  # vs at most ~15% of clean inputs
    for d in flagged:
        assert d.answered_by == "fallback" and d.label == 0 and d.model_version == "1"
        # the reasons are exactly the detectors whose score is above their threshold
        fired = [r for r in d.reasons if r.fired]
        assert fired == d.reasons and all(r.score > r.threshold for r in fired)
        assert {r.detector for r in fired} == {k for k, s in d.scores.items()
                                               if s > g.thresholds[k]}
        assert all(d.scores[r.detector] == r.score for r in fired)
        assert "fired; answered by the fallback" in d.why
    # events: one prediction per input, verdict events for flagged ones, inputs logged
    assert store.count(kinds=ev.PREDICTION) == 160
    assert store.count(kinds=ev.VERDICT) == sum(d.verdict != "allow" for d in clean + adv)
    e = store.query(kinds=ev.PREDICTION, client_id="mallory", limit=1)[0]
    assert len(e.payload["input"]) == 64 and "confidence" in e.payload
    # feedback by request id; unknown ids refused
    ids = record_feedback(store, {clean[0].request_id: int(y_te[0])}, n_classes=10)
    assert len(ids) == 1
    with pytest.raises(DataError, match="unknown request ids"):
        record_feedback(store, {"nope": 1})
    with pytest.raises(DataError, match="out of range"):
        record_feedback(store, {clean[1].request_id: 12}, n_classes=10)


def test_policy_block_refuse_and_quarantine(digits_cnn, digits_arrays, detectors, tmp_path):
    _, _, x_te, _ = digits_arrays
    store = EventStore(f"sqlite:///{tmp_path / 'e.db'}")
    pol = GuardPolicy(actions={"outlier": "block"}, on_block="refuse")
    g = GuardedModel(digits_cnn, detectors=detectors, policy=pol, store=store)
    noise = np.random.default_rng(0).uniform(size=(20, 1, 8, 8)).astype(np.float32)
    out = g.predict(noise, client_id="bob")
    blocked = [d for d in out if d.verdict == "block"]
    assert len(blocked) >= 18
    assert all(d.label is None and d.answered_by == "none" for d in blocked)
    # quarantine (persisted in the store, seen by another guard on the same store)
    g.quarantine("bob")
    g2 = GuardedModel(digits_cnn, detectors=detectors, store=store)
    g2.refresh_state()
    d = g2.predict(x_te[:2], client_id="bob")
    assert all(x.verdict == "block" and x.answered_by == "none" for x in d)
    assert any(r.detector == "quarantine" for r in d[0].reasons)
    assert g2.predict(x_te[:1], client_id="carol")[0].answered_by in ("champion",)
    g.release("bob")
    g2.refresh_state()
    assert "bob" not in g2.quarantined


def test_traffic_switch_and_bad_inputs(digits_cnn, digits_arrays, detectors, tmp_path):
    _, _, x_te, _ = digits_arrays
    store = EventStore(f"sqlite:///{tmp_path / 'e.db'}")
    g = GuardedModel(digits_cnn, detectors=detectors, fallback=_Const(), store=store)
    store.set_state("traffic", "fallback")
    g.refresh_state()
    d = g.predict(x_te[:3], client_id="a")
    allowed = [x for x in d if x.verdict == "allow"]
    assert allowed and all(x.answered_by == "fallback" for x in allowed)
    assert "switched to the fallback" in allowed[0].why
    one = g.predict(x_te[0], client_id="a")  # a single input without batch dimension
    assert len(one) == 1
    for bad, msg in [(np.zeros((2, 3)), "shape"), (np.full((1, 1, 8, 8), np.nan), "NaN"),
                     (np.full((1, 1, 8, 8), 5.0), "bounds"), (np.zeros((0, 1, 8, 8)), "empty"),
                     ([["a"]], "numeric")]:
        with pytest.raises(DataError, match=msg):
            g.predict(bad, client_id="a")
    with pytest.raises(DataError, match="larger than"):
        GuardedModel(digits_cnn, max_batch=2).predict(x_te[:3])
    with pytest.raises(BastionError, match="not calibrated"):
        from bastion.detect.adversarial import SqueezeDetector

        GuardedModel(digits_cnn, detectors={"s": SqueezeDetector(digits_cnn)})
    with pytest.raises(ValidationError):
        GuardPolicy(on_flag="somewhere")
    pf = tmp_path / "guard.json"
    pf.write_text('{"guard": {"actions": {"outlier": "block"}, "on_block": "fallback"}}')
    assert GuardPolicy.from_file(str(pf)).actions == {"outlier": "block"}
    pf.write_text('{"on_flag": "nowhere"}')
    with pytest.raises(BastionError, match="on_flag"):
        GuardPolicy.from_file(str(pf))


def test_extraction_detector_in_the_request_path(digits_cnn, digits_arrays, detectors):
    _, _, x_te, _ = digits_arrays

    class Stub:  # flags client "thief" from its 3rd query on; sees the predicted label
        threshold_ = 0.5

        def __init__(self):
            self.seen: dict[str, int] = {}
            self.labels: list[int] = []

        def update(self, client, x, label):
            self.seen[client] = self.seen.get(client, 0) + 1
            self.labels.append(label)
            return float(client == "thief" and self.seen[client] >= 3)

    stub = Stub()
    g = GuardedModel(digits_cnn, detectors={}, extraction_detector=stub,
                     policy=GuardPolicy(extraction_action="block"))
    out = g.predict(x_te[:5], client_id="thief")
    assert [d.verdict for d in out] == ["allow", "allow", "block", "block", "block"]
    r = out[3].reasons[-1]
    assert r.detector == "extraction" and r.fired and r.score == 1.0 and r.threshold == 0.5
    assert [d.scores["extraction"] for d in out] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert out[0].reasons == [] and g.thresholds == {"extraction": 0.5}
    assert all(d.verdict == "allow" for d in g.predict(x_te[:5], client_id="alice"))
    assert stub.labels[:5] == [d.label for d in out[:2]] + stub.labels[2:5]

    # the real PRADA monitor plugs in as it is
    from bastion.detect.extraction import QueryStreamMonitor

    g2 = GuardedModel(digits_cnn, extraction_detector=QueryStreamMonitor(min_queries=20))
    rng = np.random.default_rng(0)
    # Jacobian-augmentation-like queries: 10 seeds pushed further and further
    synth = np.stack([np.clip(x_te[k % 10] + 0.1 * (k // 10) * np.sign(
        rng.normal(size=(1, 8, 8))), 0, 1) for k in range(80)]).astype(np.float32)
    out = g2.predict(synth, client_id="thief")
    # this monitor answers yes/no (no score): a reason once it flags, never a score
    assert out[-1].verdict == "flag" and out[-1].reasons[-1].detector == "extraction"
    assert all("extraction" not in d.scores for d in out)
    assert [d.verdict for d in out] == ["flag" if d.reasons else "allow" for d in out]
    honest = [d.verdict for d in g2.predict(x_te[100:160], client_id="alice")]
    assert honest.count("flag") <= 5


def test_predict_many_matches_predict_per_batch(digits_cnn, digits_arrays, detectors,
                                                tmp_path):
    _, _, x_te, _ = digits_arrays
    store = EventStore(f"sqlite:///{tmp_path / 'm.db'}")
    g = GuardedModel(digits_cnn, detectors=detectors, fallback=_Const(), store=store)
    g.quarantine("eve")
    alone = [g.predict(x_te[i:i + k], client_id=c, request_ids=[f"{c}{j}" for j in range(k)])
             for i, k, c in ((0, 3, "alice"), (3, 1, "bob"), (4, 2, "eve"))]
    together = g.predict_many([(x_te[i:i + k], c, [f"{c}{j}" for j in range(k)])
                               for i, k, c in ((0, 3, "alice"), (3, 1, "bob"), (4, 2, "eve"))])
    assert [len(b) for b in together] == [3, 1, 2]
    for a, b in zip(alone, together, strict=True):
        for d1, d2 in zip(a, b, strict=True):
            assert (d1.index, d1.client_id, d1.request_id, d1.verdict, d1.label,
                    d1.answered_by) == (d2.index, d2.client_id, d2.request_id, d2.verdict,
                                        d2.label, d2.answered_by)
            for r1, r2 in zip(d1.reasons, d2.reasons, strict=True):
                assert r1.detector == r2.detector and r1.fired == r2.fired
                if r1.score is not None:
                    assert r2.score == pytest.approx(r1.score, abs=1e-5)
            assert d1.scores.keys() == d2.scores.keys()
            for k, s1 in d1.scores.items():
                assert d2.scores[k] == pytest.approx(s1, abs=1e-5)
    assert all(d.verdict == "block" and d.answered_by == "none" for d in together[2])
    assert store.count(kinds=ev.PREDICTION) == 12
    # all or none: one bad batch answers nothing
    n = store.count(kinds=ev.PREDICTION)
    with pytest.raises(DataError):
        g.predict_many([(x_te[:1], "alice", None), (np.full((1, 1, 8, 8), 5.0), "bob", None)])
    assert store.count(kinds=ev.PREDICTION) == n


def test_trusted_build_is_model_construct():
    from bastion.runtime.guard import GuardDecision, Reason, _trusted

    kw = {"detector": "outlier", "score": 0.5, "threshold": None, "fired": True,
          "action": "flag", "note": None}
    r = _trusted(Reason, **dict(reversed(kw.items())))  # field order comes from the model
    assert r == Reason.model_construct(**kw) == Reason(**kw)
    assert list(r.model_dump()) == list(kw) and r.model_fields_set == set(kw)
    d = {"index": 0, "request_id": "r", "client_id": "c", "label": 1, "probabilities": [1.0],
         "verdict": "flag", "reasons": [r], "scores": {"outlier": 0.5},
         "answered_by": "champion", "model_version": "2",
         "why": "flag: outlier fired; answered by the champion"}
    assert _trusted(GuardDecision, **d).model_dump_json() == GuardDecision(**d).model_dump_json()
    with pytest.raises(KeyError):
        _trusted(Reason, detector="x")  # every field must be given


def test_one_input_check_the_guard_trusts():
    """``check_inputs`` is the one check (the service's fast path and route call it); the
    guard answers its result without converting or checking again, and checks anything
    else itself with the same function."""
    from bastion.runtime.guard import CheckedInputs, InputError, check_inputs

    class _Tiny:
        input_shape, n_classes, bounds = (1, 2, 2), 2, (0.0, 1.0)

        def predict_proba(self, x):
            return np.tile([0.5, 0.5], (len(x), 1))

    g = GuardedModel(_Tiny())
    ok = check_inputs([[0.1, 0.2, 0.3, 0.4]], input_shape=(1, 2, 2), bounds=(0.0, 1.0),
                      max_batch=4)
    assert isinstance(ok, CheckedInputs) and ok.array.dtype == np.float32
    assert ok.array.shape == (1, 1, 2, 2)
    assert g._inputs(ok) is ok.array  # trusted: no copy, no second check
    stale = CheckedInputs(np.zeros((1, 4), np.float32), (4,), (0.0, 1.0))
    with pytest.raises(DataError, match="shape"):  # checked for another model: re-checked
        g._inputs(stale)
    cases = [([[True, 0.5, 0.5, 0.5]], "booleans", "invalid_request"),
             ([[1, 0, 0, True]], "booleans", "invalid_request"),
             ([["3", 0, 0, 0]], "numeric", "invalid_request"),
             ([[0.1] * 4] * 5, "larger than", "batch_too_large"),
             ([[2.0] * 4], "bounds", "bad_inputs"),
             ([[float("nan")] * 4], "NaN", "invalid_request"),
             ([[1e39] * 4], "Infinity", "invalid_request"),
             ([[10**30] * 4], "numeric", "invalid_request"),
             ([], "empty", "invalid_request")]
    for v, words, code in cases:
        with pytest.raises(InputError, match=words) as exc:
            check_inputs(v, input_shape=(1, 2, 2), bounds=(0.0, 1.0), max_batch=4)
        assert exc.value.code == code, v
    # the caller that knows its JSON holds no true/false may skip the boolean search
    fast = check_inputs([[1, 0, 0, 1]], input_shape=(1, 2, 2), bounds=(0.0, 1.0),
                        max_batch=4, scan_bools=False)
    assert fast.array.sum() == 2
