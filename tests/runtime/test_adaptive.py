"""The adaptive defense: a contextual bandit over recorded outcomes picks the healing action
per kind of attack, never offers an action the controller would refuse, learns from the
harm visible in feedback labels, and writes its reasoning to the audit log."""

from __future__ import annotations

import numpy as np

from bastion.runtime.adaptive import AdaptiveChooser, AdaptiveSettings, observed_harm
from bastion.runtime.guard import STATE_QUARANTINE
from bastion.runtime.healing import HealingController, HealingPolicy, Rule
from bastion.runtime.monitors import Signal
from bastion.runtime.retrain import RetrainPipeline
from bastion.store import events as ev


class Switch:
    """A monitor whose signal the test sets (the controller and store are real)."""

    def __init__(self, name: str) -> None:
        self.name, self.client = name, None
        self.on = False

    def evaluate(self, store, *, after_id, upto_id):
        return [Signal(monitor=self.name, fired=self.on, client_id=self.client,
                       message=f"{self.name} {'fired' if self.on else 'quiet'}")]


def test_chooser_learns_the_less_harmful_arm_and_forgets_slowly():
    s = AdaptiveSettings(enabled=True, seed=0, discount=0.9)
    ch = AdaptiveChooser(s)
    picks = []
    for _ in range(40):
        arm, why = ch.choose("evasion", ["none", "quarantine_client"], {})
        picks.append(arm)
        ch.pending.append({"context": "evasion", "monitor": "m", "arm": arm})
        ch.settle({"harm": 0.6 if arm == "none" else 0.05, "n": 50})
        ch.steps += 1
    assert set(picks[:6]) == {"none", "quarantine_client"}  # both explored early
    assert picks[-15:].count("quarantine_client") >= 13
    m_none, _, w_none = ch.posterior("evasion", "none")
    m_q, _, w_q = ch.posterior("evasion", "quarantine_client")
    # an arm left alone drifts back towards the (optimistic) prior: it gets re-explored
    assert m_q < 0.15 and m_none > m_q + 0.15 and w_q <= 1 / (1 - 0.9) + 1e-6
    assert set(why["offered"]) == {"none", "quarantine_client"} and why["chosen"] in why[
        "offered"]
    # the campaign changes: quarantine stops helping; the discount lets the bandit follow
    for _ in range(40):
        arm, _ = ch.choose("evasion", ["none", "quarantine_client"], {})
        picks.append(arm)
        ch.pending.append({"context": "evasion", "monitor": "m", "arm": arm})
        ch.settle({"harm": 0.1 if arm == "none" else 0.7, "n": 50})
        ch.steps += 1
    assert picks[-15:].count("none") >= 13
    # no labels: nothing settles
    ch.pending.append({"context": "evasion", "monitor": "m", "arm": "none"})
    assert ch.settle({"harm": None, "n": 0}) == [] and len(ch.pending) == 1


def test_the_bandit_starts_from_the_rules_and_leaves_them_on_evidence():
    arms = ["none", "quarantine_client", "switch_to_fallback"]
    # no outcomes yet: the rules' arm is the likeliest pick, the others still explored
    ch = AdaptiveChooser(AdaptiveSettings(enabled=True, seed=0, off_rule_prior=0.2))
    picks = []
    for step in range(300):
        ch.steps = step
        picks.append(ch.choose("client_alert_rate", arms, {}, "quarantine_client")[0])
    share = picks.count("quarantine_client") / len(picks)
    # N(0, 0.3) against two N(0.2, 0.3): the lowest about half the time
    assert 0.4 < share < 0.6 and picks.count("none") > 30, share
    assert all(picks.count(a) / len(picks) < 0.35 for a in arms[::2])
    arm, why = ch.choose("client_alert_rate", arms, {}, "quarantine_client")
    assert why["rule_arm"] == "quarantine_client"
    assert why["offered"]["quarantine_client"]["prior_harm"] == 0.0
    assert why["offered"]["none"]["prior_harm"] == 0.2
    # off_rule_prior = 0: every arm starts equal (about a third each)
    ch0 = AdaptiveChooser(AdaptiveSettings(enabled=True, seed=0, off_rule_prior=0.0))
    flat = []
    for step in range(300):
        ch0.steps = step
        flat.append(ch0.choose("client_alert_rate", arms, {}, "quarantine_client")[0])
    assert all(0.2 < flat.count(a) / 300 < 0.47 for a in arms)
    # the rules' arm keeps doing harm, another does none: the bandit leaves the rules
    picks = []
    for _ in range(40):
        arm, _ = ch.choose("client_alert_rate", arms, {}, "quarantine_client")
        picks.append(arm)
        ch.pending.append({"context": "client_alert_rate", "monitor": "m", "arm": arm})
        ch.settle({"harm": 0.05 if arm == "switch_to_fallback" else 0.6, "n": 50})
        ch.steps += 1
    assert picks[-15:].count("switch_to_fallback") >= 13, picks


