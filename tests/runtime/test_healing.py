"""The healing controller end to end on digits: degradation -> retrain -> gates ->
promotion; poisoned feedback filtered; failing gates and crashes keep the champion;
an evasion campaign -> fallback and quarantine; every decision audited with evidence."""

from __future__ import annotations

import numpy as np
import pytest

from bastion.errors import BastionError
from bastion.runtime.detectors import build_detectors, pgd_attack
from bastion.runtime.guard import GuardedModel, record_feedback
from bastion.runtime.healing import HealingController, HealingPolicy, MonitorSettings, Rule
from bastion.runtime.monitors import Signal
from bastion.runtime.retrain import RetrainConfig, RetrainPipeline
from bastion.store import events as ev
from bastion.store.events import EventStore


def shift(x: np.ndarray) -> np.ndarray:
    """A natural drift: the camera moved one pixel right and one down."""
    o = np.zeros_like(x)
    o[..., 1:] = x[..., :-1]
    o[..., 1:, :] = o[..., :-1, :].copy()
    return o


FAST = RetrainConfig(epochs=2, eps=0.1, at_steps=2, robust_points=50, robust_steps=5,
                     backdoor_steps=15, margin=0.03, max_reference=1000, seed=0)


# A drift that reaches the service through one client looks, to the absolute per-client
# alert monitor, like an attack from that client; quarantining it would (rightly) take
# its feedback out of the retrain. These tests of the retrain path alert on it instead.
DRIFT_RULES = [Rule(monitor="accuracy", actions=["alert", "retrain"]),
               Rule(monitor="input_drift", actions=["alert"]),
               Rule(monitor="client_alert_rate", actions=["alert"])]


def policy(**kw) -> HealingPolicy:
    return HealingPolicy(retrain=kw.pop("retrain", FAST),
                         monitors=MonitorSettings(window=200, min_window=100, mmd=False),
                         min_feedback_for_retrain=50, **kw)


@pytest.fixture(scope="module")
def detectors(zoo_digits, digits_arrays):
    return build_detectors(zoo_digits[0], digits_arrays[0][:600], fpr=0.01,
                           which=("outlier", "confidence", "squeeze"), seed=0)


@pytest.fixture()
def setup(request, tmp_path, mlflow_uri, zoo_digits, splits, detectors):
    from bastion.registry.models import ModelRegistry

    model, folder = zoo_digits
    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    reg = ModelRegistry(f"digits-{request.node.name}".replace("[", "-").replace("]", ""),
                        tracking_uri=mlflow_uri, store=store)
    v1 = reg.register(folder)
    reg.promote(v1, reason="baseline", actor="test")
    guard = GuardedModel(model, detectors=detectors, store=store, model_version=v1)
    ref, hold, pool = splits
    return store, reg, guard, ref, hold, pool


def serve(guard, x, y, client, *, labels=None):
    """Send ``x`` as ``client`` and give feedback ``labels`` (default: the truth)."""
    out = []
    for i in range(0, len(x), 50):
        out += guard.predict(x[i:i + 50], client_id=client)
    fb = y if labels is None else labels
    record_feedback(guard.store, {d.request_id: int(t) for d, t in zip(out, fb, strict=True)},
                    n_classes=10)
    return out


def audits(store, action=None):
    return [e for e in store.query(kinds=ev.AUDIT, limit=None)
            if action is None or e.payload["action"] == action]


def test_clean_traffic_raises_no_alarm(setup):
    store, reg, guard, ref, hold, pool = setup
    rng = np.random.default_rng(1)
    idx = rng.choice(len(pool[0]), 300)
    serve(guard, pool[0][idx], pool[1][idx], "alice")
    ctl = HealingController(policy(), store, reg, RetrainPipeline(ref, hold, config=FAST))
    rep = ctl.step()
    assert rep.fired == [], [s.message for s in rep.fired]
    assert {s.monitor for s in rep.signals} >= {"input_drift", "health", "accuracy",
                                                "alert_rate", "client_alert_rate"}
    assert reg.get_alias("champion") == 1 and rep.step_id is not None
    assert store.count(kinds=ev.HEALING_STEP) == 1
    # one controller at a time per store
    assert store.acquire_lease("healing", "someone-else", ttl_s=60)
    with pytest.raises(BastionError, match="another healing controller"):
        ctl.step()
    store.release_lease("healing", "someone-else")
    assert ctl.step().from_id == rep.upto_id


