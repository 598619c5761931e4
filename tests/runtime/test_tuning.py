"""The guard's run-time tuning: the healing controller lowers or raises every detector's
threshold (by false-positive rate, from the scores it was calibrated on), turns input
squeezing on, or retrains with stricter screening; the guard reads the tuning from the
store, a hostile value there never stops it, and the tuning returns to normal after quiet
steps."""

from __future__ import annotations

import numpy as np
import pytest

from bastion.detect._calibrated import threshold_at
from bastion.errors import BastionError
from bastion.runtime.adaptive import AdaptiveSettings
from bastion.runtime.detectors import build_detectors
from bastion.runtime.guard import STATE_TUNING, GuardedModel, GuardTuning, squeeze_inputs
from bastion.runtime.healing import HealingController, HealingPolicy, Rule
from bastion.runtime.monitors import Signal
from bastion.runtime.retrain import RetrainConfig, RetrainPipeline
from bastion.service.fastdetect import KnnOutlierDetector
from bastion.store import events as ev


class Switch:
    """A monitor whose signal the test sets (the controller and store are real)."""

    def __init__(self, name: str) -> None:
        self.name, self.on = name, False

    def evaluate(self, store, *, after_id, upto_id):
        return [Signal(monitor=self.name, fired=self.on,
                       message=f"{self.name} {'fired' if self.on else 'quiet'}")]


def audits(store, action):
    return [e.payload for e in store.query(kinds=ev.AUDIT, limit=None)
            if e.payload["action"] == action]


@pytest.fixture(scope="module")
def dets(zoo_digits, splits):
    return build_detectors(zoo_digits[0], splits[0][0][:800], fpr=0.02,
                           which=("outlier", "confidence"), seed=0)


def test_threshold_moves_by_rate_on_the_calibration_scores(zoo_digits, splits):
    x = splits[0][0]
    for det in (KnnOutlierDetector(seed=0).fit(x[:600]),
                build_detectors(zoo_digits[0], x[:800], which=("outlier",), fpr=0.02,
                                seed=0)["outlier"]):
        if det.threshold_ is None:
            det.calibrate(x[600:1000], fpr=0.02)
        cal = det.cal_scores_
        assert det.fpr_ == 0.02 and np.all(np.diff(cal) >= 0)
        for f in (0.01, 0.02, 0.08, 0.2):
            t = threshold_at(det, f)
            # at most a share f of the calibration scores above it, and no lower
            # threshold would keep that promise
            assert (cal > t).mean() <= f + 1e-12
            assert (cal >= t).mean() > f - 1e-12
        assert threshold_at(det, 0.08) < threshold_at(det, 0.02) <= threshold_at(det, 0.005)
    assert threshold_at(object(), 0.1) is None  # a detector calibrated some other way


def test_squeeze_inputs_quantises_within_bounds():
    x = np.array([[0.0, 0.2, 0.49, 0.51, 1.0, 1.3, -0.2]], dtype=np.float32)
    assert squeeze_inputs(x, 1, (0.0, 1.0)).tolist() == [[0, 0, 0, 1, 1, 1, 0]]
    two = squeeze_inputs(x, 2, (0.0, 1.0))
    assert np.allclose(two * 3, np.round(two * 3)) and two.dtype == np.float32
    assert squeeze_inputs(x, 2, (-np.inf, np.inf)) is x  # nothing to quantise against
    for bounds in ((), (0.0,), (np.zeros(7), np.ones(7)), ("a", "b"), (1.0, 0.0)):
        assert squeeze_inputs(x, 2, bounds) is x
    assert np.allclose(squeeze_inputs(np.array([[2.0, 4.0]]), 1, (2.0, 4.0)), [[2.0, 4.0]])