def test_controller_takes_the_rules_arm_as_the_prior(tmp_path, mlflow_uri, zoo_digits,
                                                     splits):
    from bastion.registry.models import ModelRegistry

    _, folder = zoo_digits
    store = ev.EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    reg = ModelRegistry("adaptive-prior", tracking_uri=mlflow_uri, store=store)
    reg.promote(reg.register(folder), reason="baseline", actor="test")
    mons = [Switch("client_alert_rate"), Switch("alert_rate")]
    pol = HealingPolicy(rules=[Rule(monitor="client_alert_rate",
                                    actions=["alert", "quarantine_client"]),
                               Rule(monitor="alert_rate", actions=["alert"])],
                        adaptive=AdaptiveSettings(enabled=True, seed=0))
    ctl = HealingController(pol, store, reg, RetrainPipeline(splits[0], splits[1]),
                            monitors=mons)
    assert ctl._rule_arm("client_alert_rate") == "quarantine_client"
    assert ctl._rule_arm("alert_rate") == "none"  # the rules only alert
    assert ctl._rule_arm("input_drift") == "none"
    mons[1].on = True
    ctl.step()
    why = [e.payload["evidence"]["adaptive"] for e in store.query(kinds=ev.AUDIT, limit=None)
           if e.payload["action"] == "adaptive_choice"]
    assert why and why[0]["rule_arm"] == "none"
    store.close()


def test_controller_explores_safely_and_audits_its_reasoning(tmp_path, mlflow_uri, zoo_digits,
                                                             splits):
    from bastion.registry.models import ModelRegistry

    model, folder = zoo_digits
    store = ev.EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    reg = ModelRegistry("adaptive-test", tracking_uri=mlflow_uri, store=store)
    v1 = reg.register(folder)
    reg.promote(v1, reason="baseline", actor="test")
    client_mon, rate_mon = Switch("client_alert_rate"), Switch("alert_rate")
    pol = HealingPolicy(rules=[Rule(monitor="client_alert_rate", actions=["alert"]),
                               Rule(monitor="alert_rate", actions=["alert"])],
                        # every arm starts equal: this test is about what exploring
                        # may try
                        adaptive=AdaptiveSettings(enabled=True, seed=1, off_rule_prior=0.0,
                                                  actions={
                            "client_alert_rate": ["none", "quarantine_client",
                                                  "switch_to_fallback"],
                            "alert_rate": ["none", "switch_to_fallback"]}))
    ctl = HealingController(pol, store, reg, RetrainPipeline(splits[0], splits[1]),
                            monitors=[client_mon, rate_mon])
    # no fallback alias and a signal naming no client: only "none" is safe
    rate_mon.on = True
    ctl.step()
    choice = [e.payload for e in store.query(kinds=ev.AUDIT, limit=None)
              if e.payload["action"] == "adaptive_choice"]
    assert len(choice) == 1
    why = choice[0]["evidence"]["adaptive"]
    assert why["chosen"] == "none" and set(why["offered"]) == {"none"}
    assert why["excluded"] == {"switch_to_fallback": "no 'fallback' alias in the registry"}
    assert store.get_state("traffic", "champion") == "champion"
    # a client signal can quarantine; with a fallback alias, switching is offered
    reg.set_alias("fallback", v1, reason="test", actor="test")
    rate_mon.on, client_mon.on, client_mon.client = False, True, "mallory"
    # answers with feedback between the steps: 3 of 4 labelled answers were wrong
    x = splits[2][0][:4]
    ids = []
    for i in range(4):
        ids.append(store.append(ev.PREDICTION, {"label": 1, "verdict": "allow",
                                                "input": x[i].ravel().tolist()},
                                request_id=f"r{i}", client_id="alice"))
        store.append(ev.FEEDBACK, {"label": 1 if i == 0 else 2}, request_id=f"r{i}",
                     client_id="alice")
    assert observed_harm(store, after_id=0, upto_id=store.last_id())["harm"] == 0.75
    # a flagged input the champion answered, unlabelled, is suspect harm (half weight)
    store.append(ev.PREDICTION, {"label": 3, "verdict": "flag", "answered_by": "champion"},
                 request_id="adv", client_id="eve")
    h = observed_harm(store, after_id=0, upto_id=store.last_id())
    assert h["suspect"] == 1 and h["harm"] == (3 + 0.5) / 5
    for _ in range(6):
        ctl.step()
    outcomes = [e.payload for e in store.query(kinds=ev.AUDIT, limit=None)
                if e.payload["action"] == "adaptive_outcome"]
    assert outcomes and outcomes[0]["evidence"]["outcome"]["harm"] == 0.7
    assert outcomes[0]["evidence"]["outcome"]["arm"] == "none"
    chosen = [e.payload["evidence"]["adaptive"] for e in store.query(kinds=ev.AUDIT, limit=None)
              if e.payload["action"] == "adaptive_choice"][1:]
    assert set(chosen[0]["offered"]) == {"none", "quarantine_client", "switch_to_fallback"}
    # the bandit tried the untried arms after "none" was followed by harm; once mallory
    # is quarantined, her signal asks for no choice at all: a "none" there would be
    # credited with the quarantine's effect (her blocked requests do no harm)
    picked = [c["chosen"] for c in chosen]
    assert all(p_ in c["offered"] for p_, c in zip(picked, chosen, strict=True))
    assert picked[-1] == "quarantine_client", picked
    assert "mallory" in store.get_state(STATE_QUARANTINE, [])
    skips = [e.payload for e in store.query(kinds=ev.AUDIT, limit=None)
             if e.payload["action"] == "adaptive_skip"]
    assert skips and all("already quarantined" in p_["decision"] for p_ in skips)
    assert len(chosen) + len(skips) == 6  # one per step after the first
    # the statistics are in the store for the next controller
    st = store.get_state("adaptive:adaptive-test")
    # no labels arrived after the client choices: they wait for their outcome
    assert st["steps"] == 7 and set(st["arms"]) == {"alert_rate"}
    assert {p["context"] for p in st["pending"]} == {"client_alert_rate"}
    assert np.isfinite([v[1] for c in st["arms"].values() for v in c.values()]).all()
    store.close()