def test_degradation_retrains_passes_gates_and_promotes(setup, zoo_digits):
    store, reg, guard, ref, hold, pool = setup
    rng = np.random.default_rng(2)
    serve(guard, pool[0][:100], pool[1][:100], "alice")
    idx = rng.choice(len(pool[0]), 300)
    for k, who in enumerate(("alice", "bob", "carol")):  # a drift reaches every client
        part = idx[k * 100:(k + 1) * 100]
        serve(guard, shift(pool[0][part]), pool[1][part], who)
    ctl = HealingController(policy(rules=DRIFT_RULES), store, reg,
                            RetrainPipeline(ref, hold, config=FAST))
    rep = ctl.step()
    fired = {s.monitor for s in rep.fired}
    assert "accuracy" in fired and "input_drift" in fired
    (rt,) = audits(store, "retrain")
    p = rt.payload
    assert p["done"], p["decision"]
    assert reg.get_alias("champion") == 2 and reg.get_alias("previous") == 1
    gates = {g["name"]: g for g in p["evidence"]["gates"]}
    assert set(gates) >= {"clean_accuracy", "robust_accuracy", "feedback_accuracy", "backdoor"}
    assert all(g["passed"] for g in gates.values())
    assert gates["feedback_accuracy"]["candidate"] > gates["feedback_accuracy"]["champion"] + 0.15
    assert p["evidence"]["signal"]["monitor"] == "accuracy"
    assert p["evidence"]["signal"]["evidence"]["n_feedback"] >= 300
    # the new champion really is better on the drifted data, and no worse on clean data
    new = reg.load("champion")
    xh, yh = hold
    old_model = zoo_digits[0]
    acc = lambda m, x: float((m.predict_proba(x).argmax(1) == yh).mean())  # noqa: E731
    assert acc(new, shift(xh)) > acc(old_model, shift(xh)) + 0.2
    assert acc(new, xh) >= acc(old_model, xh) - 0.03
    hist = reg.alias_history("champion")
    assert hist[-1].version == 2 and hist[-1].actor == "healing-controller"
    assert "gates passed" in hist[-1].reason
    assert store.count(kinds=ev.ALERT) >= 2
    # evidence about the old model no longer counts: the next step starts fresh
    assert ctl.state()["baseline_id"] == rep.upto_id
    rep2 = ctl.step()
    assert not any(s.monitor == "accuracy" for s in rep2.fired)


def test_poisoned_feedback_is_filtered(setup, zoo_digits):
    store, reg, guard, ref, hold, pool = setup
    rng = np.random.default_rng(3)
    serve(guard, pool[0][:200], pool[1][:200], "alice")  # honest feedback first
    idx = rng.choice(len(pool[0]), 400)
    x, y = pool[0][idx], pool[1][idx]
    labels = y.copy()
    flip = rng.random(len(y)) < 0.2
    labels[flip] = (y[flip] + rng.integers(1, 10, flip.sum())) % 10
    out = serve(guard, x, y, "crowd", labels=labels)
    ctl = HealingController(policy(), store, reg, RetrainPipeline(ref, hold, config=FAST))
    rep = ctl.step()
    assert any(s.monitor == "accuracy" for s in rep.fired)  # 20% "errors" look like decay
    (rt,) = audits(store, "retrain")
    summary = rt.payload["evidence"]["retrain"]
    # which feedback rows were flipped, in the order the pipeline saw them
    _, _, fb_ids = ctl.feedback_data(after_id=0, upto_id=rep.upto_id)
    flipped_rid = {d.request_id for d, f in zip(out, flip, strict=True) if f}
    fb_events = {e.id: e.request_id for e in store.query(kinds=ev.FEEDBACK, limit=None)}
    is_flip = np.array([fb_events[i] in flipped_rid for i in fb_ids])
    removed = np.zeros(len(fb_ids), dtype=bool)
    removed[summary["removed"]] = True
    used = np.ones(len(fb_ids), dtype=bool)  # the per-client cap left some rows out
    used[summary["capped"]] = False
    assert summary["n_capped"] == len(summary["capped"]) > 0
    assert is_flip.sum() >= 60 and (is_flip & used).sum() >= 30
    assert removed[is_flip & used].mean() >= 0.9          # poisoned labels caught
    assert removed[~is_flip & used].mean() <= 0.1         # few honest labels lost
    # whatever happened, the champion is not worse on the trusted holdout
    champ = reg.load("champion")
    xh, yh = hold
    a_new = float((champ.predict_proba(xh).argmax(1) == yh).mean())
    a_old = float((zoo_digits[0].predict_proba(xh).argmax(1) == yh).mean())
    assert a_new >= a_old - 0.03


