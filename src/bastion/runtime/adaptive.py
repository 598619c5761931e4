"""A defense that adapts: a contextual bandit choosing the healing action per kind of
attack from the outcomes recorded after earlier choices.

The fixed policy maps every signal to the same actions. With ``adaptive.enabled`` in the
:class:`~bastion.runtime.healing.HealingPolicy`, the controller asks
:class:`AdaptiveChooser` instead, for every monitor listed in ``adaptive.actions``:

- **context**: the kind of attack, i.e. the monitor that fired (``client_alert_rate``: one
  client's evasion or extraction campaign, ``alert_rate``: flagged traffic overall,
  ``input_drift``, ``accuracy``: wrong answers or poisoned feedback);
- **arms**: the candidate actions for that context (``none``, ``quarantine_client``,
  ``switch_to_fallback``, ``retrain``); ``alert`` still follows the rules;
- **safe exploration**: an arm whose preconditions fail is never offered (no fallback
  alias, a signal naming no client, too few labels for a retrain or its cooldown not over:
  the cases the controller would refuse or defer), so exploring never tries an action
  Bastion would refuse;
- **outcome**: the harm observed between this step and the next (:func:`observed_harm`),
  of the client's own requests for a choice about one client (``client_alert_rate``:
  the campaign the action was meant to stop; before, every choice of a step shared the
  step's overall harm, so drift errors nobody could fix were charged to a quarantine),
  of all requests otherwise:
  answers the feedback labels say were wrong, blocked requests whose client labelled them
  anyway (it wanted an answer), and flagged inputs the champion answered that nobody
  labelled (the visible trace of an evasion), per request. The client under suspicion
  has no say in its own outcome: a client-scoped outcome reads none of its labels, and a
  quarantined client's labels never count as blocked harm (else an attacker could label
  its way out of the next quarantine);
- **learning**: discounted Thompson sampling (Gaussian posterior of each arm's mean harm,
  old outcomes weighed down by ``discount`` per update, so a campaign that changes is
  followed);
- **prior from the rules**: the bandit starts from the fixed rules and leaves them on
  evidence. The arm the policy's rules take for that monitor (``none`` when they only
  alert) has prior mean harm ``prior_harm``; every other arm ``prior_harm +
  off_rule_prior``. With ``off_rule_prior = 0`` every arm starts equal, which is what the
  first version did: an untried or long-unused arm was as promising as the best one seen,
  so ``none`` was re-tried on running campaigns and each try answered a round of attack
  inputs (benchmarks/README.md, issue 19).

Every choice is an ``audit`` event (action ``adaptive_choice``) with the context, the arms
offered and excluded (with why), each arm's posterior mean, count and sample, and the arm
chosen; every settled outcome is an ``audit`` event ``adaptive_outcome``. The statistics
live in the store's state (``adaptive:<model>``), so they survive a restart.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from bastion.store import events as ev

Arm = Literal["none", "quarantine_client", "switch_to_fallback", "retrain", "retrain_strict",
              "lower_threshold", "raise_threshold", "squeeze_on"]
STATE_ADAPTIVE = "adaptive"

__all__ = ["AdaptiveChooser", "AdaptiveSettings", "observed_harm"]


#: ``raise_threshold`` is no default arm: outcomes are read from client labels, and an
#: attacker who labels its own flagged inputs as answered wrongly by the fallback could
#: talk the bandit into flagging less. A policy may still name it (rule or arm).
def _default_arms() -> dict[str, list[Arm]]:
    return {"client_alert_rate": ["none", "quarantine_client", "switch_to_fallback",
                                  "lower_threshold", "squeeze_on"],
            "alert_rate": ["none", "switch_to_fallback", "lower_threshold", "squeeze_on"],
            "input_drift": ["none", "switch_to_fallback", "retrain", "retrain_strict"],
            "accuracy": ["none", "retrain", "retrain_strict", "switch_to_fallback",
                         "squeeze_on"]}


class AdaptiveSettings(BaseModel):
    """``enabled``; ``actions``: the arms per monitor; ``discount`` of old outcomes per
    update; ``prior_harm`` and ``prior_sd``: the prior of the arm the rules take;
    ``off_rule_prior``: how much more harm the prior expects of any other arm;
    ``seed``."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    actions: dict[str, list[Arm]] = Field(default_factory=_default_arms)
    discount: float = Field(default=0.9, gt=0.0, le=1.0)
    prior_harm: float = Field(default=0.0, ge=0.0)
    prior_sd: float = Field(default=0.3, gt=0.0)
    off_rule_prior: float = Field(default=1.0, ge=0.0)
    noise_sd: float = Field(default=0.15, gt=0.0)
    seed: int = 0