def test_guard_reads_its_tuning_and_survives_a_hostile_value(tmp_path, zoo_digits, splits,
                                                              dets):
    model, _ = zoo_digits
    store = ev.EventStore(f"sqlite:///{tmp_path / 'e.db'}")
    g = GuardedModel(model, detectors=dets, store=store)
    x = splits[2][0][:300]
    base = g.predict(x)
    thr0 = g.thresholds
    store.set_state(STATE_TUNING, {"fpr_scale": 4.0})
    g.refresh_state()
    thr4 = g.thresholds
    assert all(thr4[n] < thr0[n] for n in dets)
    lowered = g.predict(x)
    n0 = sum(d.verdict != "allow" for d in base)
    assert sum(d.verdict != "allow" for d in lowered) > n0
    r = next(r for d in lowered for r in d.reasons)
    assert r.threshold == thr4[r.detector]  # every reason names the threshold in force
    # squeezing on: the champion answers the squeezed input; the detectors score the
    # input as sent, so their scores do not move
    store.set_state(STATE_TUNING, {"squeeze_bits": 1})
    g.refresh_state()
    assert g.thresholds == thr0
    sq = g.predict(x)
    want = model.predict_proba(squeeze_inputs(x, 1, model.bounds)).argmax(1)
    assert [d.label for d in sq] == [int(w) for w in want]
    assert [d.label for d in sq] != [d.label for d in base]
    for a, b in zip(sq, base, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-5) and a.verdict == b.verdict
    assert all("squeezed to 1 bits" in d.why for d in sq)
    # a hostile or broken value in the store: the default tuning, and answers go on
    for bad in ({"fpr_scale": -3}, {"fpr_scale": "x"}, ["a"], {"squeeze_bits": 99},
                {"evil": 1}, "fallback", {"fpr_scale": 1e300}):
        store.set_state(STATE_TUNING, bad)
        g.refresh_state()
        assert g.tuning.is_default and g.thresholds == thr0
        assert [d.label for d in g.predict(x[:20])] == [d.label for d in base[:20]]
    store.close()


@pytest.fixture()
def registry(request, tmp_path, mlflow_uri, zoo_digits):
    from bastion.registry.models import ModelRegistry

    store = ev.EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    reg = ModelRegistry(f"tuning-{request.node.name}"[:60], tracking_uri=mlflow_uri,
                        store=store)
    reg.promote(reg.register(zoo_digits[1]), reason="baseline", actor="test")
    yield store, reg
    store.close()


def test_tuning_actions_move_the_guard_within_bounds_and_return(registry, splits):
    store, reg = registry
    mon = Switch("alert_rate")
    pol = HealingPolicy(rules=[Rule(monitor="alert_rate",
                                    actions=["alert", "lower_threshold", "squeeze_on"])],
                        return_to_champion_after=2)
    ctl = HealingController(pol, store, reg, RetrainPipeline(splits[0], splits[1]),
                            monitors=[mon])
    mon.on = True
    ctl.step()
    t = GuardTuning.read(store)
    assert t.fpr_scale == 2.0 and t.squeeze_bits == 2
    (sq,) = audits(store, "squeeze_on")
    acc = sq["evidence"]["holdout_accuracy"]
    assert acc["plain"] - acc["squeezed"] <= pol.retrain.margin  # the gate it passed
    ctl.step()
    ctl.step()  # at the bound: refused, and says why
    assert GuardTuning.read(store).fpr_scale == 4.0
    lowers = audits(store, "lower_threshold")
    assert [a["done"] for a in lowers] == [True, True, False]
    assert "lowest allowed" in lowers[-1]["decision"]
    assert [a["done"] for a in audits(store, "squeeze_on")] == [True, False, False]
    changes = [e.payload for e in store.query(kinds=ev.MODEL_CHANGE, limit=None)
               if e.payload.get("type") == "tuning"]
    assert [c["action"] for c in changes] == ["lower_threshold", "squeeze_on",
                                              "lower_threshold"]
    assert changes[0]["from"]["fpr_scale"] == 1.0 and changes[-1]["to"]["fpr_scale"] == 4.0
    mon.on = False
    ctl.step()
    assert GuardTuning.read(store).fpr_scale == 4.0  # one quiet step is not enough
    ctl.step()
    assert GuardTuning.read(store).is_default
    (reset,) = audits(store, "reset_tuning")
    assert reset["done"] and "quiet for 2 steps" in reset["decision"]
    # raise_threshold stops at its own bound
    mon.on = True
    pol2 = pol.model_copy(update={"rules": [Rule(monitor="alert_rate",
                                                 actions=["raise_threshold"])]})
    ctl2 = HealingController(pol2, store, reg, RetrainPipeline(splits[0], splits[1]),
                             monitors=[mon])
    for _ in range(4):
        ctl2.step()
    assert GuardTuning.read(store).fpr_scale == 0.25
    assert [a["done"] for a in audits(store, "raise_threshold")] == [True, True, False,
                                                                      False]