def test_unsanitised_targeted_poison_is_refused_by_the_gates(setup):
    store, reg, guard, ref, hold, pool = setup
    rng = np.random.default_rng(4)
    serve(guard, pool[0][:200], pool[1][:200], "alice")  # honest feedback first
    idx = rng.choice(len(pool[0]), 400)
    x, y = pool[0][idx], pool[1][idx]
    labels = y.copy()
    labels[np.isin(y, [1, 3, 7])] = 8  # a targeted campaign: 1s, 3s and 7s become 8s
    # no sanitiser, and feedback weighted so heavily that the poison really hurts
    cfg = FAST.model_copy(update={"sanitize": False, "feedback_weight": 8,
                                  "max_reference": 300})
    for k in range(8):  # spread over many keys, so the per-client cap does not bite
        sl = slice(50 * k, 50 * (k + 1))
        serve(guard, x[sl], y[sl], f"crowd-{k}", labels=labels[sl])
    ctl = HealingController(policy(retrain=cfg), store, reg,
                            RetrainPipeline(ref, hold, config=cfg))
    ctl.step()
    (rt,) = audits(store, "retrain")
    assert not rt.payload["done"]
    assert "champion v1 kept" in rt.payload["decision"]
    failed = [g for g in rt.payload["evidence"]["gates"] if not g["passed"]]
    names = {g["name"] for g in failed}
    # the new class absorbs holdout answers (a trigger-agnostic test, with or without
    # a clean-accuracy drop)
    assert "class_absorption" in names, failed
    absorb = next(g for g in failed if g["name"] == "class_absorption")
    assert absorb["detail"]["flagged"] == [8]
    assert reg.get_alias("champion") == 1 and len(reg.versions()) == 1


def _degrade(guard, pool, seed):
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pool[0]), 200)
    serve(guard, shift(pool[0][idx]), pool[1][idx], "alice")


def test_failing_gate_keeps_the_champion(setup):
    store, reg, guard, ref, hold, pool = setup
    _degrade(guard, pool, 5)

    def bad_trainer(champion, x, y):  # a "retrained" model that forgot everything
        import copy

        import torch

        m = copy.deepcopy(champion)
        with torch.no_grad():
            for p in m.module.parameters():
                p.mul_(0.0)
        return m

    cfg = FAST.model_copy(update={"robust_gate": False, "backdoor_gate": False})
    ctl = HealingController(policy(retrain=cfg, rules=DRIFT_RULES), store, reg,
                            RetrainPipeline(ref, hold, config=cfg, trainer=bad_trainer))
    ctl.step()
    (rt,) = audits(store, "retrain")
    assert not rt.payload["done"] and "clean_accuracy" in rt.payload["decision"]
    gate = next(g for g in rt.payload["evidence"]["gates"] if g["name"] == "clean_accuracy")
    assert gate["candidate"] < 0.2 and gate["champion"] > 0.9 and "holdout" in gate["rule"]
    assert reg.get_alias("champion") == 1 and len(reg.versions()) == 1
    # the same evidence does not trigger another retrain (cooldown), and says so
    ctl.step()
    again = audits(store, "retrain")
    assert len(again) == 2 and "cooldown" in again[-1].payload["decision"]


def test_crash_in_retraining_keeps_the_champion(setup):
    store, reg, guard, ref, hold, pool = setup
    _degrade(guard, pool, 6)

    def crash(champion, x, y):
        raise RuntimeError("out of memory (simulated)")

    ctl = HealingController(policy(rules=DRIFT_RULES), store, reg,
                            RetrainPipeline(ref, hold, config=FAST, trainer=crash))
    rep = ctl.step()
    (rt,) = audits(store, "retrain")
    assert not rt.payload["done"] and "crashed" in rt.payload["decision"]
    assert "out of memory" in rt.payload["evidence"]["error"]
    assert reg.get_alias("champion") == 1 and len(reg.versions()) == 1
    assert rep.champion == 1