def observed_harm(store: ev.EventStore, *, after_id: int, upto_id: int,
                  suspect_weight: float = 0.5, client_id: str | None = None
                  ) -> dict[str, Any]:
    """Harm visible in ``(after_id, upto_id]``, per answered request:

    - ``wrong``: labelled answers the label disagrees with;
    - ``blocked``: requests answered with nothing (blocked) that their client labelled
      anyway (it wanted an answer), except a quarantined client's: its label is the word
      of the client Bastion already judged hostile, and counting it would let an attacker
      make its own quarantine look costly;
    - ``suspect``: unlabelled inputs the detectors flagged that the champion answered
      anyway (attackers do not label their inputs: a flagged input answered by the
      champion is the visible trace of a possibly successful evasion), and unlabelled
      queries the extraction detector flagged that got any answer (for a theft
      campaign the answer is the harm, whichever model gives it: a fallback answering
      them still hands out labels), weighed by ``suspect_weight``.

    With ``client_id`` (the outcome of a choice about that client): only its requests,
    and none of its labels, since it is the client under suspicion: labelling its flagged
    inputs with the answer it got would otherwise hide them, and labelling its blocked
    ones would bill the quarantine; its flagged inputs the champion answered are all
    ``suspect``.

    ``harm`` = (wrong + blocked + suspect_weight * suspect) / n, None without requests.
    """
    from bastion.runtime.monitors import labelled_feedback

    wrong = blocked = 0
    labelled: set[str] = set()
    pairs = [] if client_id is not None else \
        labelled_feedback(store, after_id=after_id, upto_id=upto_id, limit=None)
    for p, f in pairs:
        if "quarantine" in (p.payload.get("fired") or []):
            continue
        labelled.add(str(p.request_id))
        served = p.payload.get("label")
        if served is None or p.payload.get("verdict") == "block":
            blocked += 1
        elif int(served) != int(f.payload["label"]):
            wrong += 1
    n = suspect = 0
    for p in store.query(kinds=ev.PREDICTION, after_id=after_id, before_id=upto_id,
                         client_id=client_id, limit=None):
        n += 1
        pl = p.payload
        if str(p.request_id) not in labelled and pl.get("verdict") == "flag" and \
                pl.get("label") is not None and (
                    pl.get("answered_by") == "champion"
                    or "extraction" in (pl.get("fired") or [])):
            suspect += 1
    return {"wrong": wrong, "blocked": blocked, "suspect": suspect, "n": n,
            "n_labelled": len(labelled),
            "harm": None if n == 0 else (wrong + blocked + suspect_weight * suspect) / n}


class AdaptiveChooser:
    """See the module docs. ``state`` is the persisted dict (``arms``: per context and
    arm ``[weight, weighted sum, weighted sum of squares]``; ``pending``: choices waiting
    for their outcome)."""

    def __init__(self, settings: AdaptiveSettings, state: dict[str, Any] | None = None
                 ) -> None:
        self.s = settings
        st = dict(state or {})
        self.arms: dict[str, dict[str, list[float]]] = {
            c: {a: list(map(float, v)) for a, v in arms.items()}
            for c, arms in (st.get("arms") or {}).items()}
        self.pending: list[dict[str, Any]] = list(st.get("pending") or [])
        self.steps = int(st.get("steps", 0))

    def state(self) -> dict[str, Any]:
        # choices still waiting for labels: the latest 100 (the state stays small)
        return {"arms": self.arms, "pending": self.pending[-100:], "steps": self.steps}

    def prior_mean(self, arm: str, rule_arm: str | None) -> float:
        """The prior mean harm of ``arm`` when the rules would take ``rule_arm``
        (``None``: no rule known, every arm starts at ``prior_harm``)."""
        if rule_arm is None or arm == rule_arm:
            return self.s.prior_harm
        return self.s.prior_harm + self.s.off_rule_prior

    def posterior(self, context: str, arm: str, rule_arm: str | None = None
                  ) -> tuple[float, float, float]:
        """``(mean, sd, weight)`` of the arm's mean harm."""
        w, s1, _ = self.arms.get(context, {}).get(arm, [0.0, 0.0, 0.0])
        m0 = self.prior_mean(arm, rule_arm)
        p0 = 1.0 / self.s.prior_sd ** 2
        pn = w / self.s.noise_sd ** 2
        mean = (p0 * m0 + (s1 / max(w, 1e-12)) * pn) / (p0 + pn) if w else m0
        return mean, math.sqrt(1.0 / (p0 + pn)), w

    def choose(self, context: str, offered: list[str], excluded: dict[str, str],
               rule_arm: str | None = None) -> tuple[str, dict[str, Any]]:
        """Thompson sampling over ``offered``, starting from the rules' ``rule_arm``;
        returns ``(arm, reasoning)``."""
        import zlib

        # seeded by the step and the context (crc32: str hashes change per process)
        rng = np.random.default_rng([self.s.seed, self.steps, len(self.pending),
                                     zlib.crc32(context.encode())])
        table = {}
        for a in offered:
            mean, sd, w = self.posterior(context, a, rule_arm)
            table[a] = {"prior_harm": round(self.prior_mean(a, rule_arm), 4),
                        "mean_harm": round(mean, 4), "sd": round(sd, 4),
                        "weight": round(w, 3), "sample": round(float(rng.normal(mean, sd)), 4)}
        arm = min(offered, key=lambda a: (table[a]["sample"], a))
        return arm, {"context": context, "offered": table, "excluded": excluded,
                     "rule_arm": rule_arm, "chosen": arm,
                     "rule": "lowest sampled harm (Thompson sampling)"}

    def settle(self, harm: dict[str, Any],
               per_client: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Give each pending choice its outcome and return what was settled: a choice
        about one client (``client_id``, with its harm in ``per_client``) gets the harm of
        that client's requests, any other the overall ``harm``. A choice whose harm is
        unknown (no requests) waits for the next step."""
        d = self.s.discount
        done, waiting = [], []
        for p in self.pending:
            c = p.get("client_id")
            h_of = per_client[c] if per_client is not None and c and c in per_client \
                else harm
            if h_of.get("harm") is None:
                waiting.append(p)
                continue
            ctx = self.arms.setdefault(p["context"], {})
            for a in ctx.values():  # forget slowly: campaigns change
                a[0] *= d
                a[1] *= d
                a[2] *= d
            h = float(h_of["harm"])
            v = ctx.setdefault(p["arm"], [0.0, 0.0, 0.0])
            v[0] += 1.0
            v[1] += h
            v[2] += h * h
            done.append({**p, "harm": h, "n_labelled": h_of["n"],
                         "scope": f"client {c}" if h_of is not harm else "all requests",
                         "observed": h_of})
        self.pending = waiting
        return done