def test_a_choice_about_one_client_is_credited_with_that_clients_harm(tmp_path):
    """Drift errors on the benign clients are not charged to a quarantine of the attacker:
    a client choice gets the harm of its client's requests, a global one the overall."""
    store = ev.EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    for i in range(4):  # alice: labelled answers, all wrong (a drift nobody can fix)
        store.append(ev.PREDICTION, {"label": 1, "verdict": "allow"},
                     request_id=f"a{i}", client_id="alice")
        store.append(ev.FEEDBACK, {"label": 2}, request_id=f"a{i}", client_id="alice")
    for i in range(4):  # mallory, quarantined: blocked, unlabelled (no harm done)
        store.append(ev.PREDICTION, {"label": None, "verdict": "block"},
                     request_id=f"m{i}", client_id="mallory")
    store.append(ev.PREDICTION, {"label": 3, "verdict": "flag", "answered_by": "champion"},
                 request_id="e0", client_id="eve")  # eve: one flagged input answered
    last = store.last_id()
    overall = observed_harm(store, after_id=0, upto_id=last)
    assert overall["n"] == 9 and overall["harm"] == (4 + 0.5) / 9
    mallory = observed_harm(store, after_id=0, upto_id=last, client_id="mallory")
    assert mallory["n"] == 4 and mallory["harm"] == 0.0
    eve = observed_harm(store, after_id=0, upto_id=last, client_id="eve")
    assert eve["suspect"] == 1 and eve["harm"] == 0.5
    nobody = observed_harm(store, after_id=0, upto_id=last, client_id="trudy")
    assert nobody["n"] == 0 and nobody["harm"] is None

    ch = AdaptiveChooser(AdaptiveSettings(enabled=True))
    ch.pending = [{"context": "client_alert_rate", "monitor": "m", "arm": "quarantine_client",
                   "client_id": "mallory"},
                  {"context": "client_alert_rate", "monitor": "m", "arm": "none",
                   "client_id": "eve"},
                  {"context": "client_alert_rate", "monitor": "m", "arm": "none",
                   "client_id": "trudy"},
                  {"context": "input_drift", "monitor": "m", "arm": "none"}]
    done = ch.settle(overall, {"mallory": mallory, "eve": eve, "trudy": nobody})
    got = {(d["arm"], d.get("client_id")): d["harm"] for d in done}
    assert got == {("quarantine_client", "mallory"): 0.0, ("none", "eve"): 0.5,
                   ("none", None): overall["harm"]}
    # trudy sent nothing since: her choice waits for its outcome
    assert [p.get("client_id") for p in ch.pending] == ["trudy"]
    assert ch.posterior("client_alert_rate", "quarantine_client")[0] < \
        ch.posterior("client_alert_rate", "none")[0]
    store.close()