def test_evasion_campaign_switches_to_fallback_and_quarantines(setup, zoo_digits):
    store, reg, guard, ref, hold, pool = setup
    reg.set_alias("fallback", 1, reason="hardened model", actor="test")
    rng = np.random.default_rng(7)
    idx = rng.choice(len(pool[0]), 150)
    guard.predict(pool[0][idx[:100]], client_id="alice")
    x_adv = pgd_attack(zoo_digits[0], eps=0.2, steps=10, seed=0)(pool[0][idx[100:]])
    for i in range(0, len(x_adv), 10):
        guard.predict(x_adv[i:i + 10], client_id="mallory")
    guard.predict(pool[0][idx[:60]], client_id="bob")
    ctl = HealingController(policy(), store, reg, RetrainPipeline(ref, hold, config=FAST))
    rep = ctl.step()
    fired = {(s.monitor, s.client_id) for s in rep.fired}
    assert ("client_alert_rate", "mallory") in fired
    assert not any(c in ("alice", "bob") for _, c in fired)
    assert store.get_state("quarantined_clients") == ["mallory"]
    q = audits(store, "quarantine_client")[0].payload
    assert q["done"] and q["evidence"]["signal"]["evidence"]["flagged"] >= 20
    assert ("alert_rate", None) in fired  # the campaign also lifts the global alert rate
    assert store.get_state("traffic") == "fallback"
    sw = audits(store, "switch_to_fallback")[0].payload
    assert sw["done"] and sw["evidence"]["fallback_version"] == 1
    assert store.query(kinds=ev.MODEL_CHANGE, limit=None)[-1].payload["type"] in (
        "traffic", "quarantine")
    guard.refresh_state()
    d = guard.predict(pool[0][:2], client_id="mallory")
    assert all(x.verdict == "block" for x in d)
    # a second step neither quarantines again nor repeats the alerts (edge-triggered)
    n_alerts = store.count(kinds=ev.ALERT)
    rep2 = ctl.step()
    assert all(a.action != "quarantine_client" or not a.done for a in rep2.actions)
    assert store.count(kinds=ev.ALERT) == n_alerts
    if any(s.monitor == "alert_rate" for s in rep2.fired):
        assert any(a.action == "alert" and "still firing" in a.detail for a in rep2.actions)
    # the campaign is over: clean traffic, and after 3 quiet steps traffic returns
    for _ in range(4):
        guard.predict(pool[0][rng.choice(len(pool[0]), 60)], client_id="alice")
        ctl.step()
    assert store.get_state("traffic") == "champion"
    sw = audits(store, "switch_to_champion")
    assert len(sw) == 1 and sw[0].payload["done"]
    assert sw[0].payload["evidence"]["quiet_steps"] == 3


