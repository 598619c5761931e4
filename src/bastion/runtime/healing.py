"""The healing controller: monitors -> signals -> a declarative policy -> actions, every
decision on record.

:class:`HealingController.step` (what ``bastion heal --once`` runs):

1. reads where it stopped last time (state ``healing:<model name>`` in the event store:
   the cursor, and ``baseline_id``, the last model change: older evidence is about another
   model and does not count);
2. runs every monitor over the events in ``(baseline_id, last event]``;
3. for every signal that fired, applies the rules of the :class:`HealingPolicy` whose
   ``monitor`` matches: ``alert`` (an ``alert`` event), ``switch_to_fallback`` /
   ``switch_to_champion`` (traffic routing the guard reads), ``quarantine_client``
   (the signal's client), ``retrain`` (the :class:`~bastion.runtime.retrain.RetrainPipeline`
   on the recent labelled feedback; pass -> register and promote; fail -> keep the
   champion; crash -> keep the champion), ``retrain_strict`` (the same with the stricter
   screening of ``tuning.strict_retrain``), ``lower_threshold`` / ``raise_threshold``
   (every guard detector's false-positive rate times / divided by ``tuning.step``, within
   ``tuning.min_fpr_scale`` .. ``tuning.max_fpr_scale``), ``squeeze_on`` (the models
   answer inputs squeezed to ``tuning.squeeze_bits`` bits); the guard reads the last two
   from the store's ``guard_tuning`` state, and they return to normal with the traffic
   after ``return_to_champion_after`` quiet steps;
4. writes one ``audit`` event per decision with its evidence (which monitor, which
   numbers, which gates) and one ``healing_step`` event summarising the step.

Policies are pydantic models, readable from YAML or JSON (:meth:`HealingPolicy.from_file`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bastion._util import read_mapping_file
from bastion.errors import BastionError
from bastion.runtime.adaptive import (
    STATE_ADAPTIVE,
    AdaptiveChooser,
    AdaptiveSettings,
    observed_harm,
)
from bastion.runtime.alerting import alert_labels, fingerprint
from bastion.runtime.guard import (
    STATE_QUARANTINE,
    STATE_TRAFFIC,
    STATE_TUNING,
    GuardTuning,
    squeeze_inputs,
)
from bastion.runtime.monitors import (
    AccuracyMonitor,
    AlertRateMonitor,
    ClientAlertMonitor,
    HealthMonitor,
    InputDriftMonitor,
    Monitor,
    Signal,
    labelled_feedback,
)
from bastion.runtime.retrain import RetrainConfig, RetrainPipeline, RetrainResult
from bastion.store import events as ev

ActionName = Literal["alert", "switch_to_fallback", "switch_to_champion", "quarantine_client",
                     "retrain", "retrain_strict", "lower_threshold", "raise_threshold",
                     "squeeze_on"]
#: actions that change the guard's tuning (undone after quiet steps)
TUNING_ACTIONS = ("lower_threshold", "raise_threshold", "squeeze_on")
STATE_HEALING = "healing"
ACTOR = "healing-controller"


class Rule(BaseModel):
    """When ``monitor`` fires, take ``actions`` in order."""

    model_config = ConfigDict(extra="forbid")

    monitor: str
    actions: list[ActionName]


def _default_rules() -> list[Rule]:
    return [
        Rule(monitor="accuracy", actions=["alert", "retrain"]),
        Rule(monitor="input_drift", actions=["alert"]),
        Rule(monitor="health", actions=["alert"]),
        Rule(monitor="alert_rate", actions=["alert", "switch_to_fallback"]),
        Rule(monitor="client_alert_rate", actions=["alert", "quarantine_client"]),
        Rule(monitor="fairness", actions=["alert"]),
    ]


class MonitorSettings(BaseModel):
    """Windows and significance levels of the default monitors."""

    model_config = ConfigDict(extra="forbid")

    window: int = Field(default=200, ge=10)
    min_window: int = Field(default=100, ge=5)
    alpha: float = Field(default=0.001, gt=0.0, lt=1.0)
    drift_correction: Literal["holm", "bh"] = "holm"
    mmd: bool = True
    accuracy_method: Literal["adwin", "page-hinkley"] = "adwin"
    min_feedback: int = Field(default=30, ge=1)
    min_accuracy: float | None = None
    accuracy_tolerance: float = Field(default=0.05, ge=0.0, le=1.0)
    expected_alert_rate: float = Field(default=0.05, gt=0.0, lt=1.0)
    min_alert_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    client_min_requests: int = Field(default=20, ge=1)
    client_min_rate: float = Field(default=0.3, ge=0.0, le=1.0)


def _strict_retrain() -> dict[str, Any]:
    return {"min_votes": 2, "strip_fpr": 0.05, "max_disagreement": 0.3,
            "max_client_share": 0.1}


class TuningSettings(BaseModel):
    """What the tuning actions do.

    - ``step``: ``lower_threshold`` multiplies the guard's ``fpr_scale`` by it (each
      detector then flags about ``step`` times more clean traffic, and more attacks),
      ``raise_threshold`` divides by it; the scale stays within ``min_fpr_scale`` ..
      ``max_fpr_scale``.
    - ``squeeze_bits``: the bit depth ``squeeze_on`` squeezes inputs to (2, chosen on a
      digits CNN outside the benchmarks' scenarios: PGD at eps 0.1 / 0.15 succeeded
      42% / 80% of the time, 23% / 49% against 2 bits, for 1.3 points of clean
      accuracy; 3 and 4 bits did not help at eps 0.15, 1 bit cost 6 points; an attacker
      who adapts to the squeezing is not stopped by it). It is offered only while the
      champion's accuracy on the trusted holdout with squeezing stays within the
      retrain gates' ``margin`` of its accuracy without.
    - ``strict_retrain``: the retrain settings ``retrain_strict`` overrides (default:
      a row is screened out on 2 of the 4 screening votes instead of 4, STRIP at 5% FPR,
      kNN disagreement 0.3, and at most 10% of the rows from one client).
    """

    model_config = ConfigDict(extra="forbid")

    step: float = Field(default=2.0, gt=1.0, le=10.0)
    min_fpr_scale: float = Field(default=0.25, gt=0.0, le=1.0)
    max_fpr_scale: float = Field(default=4.0, ge=1.0, le=50.0)
    squeeze_bits: int = Field(default=2, ge=1, le=16)
    strict_retrain: dict[str, Any] = Field(default_factory=_strict_retrain)


class HealingPolicy(BaseModel):
    """A declarative healing policy.

    - ``rules``: signal -> actions (default: accuracy -> alert + retrain; input drift and
      health -> alert; alert rate -> alert + switch to fallback; one client's alert rate
      -> alert + quarantine; group fairness, when configured -> alert).
    - ``monitors``: windows and levels of the default monitors.
    - ``retrain``: the :class:`~bastion.runtime.retrain.RetrainConfig` (gates included).
    - ``min_feedback_for_retrain``: labelled answers needed before a retrain runs.
    - ``retrain_cooldown``: new labelled answers needed after a retrain attempt before the
      next one (a failed retrain is not repeated on the same evidence).
    - ``feedback_window``: the latest labelled answers a retrain learns from. Labels of a
      quarantined client are left out of every retrain, those it sent before its
      quarantine included; per-client caps and trust weights are in ``retrain``
      (``max_client_share``, ``client_trust``, ``default_client_trust``), so no single
      client dominates a retrain set. A retrain runs after the step's quarantines.
    - ``tuning``: what ``lower_threshold``, ``raise_threshold``, ``squeeze_on`` and
      ``retrain_strict`` do (:class:`TuningSettings`).
    - ``adaptive``: choose the action per kind of attack with a contextual bandit over
      the recorded outcomes instead of the rules' fixed actions; the rules' action is
      where it starts (its prior), so it leaves them only on evidence
      (:mod:`bastion.runtime.adaptive`; off by default).
    - ``return_to_champion_after``: steps in a row without any monitor whose rule
      switches to the fallback firing, after which traffic returns to the champion
      (``0``: never automatically).

    Alerts are edge-triggered: a monitor (per client) that keeps firing step after step
    raises one ``alert`` event per episode (``status: "firing"``, with a fingerprint);
    later steps audit "still firing"; the first step it no longer fires writes a
    ``status: "resolved"`` alert event (delivered by :mod:`bastion.runtime.alerting`).
    """

    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=_default_rules)
    monitors: MonitorSettings = Field(default_factory=MonitorSettings)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    min_feedback_for_retrain: int = Field(default=50, ge=1)
    retrain_cooldown: int = Field(default=100, ge=0)
    feedback_window: int = Field(default=2000, ge=1)
    return_to_champion_after: int = Field(default=3, ge=0)
    adaptive: AdaptiveSettings = Field(default_factory=AdaptiveSettings)
    tuning: TuningSettings = Field(default_factory=TuningSettings)

    @model_validator(mode="after")
    def _check_strict_retrain(self) -> HealingPolicy:
        from pydantic import ValidationError

        try:  # unknown keys or bad values fail at load time, not at the first retrain
            self.strict_retrain_config()
        except ValidationError as exc:
            e = exc.errors()[0]
            raise ValueError(f"tuning.strict_retrain.{'.'.join(map(str, e['loc']))}: "
                             f"{e['msg']}") from None
        return self

    def strict_retrain_config(self) -> RetrainConfig:
        """``retrain`` with the overrides of ``tuning.strict_retrain``, validated."""
        return RetrainConfig.model_validate({**self.retrain.model_dump(),
                                             **self.tuning.strict_retrain})

    @classmethod
    def from_file(cls, path: str | Path) -> HealingPolicy:
        """Read a policy from a YAML (``.yaml``/``.yml``) or JSON file; a top-level
        ``healing:`` key is accepted too."""
        doc = _read_mapping(path)
        return _validate(cls, doc.get("healing", doc), path)

    def actions_for(self, monitor: str) -> list[str]:
        out: list[str] = []
        for r in self.rules:
            if r.monitor == monitor:
                out += [a for a in r.actions if a not in out]
        return out


def _read_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    return read_mapping_file(path, what="policy file", hint="check the path")


def _validate(cls: Any, doc: Any, path: str | os.PathLike[str]) -> Any:
    from pydantic import ValidationError

    try:
        return cls.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise BastionError(f"{path}: bad policy at {where or 'top level'}: {first.get('msg')}",
                           hint=f"{exc.error_count()} problem(s); see the policy docs") from None


class FeedbackSet(BaseModel):
    """Labelled feedback for a retrain: inputs, labels, feedback event ids, the client
    of each label, and how many labels of each quarantined client were left out."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    x: Any
    y: Any
    ids: list[int]
    clients: list[str | None]
    excluded_quarantined: dict[str, int] = Field(default_factory=dict)