def test_the_client_under_suspicion_cannot_steer_its_own_outcome(tmp_path):
    """An attacker who reads the bandit's rules labels its traffic to make the next
    quarantine look costly (labels on its blocked requests) or its evasions look harmless
    (each flagged answer labelled with the label it got): neither moves the outcome."""
    store = ev.EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    for i in range(4):  # mallory, quarantined, labels every blocked request
        store.append(ev.PREDICTION, {"label": None, "verdict": "block",
                                     "fired": ["quarantine"]},
                     request_id=f"m{i}", client_id="mallory")
        store.append(ev.FEEDBACK, {"label": 7}, request_id=f"m{i}", client_id="mallory")
    for i in range(4):  # eve's evasions answered with a flag, labelled "correct" by eve
        store.append(ev.PREDICTION, {"label": 3, "verdict": "flag", "answered_by": "champion",
                                     "fired": ["squeeze"]},
                     request_id=f"e{i}", client_id="eve")
        store.append(ev.FEEDBACK, {"label": 3}, request_id=f"e{i}", client_id="eve")
    store.append(ev.PREDICTION, {"label": None, "verdict": "block", "fired": ["outlier"]},
                 request_id="b0", client_id="bob")  # a benign request blocked, labelled
    store.append(ev.FEEDBACK, {"label": 1}, request_id="b0", client_id="bob")
    last = store.last_id()
    mallory = observed_harm(store, after_id=0, upto_id=last, client_id="mallory")
    assert mallory["harm"] == 0.0 and mallory["blocked"] == 0
    eve = observed_harm(store, after_id=0, upto_id=last, client_id="eve")
    assert eve["suspect"] == 4 and eve["harm"] == 0.5
    overall = observed_harm(store, after_id=0, upto_id=last)
    # bob's blocked request is harm; mallory's labels are not; eve's labels count here
    # (the overall outcome reads every client's labels but a quarantined one's)
    assert overall["blocked"] == 1 and overall["n"] == 9
    store.close()


def test_answered_extraction_queries_are_harm_whoever_answers_them(tmp_path):
    """A theft campaign's queries answered by the fallback still hand out labels: choosing
    "fallback" or "none" against an extraction campaign must not look free (the first
    version saw only flagged inputs the champion answered, so against extraction every
    arm scored 0 and the bandit had nothing to learn from)."""
    store = ev.EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    for i in range(6):  # the extraction detector flags the thief; the fallback answers
        store.append(ev.PREDICTION, {"label": i % 10, "verdict": "flag",
                                     "answered_by": "fallback", "fired": ["extraction"]},
                     request_id=f"x{i}", client_id="thief")
    for i in range(4):  # an input flagged by an input detector, answered by the fallback
        store.append(ev.PREDICTION, {"label": 2, "verdict": "flag", "answered_by": "fallback",
                                     "fired": ["squeeze"]},
                     request_id=f"f{i}", client_id="bob")
    for i in range(2):  # the thief once quarantined: blocked, nothing handed out
        store.append(ev.PREDICTION, {"label": None, "verdict": "block",
                                     "fired": ["extraction", "quarantine"]},
                     request_id=f"q{i}", client_id="thief")
    last = store.last_id()
    thief = observed_harm(store, after_id=0, upto_id=last, client_id="thief")
    assert thief["suspect"] == 6 and thief["n"] == 8 and thief["harm"] == 0.5 * 6 / 8
    bob = observed_harm(store, after_id=0, upto_id=last, client_id="bob")
    assert bob["suspect"] == 0 and bob["harm"] == 0.0  # the robust fallback answered
    store.close()