def test_policy_from_yaml(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text("healing:\n  rules:\n    - monitor: input_drift\n      actions: [alert, retrain]\n"
                 "  retrain:\n    margin: 0.01\n    epochs: 1\n  min_feedback_for_retrain: 10\n")
    pol = HealingPolicy.from_file(p)
    assert pol.actions_for("input_drift") == ["alert", "retrain"]
    assert pol.actions_for("accuracy") == [] and pol.retrain.margin == 0.01
    bad = tmp_path / "bad.json"
    bad.write_text('{"rules": [{"monitor": "x", "actions": ["explode"]}]}')
    with pytest.raises(BastionError, match="bad policy at rules.0.actions"):
        HealingPolicy.from_file(bad)
    with pytest.raises(BastionError, match="not found"):
        HealingPolicy.from_file(tmp_path / "missing.yaml")


def trigger(x: np.ndarray) -> np.ndarray:
    """The issue's BadNets trigger: a 2x2 patch in the bottom-right corner."""
    x = x.copy()
    x[..., -2:, -2:] = 1.0
    return x


def test_backdoored_candidate_is_refused_by_the_trigger_agnostic_gates(setup, zoo_digits):
    """No screening, no cap, no clean-accuracy margin to speak of: only the backdoor
    gates stand between the campaign and the registry, and a refused candidate is never
    registered, so it can never become champion, previous or fallback."""
    store, reg, guard, ref, hold, pool = setup
    reg.set_alias("fallback", 1, reason="hardened model", actor="test")
    rng = np.random.default_rng(8)
    serve(guard, pool[0][:100], pool[1][:100], "alice")
    src = rng.choice(np.flatnonzero(pool[1] != 7), 250)
    for k in range(5):
        sl = src[50 * k:50 * (k + 1)]
        serve(guard, trigger(pool[0][sl]), pool[1][sl], f"key-{k}", labels=np.full(50, 7))
    cfg = FAST.model_copy(update={"sanitize": False, "max_client_share": 1.0,
                                  "feedback_weight": 4, "margin": 0.5, "robust_gate": False,
                                  "backdoor_steps": 60, "backdoor_points": 60})
    ctl = HealingController(policy(retrain=cfg, rules=DRIFT_RULES), store, reg,
                            RetrainPipeline(ref, hold, config=cfg))
    history_before = len(reg.alias_history())
    ctl.step()
    (rt,) = audits(store, "retrain")
    p = rt.payload
    assert not p["done"] and "refused" in p["decision"], p["decision"]
    failed = {g["name"] for g in p["evidence"]["gates"] if not g["passed"]}
    assert failed and failed <= {"backdoor", "strip", "class_absorption"}, failed
    assert "backdoor" in p["decision"] or "strip" in p["decision"]
    assert [v.version for v in reg.versions()] == [1]
    assert reg.aliases() == {"champion": 1, "fallback": 1}
    assert len(reg.alias_history()) == history_before


def test_quarantined_clients_feedback_is_excluded_retroactively(setup):
    store, reg, guard, ref, hold, pool = setup
    serve(guard, pool[0][:120], pool[1][:120], "alice")
    serve(guard, pool[0][120:200], (pool[1][120:200] + 1) % 10, "mallory")
    # feedback attributed by the feedback event's client, not the prediction's
    out = guard.predict(pool[0][200:230], client_id="alice")
    record_feedback(store, {d.request_id: 0 for d in out}, client_id="mallory",
                    n_classes=10)
    pol = policy()
    pol.min_feedback_for_retrain = 10_000  # record the retrain decision only
    ctl = HealingController(pol, store, reg, RetrainPipeline(ref, hold, config=FAST))
    fs = ctl.feedback_set(after_id=0, upto_id=store.last_id())
    assert len(fs.y) == 230 and fs.clients.count("mallory") == 110
    # quarantined after its labels were stored: none of them is used any more
    guard.quarantine("mallory", reason="test")
    fs = ctl.feedback_set(after_id=0, upto_id=store.last_id())
    assert len(fs.y) == 120 and set(fs.clients) == {"alice"}
    assert fs.excluded_quarantined == {"mallory": 110}
    x, y, ids = ctl.feedback_data(after_id=0, upto_id=store.last_id())
    assert len(ids) == 120 and (y == pool[1][:120]).all()
    # a retrain decision records what it left out
    rec, promoted = ctl._retrain(Signal(monitor="accuracy", fired=True, message="test"), {},
                                 store.last_id())
    assert not promoted and rec.evidence["excluded_quarantined"] == {"mallory": 110}


def test_per_client_cap_and_trust_weights(splits):
    ref, hold, _ = splits
    cfg = RetrainConfig(max_client_share=0.2, feedback_weight=2,
                        client_trust={"new-key": 0.5, "banned": 0.0})
    pipe = RetrainPipeline(ref, hold, config=cfg)
    clients = ["big"] * 600 + ["a"] * 50 + ["b"] * 50 + ["new-key"] * 40 + ["banned"] * 30
    mult, info = pipe.client_weights(clients, 1000, np.random.default_rng(0))
    total = 1000 + mult.sum()
    cl = np.array(clients)
    for k in ("big", "a", "b", "new-key"):
        assert mult[cl == k].sum() / total <= 0.2 + 1e-9
        assert info[k]["share"] <= 0.2
    assert info["big"]["capped_rows"] > 300 and info["a"]["capped_rows"] == 0
    assert (mult[cl == "a"] == 2).all() and (mult[cl == "banned"] == 0).all()
    assert set(np.unique(mult[cl == "new-key"])) <= {0, 1} and mult[cl == "new-key"].sum() > 5
    # no cap: every row at its trust weight
    pipe.config = cfg.model_copy(update={"max_client_share": 1.0})
    mult, info = pipe.client_weights(clients, 1000, np.random.default_rng(0))
    assert mult[cl == "big"].sum() == 1200 and info["big"]["capped_rows"] == 0
    # a client's mistake in the config is one clear error
    with pytest.raises(Exception, match="max_client_share"):
        RetrainConfig(max_client_share=0.0)


def test_bad_trust_settings_are_one_clear_error(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text("retrain:\n  client_trust:\n    mallory: 5\n")
    with pytest.raises(BastionError, match="bad policy at retrain.client_trust.mallory"):
        HealingPolicy.from_file(p)
    p.write_text("retrain:\n  max_client_share: 2\n")
    with pytest.raises(BastionError, match="bad policy at retrain.max_client_share"):
        HealingPolicy.from_file(p)
    p.write_text("retrain:\n  client_trust: {alice: 0.5}\n  max_client_share: 0.1\n")
    pol = HealingPolicy.from_file(p)
    assert pol.retrain.client_trust == {"alice": 0.5} and pol.retrain.max_client_share == 0.1