class ActionRecord(BaseModel):
    """One decision of a step."""

    action: str
    monitor: str
    done: bool
    detail: str
    client_id: str | None = None
    audit_id: int | None = None
    evidence: dict[str, Any] = Field(default_factory=dict)


class StepReport(BaseModel):
    """What one :meth:`HealingController.step` saw and did."""

    step_id: int | None = None
    from_id: int
    upto_id: int
    baseline_id: int
    signals: list[Signal]
    actions: list[ActionRecord]
    champion: int | None
    time_s: float

    @property
    def fired(self) -> list[Signal]:
        return [s for s in self.signals if s.fired]


class HealingController:
    """See the module docs.

    Args:
        policy: the :class:`HealingPolicy`.
        store: the event store the guard writes to.
        registry: a :class:`~bastion.registry.models.ModelRegistry` (champion, fallback).
        retrain: the :class:`~bastion.runtime.retrain.RetrainPipeline` (its trusted
            reference data also feed the drift and health monitors).
        monitors: replace the default monitors (built from ``policy.monitors``). A fixed
            list is kept as it is after a promotion; the defaults are rebuilt for the new
            champion (its health reference and expected accuracy).
        monitor_factory: ``controller -> monitors``, called on first use and again after
            every promotion (e.g. ``lambda c: c.default_monitors() + [my_monitor]``).
        input_shape: shape of one input (read from the reference data when not given).
    """

    def __init__(self, policy: HealingPolicy | None, store: ev.EventStore, registry: Any,
                 retrain: RetrainPipeline, *, monitors: list[Monitor] | None = None,
                 monitor_factory: Callable[[HealingController], list[Monitor]] | None = None,
                 input_shape: tuple[int, ...] | None = None) -> None:
        if monitors is not None and monitor_factory is not None:
            raise BastionError("give monitors or monitor_factory, not both")
        self.policy = policy or HealingPolicy()
        self.store = store
        self.registry = registry
        self.retrain = retrain
        self.input_shape = tuple(input_shape) if input_shape else tuple(
            retrain.x_ref.shape[1:])
        self._monitors = monitors
        self.lease_ttl_s = 3600.0
        self._factory = monitor_factory
        self._default_monitors = monitors is None

    # -- monitors -------------------------------------------------------------------
    def _champion_model(self) -> tuple[Any, int, Path]:
        from bastion.models.persist import load_model

        v = self.registry.get_alias("champion")
        if v is None:
            raise BastionError(f"model {self.registry.name!r} has no champion",
                               hint="promote a version first (bastion models promote)")
        path = self.registry.download(v)
        return load_model(path), int(v), path

    def monitors(self) -> list[Monitor]:
        """The monitors in use (built on first use, rebuilt after a promotion)."""
        if self._monitors is None:
            self._monitors = (self._factory(self) if self._factory is not None
                              else self.default_monitors())
        return list(self._monitors)

    def default_monitors(self) -> list[Monitor]:
        """Fresh default monitors for the current champion, from ``policy.monitors``:
        input drift, health, accuracy, alert rate, per-client alert rate."""
        m = self.policy.monitors
        ref = self.retrain.x_ref
        champ = None
        try:
            champ, _, path = self._champion_model()
            shutil.rmtree(path, ignore_errors=True)
        except BastionError:
            pass  # no champion yet: no health reference, no expected accuracy
        expected = None
        if champ is not None:
            xh, yh = self.retrain.x_hold, self.retrain.y_hold
            expected = float((np.asarray(champ.predict_proba(xh)).argmax(1) == yh).mean())
        mons: list[Any] = [
            InputDriftMonitor(ref, window=m.window, min_window=m.min_window, alpha=m.alpha,
                              correction=m.drift_correction, mmd=m.mmd),
            AccuracyMonitor(method=m.accuracy_method, min_feedback=m.min_feedback,
                            min_accuracy=m.min_accuracy, window=m.window,
                            expected_accuracy=expected, tolerance=m.accuracy_tolerance,
                            alpha=m.alpha),
            AlertRateMonitor(expected_rate=m.expected_alert_rate, window=m.window,
                             min_window=m.min_window, alpha=m.alpha,
                             min_rate=m.min_alert_rate),
            ClientAlertMonitor(expected_rate=m.expected_alert_rate, window=5 * m.window,
                               min_requests=m.client_min_requests, alpha=m.alpha,
                               min_rate=m.client_min_rate),
        ]
        if champ is not None:
            mons.insert(1, HealthMonitor(champ.predict_proba(ref[:1000]), window=m.window,
                                         min_window=m.min_window, alpha=m.alpha))
        return mons

    # -- state ----------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """This model's key in the store's ``state`` table: cursors are per model."""
        return f"{STATE_HEALING}:{getattr(self.registry, 'name', '')}"

    def state(self) -> dict[str, Any]:
        """The controller's persisted state (cursor, baseline, last retrain)."""
        s = self.store.get_state(self.state_key, None)
        if s is None:  # a store written when the cursor was shared: start from it
            s = self.store.get_state(STATE_HEALING, None) or {}
        return {"cursor": int(s.get("cursor", 0)), "baseline_id": int(s.get("baseline_id", 0)),
                "last_retrain_feedback_id": int(s.get("last_retrain_feedback_id", 0)),
                "firing": dict(s.get("firing") or {}),
                "quiet_steps": int(s.get("quiet_steps", 0))}

    def _audit(self, action: str, monitor: str, done: bool, detail: str, evidence: dict[str, Any],
               client_id: str | None = None) -> ActionRecord:
        aid = self.store.append(ev.AUDIT, {
            "actor": ACTOR, "action": action, "monitor": monitor, "done": done,
            "decision": detail, "evidence": evidence,
        }, client_id=client_id)
        return ActionRecord(action=action, monitor=monitor, done=done, detail=detail,
                            client_id=client_id, audit_id=aid, evidence=evidence)

    # -- the step ---------------------------------------------------------------------
    def step(self) -> StepReport:
        """Read new events, run the monitors, decide, act, and record everything.

        Only one controller steps over a store at a time (a lease in the store's state,
        across processes); a step that finds the lease taken raises
        :class:`~bastion.errors.BastionError` and does nothing.
        """
        owner = f"{os.getpid()}-{id(self)}"
        if not self.store.acquire_lease(STATE_HEALING, owner, ttl_s=self.lease_ttl_s):
            raise BastionError("another healing controller is stepping over this event store",
                               hint="run one controller per store, or retry later")
        try:
            return self._step()
        finally:
            self.store.release_lease(STATE_HEALING, owner)

    def _step(self) -> StepReport:
        t0 = time.perf_counter()
        st = self.state()
        upto = self.store.last_id()
        baseline = st["baseline_id"]
        signals: list[Signal] = []
        for mon in self.monitors():
            try:
                signals += mon.evaluate(self.store, after_id=baseline, upto_id=upto)
            except Exception as exc:  # a broken monitor must not stop the others
                signals.append(Signal(monitor=getattr(mon, "name", type(mon).__name__),
                                      fired=False, severity="warning",
                                      message=f"monitor failed: {type(exc).__name__}: {exc}"))
        actions: list[ActionRecord] = []
        chooser = self._adaptive_begin(st["cursor"], upto)
        retrain_req: tuple[Signal, dict[str, Any], bool] | None = None
        was_firing: dict[str, int] = st["firing"]
        firing: dict[str, int] = {}
        for sig in signals:
            if not sig.fired:
                continue
            key = sig.monitor + (f":{sig.client_id}" if sig.client_id else "")
            wanted = self.policy.actions_for(sig.monitor)
            evidence = {"signal": sig.model_dump(mode="json")}
            if chooser is not None and sig.monitor in self.policy.adaptive.actions:
                wanted = [a for a in wanted if a == "alert"]
                if sig.client_id and sig.client_id in set(
                        self.store.get_state(STATE_QUARANTINE, []) or []):
                    # the client is already quarantined: nothing is left to decide, and
                    # a "choice" here would be credited with the quarantine's effect
                    # (its blocked requests do no harm), teaching the bandit that doing
                    # nothing stops a campaign
                    actions.append(self._audit(
                        "adaptive_skip", sig.monitor, False,
                        f"{sig.monitor}: client {sig.client_id} is already quarantined; "
                        "no choice made", evidence, sig.client_id))
                else:
                    wanted += self._adaptive_pick(chooser, sig, evidence, upto)
            if not wanted:
                actions.append(self._audit("none", sig.monitor, False,
                                           f"{sig.message}; no rule for {sig.monitor}",
                                           evidence, sig.client_id))
            firing[key] = was_firing.get(key, 0)
            for a in wanted:
                if a == "alert":
                    if key in was_firing:  # one alert per episode, not one per step
                        actions.append(self._audit(
                            "alert", sig.monitor, False,
                            f"still firing (alerted in event {was_firing[key]}): "
                            f"{sig.message}", evidence, sig.client_id))
                        continue
                    firing[key] = self.store.append(
                        ev.ALERT, {"monitor": sig.monitor, "severity": sig.severity,
                                   "message": sig.message, "value": sig.value,
                                   "threshold": sig.threshold, "evidence": sig.evidence,
                                   "status": "firing", "model": self._model,
                                   "fingerprint": fingerprint(alert_labels(
                                       sig.monitor, self._model, sig.client_id))},
                        client_id=sig.client_id)
                    actions.append(self._audit("alert", sig.monitor, True, sig.message,
                                               evidence, sig.client_id))
                elif a == "switch_to_fallback":
                    actions.append(self._switch("fallback", sig, evidence))
                elif a == "switch_to_champion":
                    actions.append(self._switch("champion", sig, evidence))
                elif a == "quarantine_client":
                    actions.append(self._quarantine(sig, evidence))
                elif a in ("retrain", "retrain_strict"):
                    if retrain_req is None:  # after every quarantine of this step
                        retrain_req = (sig, evidence, a == "retrain_strict")
                elif a in TUNING_ACTIONS:
                    actions.append(self._tune(a, sig, evidence))
        self._resolve(was_firing, firing)
        if retrain_req is not None:
            rec, promoted = self._retrain(retrain_req[0], retrain_req[1], upto,
                                          strict=retrain_req[2])
            actions.append(rec)
            if promoted:
                baseline = upto
                if self._default_monitors:
                    self._monitors = None  # rebuilt for the new champion
        # traffic on the fallback goes back to the champion, and the guard's tuning back
        # to normal, after enough quiet steps of every monitor whose rule (or arm) may
        # have switched or tuned it
        quiet = st["quiet_steps"]
        on_fallback = self.store.get_state(STATE_TRAFFIC, "champion") == "fallback"
        tuned = not GuardTuning.read(self.store).is_default
        if (on_fallback or tuned) and self.policy.return_to_champion_after > 0:
            moves = ("switch_to_fallback", *TUNING_ACTIONS)
            switchers = {r.monitor for r in self.policy.rules
                         if any(a in r.actions for a in moves)}
            if chooser is not None:
                switchers |= {m for m, arms in self.policy.adaptive.actions.items()
                              if any(a in arms for a in moves)}
            loud = [s for s in signals if s.fired and s.monitor in switchers]
            quiet = 0 if loud else quiet + 1
            if quiet >= self.policy.return_to_champion_after:
                calm = Signal(monitor="healing", fired=True,
                              message=f"{', '.join(sorted(switchers))} quiet for {quiet} "
                                      "steps")
                calm_ev = {"quiet_steps": quiet, "monitors": sorted(switchers)}
                if on_fallback:
                    actions.append(self._switch("champion", calm, calm_ev))
                if tuned:
                    actions.append(self._tune("reset_tuning", calm, calm_ev))
                quiet = 0
        else:
            quiet = 0
        champion = None
        try:
            champion = self.registry.get_alias("champion")
        except Exception:
            pass
        if chooser is not None:
            chooser.steps += 1
            self.store.set_state(self._adaptive_key, chooser.state())
        st2 = self.state()
        st2.update({"cursor": upto, "baseline_id": baseline, "firing": firing,
                    "quiet_steps": quiet})
        self.store.set_state(self.state_key, st2)
        report = StepReport(from_id=st["cursor"], upto_id=upto, baseline_id=baseline,
                            signals=signals, actions=actions, champion=champion,
                            time_s=time.perf_counter() - t0)
        report.step_id = self.store.append(ev.HEALING_STEP, {
            "from_id": report.from_id, "upto_id": upto, "baseline_id": baseline,
            "fired": [s.monitor + (f":{s.client_id}" if s.client_id else "")
                      for s in report.fired],
            "signals": [{"monitor": s.monitor, "fired": s.fired, "message": s.message,
                         "value": s.value, "client_id": s.client_id} for s in signals],
            "actions": [{"action": a.action, "monitor": a.monitor, "done": a.done,
                         "detail": a.detail, "audit_id": a.audit_id,
                         "client_id": a.client_id} for a in actions],
            "champion": champion, "time_s": report.time_s,
        }, model_version=None if champion is None else str(champion))
        return report

    # -- adaptive ---------------------------------------------------------------------
    @property
    def _adaptive_key(self) -> str:
        return f"{STATE_ADAPTIVE}:{self._model}"

    def _adaptive_begin(self, cursor: int, upto: int) -> AdaptiveChooser | None:
        """The bandit with its stored statistics, after giving the choices of the last
        step the harm observed since (``None`` when ``adaptive`` is off)."""
        if not self.policy.adaptive.enabled:
            return None
        chooser = AdaptiveChooser(self.policy.adaptive,
                                  self.store.get_state(self._adaptive_key, None))
        harm = observed_harm(self.store, after_id=cursor, upto_id=upto)
        per_client = {c: observed_harm(self.store, after_id=cursor, upto_id=upto, client_id=c)
                      for c in {str(p["client_id"]) for p in chooser.pending
                                if p.get("client_id")}}
        for d in chooser.settle(harm, per_client):
            h = d.pop("observed")
            self._audit("adaptive_outcome", d["monitor"], True,
                        f"{d['context']}: {d['arm']} was followed by harm {d['harm']:.3f} "
                        f"({h['wrong']} wrong, {h['blocked']} blocked, "
                        f"{h['suspect']} flagged answered, of {h['n']} requests; "
                        f"{d['scope']})", {"outcome": d, "harm": h}, d.get("client_id"))
        return chooser

    def _safe_arms(self, sig: Signal, upto: int) -> tuple[list[str], dict[str, str]]:
        """The arms offered for ``sig`` and those left out, with why (an action the
        controller would refuse or defer is never explored)."""
        offered, excluded = [], {}
        for arm in self.policy.adaptive.actions.get(sig.monitor, []):
            why = None
            if arm == "quarantine_client":
                q = set(self.store.get_state(STATE_QUARANTINE, []) or [])
                if not sig.client_id:
                    why = "the signal names no client"
                elif sig.client_id in q:
                    why = f"client {sig.client_id} is already quarantined"
            elif arm == "switch_to_fallback":
                try:
                    fb = self.registry.get_alias("fallback")
                except Exception:
                    fb = None
                if fb is None:
                    why = "no 'fallback' alias in the registry"
            elif arm in TUNING_ACTIONS:
                why = self._tuning_refusal(arm)
            elif arm in ("retrain", "retrain_strict"):
                st = self.state()
                fs = self.feedback_set(after_id=0, upto_id=upto)
                new = sum(1 for i in fs.ids if i > st["last_retrain_feedback_id"])
                if len(fs.y) < self.policy.min_feedback_for_retrain:
                    why = (f"{len(fs.y)} labelled answers, a retrain needs "
                           f"{self.policy.min_feedback_for_retrain}")
                elif st["last_retrain_feedback_id"] and new < self.policy.retrain_cooldown:
                    why = f"retrain cooldown: {new} new labels of {self.policy.retrain_cooldown}"
            if why is None:
                offered.append(arm)
            else:
                excluded[arm] = why
        return offered or ["none"], excluded

    def _rule_arm(self, monitor: str) -> str:
        """The arm the fixed rules take for ``monitor``: their first action the bandit
        may choose, ``none`` when they take none of them (alert only)."""
        arms = self.policy.adaptive.actions.get(monitor, [])
        return next((a for a in self.policy.actions_for(monitor) if a in arms), "none")

    def _adaptive_pick(self, chooser: AdaptiveChooser, sig: Signal,
                       evidence: dict[str, Any], upto: int) -> list[str]:
        offered, excluded = self._safe_arms(sig, upto)
        arm, why = chooser.choose(sig.monitor, offered, excluded,
                                  self._rule_arm(sig.monitor))
        chooser.pending.append({"context": sig.monitor, "monitor": sig.monitor, "arm": arm,
                                "client_id": sig.client_id, "at_id": upto})
        self._audit("adaptive_choice", sig.monitor, True,
                    f"{sig.monitor}: chose {arm} (lowest sampled harm of "
                    + ", ".join(f"{a} {v['sample']:.3f}" for a, v in why["offered"].items())
                    + (f"; excluded {', '.join(f'{a}: {w}' for a, w in excluded.items())}"
                       if excluded else "") + ")", {**evidence, "adaptive": why},
                    sig.client_id)
        return [] if arm == "none" else [arm]

    @property
    def _model(self) -> str:
        return str(getattr(self.registry, "name", ""))

    def _resolve(self, was_firing: dict[str, int], firing: dict[str, int]) -> None:
        """A ``resolved`` alert event for every alerted episode that ended this step."""
        for key, alert_id in was_firing.items():
            if key in firing or not alert_id:
                continue
            monitor, _, client = key.partition(":")
            self.store.append(ev.ALERT, {
                "monitor": monitor, "status": "resolved", "model": self._model,
                "firing_event_id": alert_id,
                "message": f"{monitor} no longer fires" + (f" for client {client}"
                                                           if client else ""),
                "fingerprint": fingerprint(alert_labels(monitor, self._model,
                                                        client or None))},
                client_id=client or None)

    # -- actions ----------------------------------------------------------------------
    def _switch(self, to: str, sig: Signal, evidence: dict[str, Any]) -> ActionRecord:
        action = f"switch_to_{to}"
        current = self.store.get_state(STATE_TRAFFIC, "champion")
        if current == to:
            return self._audit(action, sig.monitor, False,
                               f"traffic already goes to the {to}", evidence)
        if to == "fallback":
            try:
                fb = self.registry.get_alias("fallback")
            except Exception:
                fb = None
            if fb is None:
                return self._audit(action, sig.monitor, False,
                                   "no 'fallback' alias in the registry; traffic stays on the "
                                   "champion", evidence)
            evidence = {**evidence, "fallback_version": fb}
        self.store.set_state(STATE_TRAFFIC, to)
        self.store.append(ev.MODEL_CHANGE, {"type": "traffic", "to": to, "from": current,
                                            "reason": sig.message, "actor": ACTOR})
        return self._audit(action, sig.monitor, True,
                           f"traffic switched from the {current} to the {to}: {sig.message}",
                           evidence)

    def _quarantine(self, sig: Signal, evidence: dict[str, Any]) -> ActionRecord:
        c = sig.client_id
        if not c:
            return self._audit("quarantine_client", sig.monitor, False,
                               "the signal names no client", evidence)
        q = set(self.store.get_state(STATE_QUARANTINE, []) or [])
        if c in q:
            return self._audit("quarantine_client", sig.monitor, False,
                               f"client {c} is already quarantined", evidence, c)
        q.add(c)
        self.store.set_state(STATE_QUARANTINE, sorted(q))
        self.store.append(ev.MODEL_CHANGE, {"type": "quarantine", "client_id": c,
                                            "reason": sig.message, "actor": ACTOR}, client_id=c)
        return self._audit("quarantine_client", sig.monitor, True,
                           f"client {c} quarantined: {sig.message}", evidence, c)

    def _squeeze_cost(self) -> tuple[float, float]:
        """The champion's accuracy on the trusted holdout without and with squeezing to
        ``tuning.squeeze_bits`` bits (cached per champion version and bit depth)."""
        bits = self.policy.tuning.squeeze_bits
        champ, cv, path = self._champion_model()
        shutil.rmtree(path, ignore_errors=True)
        key = (cv, bits)
        cache = getattr(self, "_squeeze_acc", {})
        if key not in cache:
            xh, yh = self.retrain.x_hold, self.retrain.y_hold
            bounds = tuple(getattr(champ, "bounds", ()))
            plain = float((np.asarray(champ.predict_proba(xh)).argmax(1) == yh).mean())
            sq = float((np.asarray(champ.predict_proba(squeeze_inputs(xh, bits, bounds)))
                        .argmax(1) == yh).mean())
            cache = {key: (plain, sq)}
            self._squeeze_acc = cache
        return cache[key]

    def _tuning_refusal(self, action: str) -> str | None:
        """Why ``action`` would change nothing or cost more than the gates allow
        (``None``: it may be taken)."""
        t, tun = GuardTuning.read(self.store), self.policy.tuning
        if action == "lower_threshold" and t.fpr_scale * tun.step > tun.max_fpr_scale + 1e-9:
            return f"thresholds already at the lowest allowed (fpr scale {t.fpr_scale:g})"
        if action == "raise_threshold" and t.fpr_scale / tun.step < tun.min_fpr_scale - 1e-9:
            return f"thresholds already at the highest allowed (fpr scale {t.fpr_scale:g})"
        if action == "squeeze_on":
            if t.squeeze_bits is not None:
                return f"inputs are already squeezed ({t.squeeze_bits} bits)"
            try:
                plain, sq = self._squeeze_cost()
            except BastionError as exc:
                return str(exc)
            if plain - sq > self.policy.retrain.margin:
                return (f"squeezing to {tun.squeeze_bits} bits costs the champion "
                        f"{plain - sq:.3f} holdout accuracy ({plain:.3f} -> {sq:.3f}), more "
                        f"than the gates' margin {self.policy.retrain.margin}")
        return None

    def _tune(self, action: str, sig: Signal, evidence: dict[str, Any]) -> ActionRecord:
        """Change the guard's tuning (``reset_tuning``: back to the default)."""
        before = GuardTuning.read(self.store)
        if action == "reset_tuning":
            after = GuardTuning()
        else:
            why = self._tuning_refusal(action)
            if why is not None:
                return self._audit(action, sig.monitor, False, why, evidence, sig.client_id)
            step = self.policy.tuning.step
            if action == "lower_threshold":
                after = before.model_copy(update={"fpr_scale": before.fpr_scale * step})
            elif action == "raise_threshold":
                after = before.model_copy(update={"fpr_scale": before.fpr_scale / step})
            else:
                after = before.model_copy(
                    update={"squeeze_bits": self.policy.tuning.squeeze_bits})
                evidence = {**evidence, "holdout_accuracy": dict(zip(
                    ("plain", "squeezed"), self._squeeze_cost(), strict=True))}
        self.store.set_state(STATE_TUNING, after.model_dump(mode="json"))
        self.store.append(ev.MODEL_CHANGE, {"type": "tuning", "action": action,
                                            "from": before.model_dump(mode="json"),
                                            "to": after.model_dump(mode="json"),
                                            "reason": sig.message, "actor": ACTOR})
        return self._audit(action, sig.monitor, True,
                           f"guard tuning {before.model_dump(mode='json')} -> "
                           f"{after.model_dump(mode='json')}: {sig.message}",
                           {**evidence, "tuning_before": before.model_dump(mode="json"),
                            "tuning_after": after.model_dump(mode="json")}, sig.client_id)

    def feedback_set(self, *, after_id: int, upto_id: int) -> FeedbackSet:
        """The latest labelled answers (inputs from the prediction events) with the client
        each label came from, without those of quarantined clients (retroactively: a
        client quarantined now loses every label it ever sent)."""
        pairs = labelled_feedback(self.store, after_id=after_id, upto_id=upto_id,
                                  limit=self.policy.feedback_window)
        quarantined = {str(c) for c in (self.store.get_state(STATE_QUARANTINE, []) or [])}
        d = int(np.prod(self.input_shape))
        xs, ys, ids, cls = [], [], [], []
        excluded: dict[str, int] = {}
        for p, f in pairs:
            inp = p.payload.get("input")
            if not isinstance(inp, list) or len(inp) != d:
                continue
            # the feedback's (authenticated) client; else the client that asked
            client = f.client_id or p.client_id
            if client is not None and str(client) in quarantined:
                excluded[str(client)] = excluded.get(str(client), 0) + 1
                continue
            xs.append(inp)
            ys.append(int(f.payload["label"]))
            ids.append(f.id)
            cls.append(None if client is None else str(client))
        x = np.asarray(xs, dtype=np.float32).reshape(-1, *self.input_shape)
        return FeedbackSet(x=x, y=np.asarray(ys, dtype=np.int64), ids=ids, clients=cls,
                           excluded_quarantined=excluded)

    def feedback_data(self, *, after_id: int, upto_id: int
                      ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Inputs, labels and feedback event ids of :meth:`feedback_set`."""
        fs = self.feedback_set(after_id=after_id, upto_id=upto_id)
        return fs.x, fs.y, fs.ids

    def _retrain(self, sig: Signal, evidence: dict[str, Any], upto: int, *,
                 strict: bool = False) -> tuple[ActionRecord, bool]:
        if not strict:
            return self._retrain_once(sig, evidence, upto, "retrain")
        saved = self.retrain.config
        self.retrain.config = self.policy.strict_retrain_config()
        try:
            return self._retrain_once(sig, {**evidence, "strict_retrain":
                                            dict(self.policy.tuning.strict_retrain)},
                                      upto, "retrain_strict")
        finally:
            self.retrain.config = saved

    def _retrain_once(self, sig: Signal, evidence: dict[str, Any], upto: int, name: str
                      ) -> tuple[ActionRecord, bool]:
        st = self.state()
        fs = self.feedback_set(after_id=0, upto_id=upto)
        x, y, ids = fs.x, fs.y, fs.ids
        new_since = sum(1 for i in ids if i > st["last_retrain_feedback_id"])
        base_ev = {**evidence, "n_feedback": len(y), "new_feedback_since_last_retrain": new_since,
                   "excluded_quarantined": fs.excluded_quarantined}
        if len(y) < self.policy.min_feedback_for_retrain:
            return self._audit(name, sig.monitor, False,
                               f"retrain deferred: {len(y)} labelled answers with logged inputs, "
                               f"need {self.policy.min_feedback_for_retrain}", base_ev), False
        if st["last_retrain_feedback_id"] and new_since < self.policy.retrain_cooldown:
            return self._audit(name, sig.monitor, False,
                               f"retrain skipped: only {new_since} new labelled answers since "
                               f"the last attempt (cooldown {self.policy.retrain_cooldown})",
                               base_ev), False
        st["last_retrain_feedback_id"] = max(ids)
        self.store.set_state(self.state_key, st)
        path: Path | None = None
        try:
            from bastion.models.persist import read_model_meta, save_model

            champion, cv, path = self._champion_model()
            meta = read_model_meta(path)
            result: RetrainResult = self.retrain.run(champion, x, y, clients=fs.clients)
            gates = [g.model_dump(mode="json") for g in result.gates]
            summary = result.summary()
            screen = summary.pop("screen", {})
            for r in screen.get("removed", []):  # row index -> feedback event id
                r["feedback_id"] = ids[r.pop("row")]
            self._audit("screen_feedback", sig.monitor, bool(result.n_removed),
                        f"feedback screened: {result.n_removed} of {len(y)} labels removed"
                        + (f"; suspected target class(es) {screen['suspected_targets']}"
                           if screen.get("suspected_targets") else "")
                        + (f"; excluded from quarantined clients: {fs.excluded_quarantined}"
                           if fs.excluded_quarantined else ""),
                        {"screen": screen, "clients": result.clients,
                         "excluded_quarantined": fs.excluded_quarantined})
            ev_ = {**base_ev, "champion": cv, "retrain": summary, "gates": gates}
            if not result.passed:
                return self._audit(name, sig.monitor, False,
                                   f"candidate refused, never registered, champion v{cv} "
                                   f"kept: {result.reason}", ev_), False
            out = Path(tempfile.mkdtemp(prefix="bastion-candidate-"))
            try:
                save_model(result.model, out / "model", arch=str(meta["arch"]),
                           arch_kwargs=dict(meta.get("arch_kwargs") or {}),
                           meta={"parent_version": cv, "trigger": sig.monitor,
                                 "retrain": {k: v for k, v in result.summary().items()
                                             if k in ("n_feedback", "n_kept", "n_removed")}})
                metrics = {f"gate.{g.name}.candidate": g.candidate for g in result.gates
                           if g.candidate is not None}
                v = self.registry.register(out / "model", tags={
                    "bastion.parent_version": cv, "bastion.trigger": sig.monitor,
                    "bastion.source": "healing-controller"}, metrics=metrics)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            self.registry.promote(v, reason=f"healing: {sig.message}; gates passed",
                                  actor=ACTOR)
            if self.store.get_state(STATE_TRAFFIC, "champion") != "champion":
                self.store.set_state(STATE_TRAFFIC, "champion")
                self.store.append(ev.MODEL_CHANGE, {
                    "type": "traffic", "to": "champion", "from": "fallback",
                    "reason": f"new champion v{v}", "actor": ACTOR})
            return self._audit(name, sig.monitor, True,
                               f"candidate v{v} passed every gate and is the champion "
                               f"(v{cv} is previous)", {**ev_, "new_version": v}), True
        except Exception as exc:  # a crashed retrain leaves the champion untouched
            return self._audit(name, sig.monitor, False,
                               f"retrain crashed, champion kept: {type(exc).__name__}: {exc}",
                               {**base_ev, "error": f"{type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc(limit=5)[-2000:]}), False
        finally:
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)


def _check_registered(registry: Any) -> None:
    """An unknown model (a typo) or one without a champion is an error, before any step."""
    if registry.get_alias("champion") is not None:
        return
    if registry.versions():
        raise BastionError(f"model {registry.name!r} has no champion",
                           hint=f"promote a version first: bastion models promote --model "
                           f"{registry.name} --version N --reason ...")
    try:
        known = sorted(str(m.name) for m in registry.client.search_registered_models())
    except Exception:  # the listing is only a hint
        known = []
    raise BastionError(f"no registered model {registry.name!r}",
                       hint=f"known models: {', '.join(known)}" if known else
                       "register one first (bastion serve --model FOLDER registers it)")


#: why a text model is not healed (the service's heal interval and ``bastion heal`` say it)
TEXT_HEALING = ("self-healing (drift monitors, retrain) is not built for text models yet; "
                "the guard screens their requests")


def build_controller(
    model_name: str,
    reference: str,
    *,
    events_url: str = ev.DEFAULT_URL,
    tracking_uri: str | None = None,
    policy: str | Path | HealingPolicy | None = None,
    seed: int = 0,
) -> HealingController:
    """A controller from specs, as ``bastion heal`` builds it.

    Args:
        model_name: the registered model (its ``champion`` alias answers traffic).
        reference: a data spec (``builtin:digits``, ``csv:...``): its training split is the
            trusted reference data, its test split the trusted holdout of the gates.
        events_url: the event store.
        tracking_uri: the MLflow store (default: as in tracking.py).
        policy: a :class:`HealingPolicy`, or a YAML/JSON file holding one.
        seed: seed of the retrain pipeline (overrides the policy's).
    """
    from bastion.data import load_data
    from bastion.registry.models import ModelRegistry

    pol = policy if isinstance(policy, HealingPolicy) else (
        HealingPolicy.from_file(policy) if policy is not None else HealingPolicy())
    pol = pol.model_copy(update={"retrain": pol.retrain.model_copy(update={"seed": int(seed)})})
    ds = load_data(reference, seed=seed)
    if ds.kind == "text":
        raise BastionError(TEXT_HEALING, hint="serve the text model without --heal-interval; "
                           "bastion heal takes image and tabular models")
    store = ev.EventStore(events_url)
    registry = ModelRegistry(model_name, tracking_uri=tracking_uri, store=store)
    _check_registered(registry)
    pipeline = RetrainPipeline((ds.x_train, ds.y_train), (ds.x_test, ds.y_test),
                               config=pol.retrain)
    return HealingController(pol, store, registry, pipeline)