def test_squeezing_that_costs_accuracy_is_refused(registry, splits):
    store, reg = registry
    mon = Switch("alert_rate")
    pol = HealingPolicy(rules=[Rule(monitor="alert_rate", actions=["squeeze_on"])],
                        tuning={"squeeze_bits": 1},
                        retrain=RetrainConfig(margin=0.01))
    ctl = HealingController(pol, store, reg, RetrainPipeline(splits[0], splits[1]),
                            monitors=[mon])
    mon.on = True
    ctl.step()
    (a,) = audits(store, "squeeze_on")
    assert not a["done"] and "costs the champion" in a["decision"]
    assert GuardTuning.read(store).is_default
    # the bandit never offers it either
    pol_a = pol.model_copy(update={"adaptive": AdaptiveSettings(
        enabled=True, actions={"alert_rate": ["none", "squeeze_on", "lower_threshold"]})})
    ctl_a = HealingController(pol_a, store, reg, RetrainPipeline(splits[0], splits[1]),
                              monitors=[mon])
    offered, excluded = ctl_a._safe_arms(Signal(monitor="alert_rate", fired=True, message="m"), 0)
    assert offered == ["none", "lower_threshold"] and "costs the champion" in excluded[
        "squeeze_on"]


def test_strict_retrain_screens_with_the_strict_settings(registry, splits):
    store, reg = registry
    seen = []

    def trainer(champion, x, y):  # records the settings in force, and fails the gates
        import copy

        import torch

        seen.append(ctl.retrain.config)
        m = copy.deepcopy(champion)
        with torch.no_grad():
            for p in m.module.parameters():
                p.mul_(0.0)
        return m

    from bastion.models.persist import load_model
    from bastion.runtime.guard import record_feedback

    model = load_model(reg.download(reg.get_alias("champion")))
    g = GuardedModel(model, store=store)
    x, y = splits[2]
    out = g.predict(x[:80], client_id="alice")
    record_feedback(store, {d.request_id: int(t) for d, t in zip(out, y[:80], strict=True)},
                    n_classes=10)
    base = RetrainConfig(epochs=1, robust_gate=False, backdoor_gate=False, seed=0)
    pol = HealingPolicy(rules=[Rule(monitor="accuracy", actions=["retrain_strict"])],
                        retrain=base, min_feedback_for_retrain=50)
    ctl = HealingController(pol, store, reg, RetrainPipeline(splits[0], splits[1],
                                                             config=base, trainer=trainer),
                            monitors=[Switch("accuracy")])
    ctl._monitors[0].on = True
    ctl.step()
    (cfg,) = seen
    assert (cfg.min_votes, cfg.strip_fpr, cfg.max_client_share) == (2, 0.05, 0.1)
    assert ctl.retrain.config == base  # restored after the run
    (a,) = audits(store, "retrain_strict")
    assert not a["done"] and "candidate refused" in a["decision"]
    assert a["evidence"]["strict_retrain"]["min_votes"] == 2


def test_bad_tuning_settings_are_one_clear_error(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text("tuning:\n  strict_retrain:\n    min_votess: 2\n")
    with pytest.raises(BastionError, match="tuning.strict_retrain.min_votess: Extra"):
        HealingPolicy.from_file(p)
    p.write_text("tuning:\n  strict_retrain:\n    min_votes: 9\n")
    with pytest.raises(BastionError, match="tuning.strict_retrain.min_votes: Input should"):
        HealingPolicy.from_file(p)
    p.write_text("tuning:\n  step: 0.5\n")
    with pytest.raises(BastionError, match="bad policy at tuning.step"):
        HealingPolicy.from_file(p)
    p.write_text("rules:\n  - monitor: alert_rate\n    actions: [squeeze_on, raise_threshold]\n")
    assert HealingPolicy.from_file(p).actions_for("alert_rate") == ["squeeze_on",
                                                                    "raise_threshold"]


def test_no_default_arm_weakens_the_guard():
    # outcomes come from client labels: an arm that flags less would be steerable by an
    # attacker labelling its own flagged inputs; it is opt-in only
    arms = AdaptiveSettings().actions
    assert all("raise_threshold" not in a for a in arms.values())
    assert any("lower_threshold" in a for a in arms.values())
