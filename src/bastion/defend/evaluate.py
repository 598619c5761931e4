"""Honest evaluation of a defense: the scan, with attacks that fit the defense.

A defense is only as good as the strongest attack that knows about it (Athalye, Carlini
& Wagner 2018; Tramer et al. 2020). :func:`evaluate_defense` scans the model before and
after hardening with the same cascade and adds, per method:

- adversarial training, ensembles: the cascade on the whole model (for an ensemble, the
  gradient of the whole ensemble);
- distillation: plain PGD through the softmax first (the attack distillation was
  designed to stop), then PGD on the *softened* logits (divided by ``T``), the cascade
  (its APGD-T stage uses the scale-invariant DLR loss) and, separately, Carlini-Wagner L2
  on the logits, before and after;
- feature squeezing: PGD crafted on the undefended model and transferred (the
  non-adaptive attack squeezing stops) first, then the cascade through BPDA
  (straight-through) gradients;
- randomized smoothing: the cascade through EOT gradients of the smoothed model (no
  query-based stage: its predictions are random), plus certified accuracy per L2 radius.

The verdict compares the *worst case* before and after and says so plainly when the
defense does not help against the adaptive attack, or when the non-adaptive number was
misleading.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bastion.attacks.base import AttackResult, FixedEpsilonAttack
from bastion.defend.report import Curve
from bastion.errors import BastionError
from bastion.evaluate.report import eps_key

#: the cascade used unless the caller names attacks (the scan's white-box default)
DEFAULT_CASCADE: tuple[str, ...] = ("apgd-ce", "apgd-t", "square")
#: randomized models: gradient attacks through EOT only
SMOOTH_CASCADE: tuple[str, ...] = ("pgd", "apgd-ce")
#: meaningful change in accuracy (absolute)
MARGIN = 0.02


class SurrogateAttack(FixedEpsilonAttack):
    """Run ``attack`` against ``surrogate`` and hand its inputs to the scan, which checks
    them on the real model. Used for transfer (squeezing) and for attacking a model's
    softened logits (distillation); the surrogate must predict like the real model or be
    a deliberately different source model."""

    white_box = True

    def __init__(self, *, attack: Any, surrogate: Any, name: str) -> None:
        self.attack = attack
        self.surrogate = surrogate
        self.name = name
        self.norm = attack.norm

    def run(self, model: object, x: np.ndarray, y: np.ndarray, *,
            epsilons: Sequence[float], target: np.ndarray | None = None,
            point_ids: np.ndarray | None = None) -> AttackResult:
        import inspect

        takes = "point_ids" in inspect.signature(self.attack.run).parameters
        kw = {"point_ids": point_ids} if point_ids is not None and takes else {}
        res = self.attack.run(self.surrogate, x, y, epsilons=epsilons, target=target, **kw)
        res.attack = self.name
        return res

    def __repr__(self) -> str:
        return f"SurrogateAttack({self.name}: {self.attack!r})"


@dataclass
class Evaluation:
    """What :func:`evaluate_defense` found."""

    before: Curve
    after: Curve
    notes: list[str]
    verdict: str
    helps: bool | None
    warnings: list[str] = field(default_factory=list)
    time_s: float = 0.0


def _curve(rep: Any, *, name: str) -> Curve:
    per = {s.name: dict(s.robust_accuracy_after) for s in rep.per_attack}
    return Curve(model=name, clean_accuracy=float(rep.clean_accuracy),
                 robust_accuracy=dict(rep.robust_accuracy), norm=rep.norm,
                 attacks=list(rep.attacks), per_attack=per, n_points=int(rep.n_points),
                 warnings=list(rep.warnings))


def _stage(curve: Curve, name: str) -> dict[str, float] | None:
    return curve.per_attack.get(name)


def evaluate_defense(
    before: Any,
    after: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    method: str,
    norm: str = "linf",
    epsilons: Sequence[float],
    seed: int = 0,
    limit: int | None = 200,
    attacks: Sequence[str] | None = None,
    attack_options: Mapping[str, Mapping[str, Any]] | None = None,
    radii: Sequence[float] | None = None,
    l2_epsilons: Sequence[float] | None = None,
    cw_options: Mapping[str, Any] | None = None,
    temperature: float | None = None,
    sanity_checks: bool = True,
    progress: bool = False,
) -> Evaluation:
    """Scan ``before`` and ``after`` with attacks that fit ``method`` (see the module doc).

    Args:
        before, after: the undefended and the hardened model.
        x, y: evaluation data (the first ``limit`` points are used).
        method: the hardening method (``pgd-at``, ``fast-at``, ``trades``, ``distill``,
            ``ensemble``, ``squeeze``, ``smooth``).
        norm, epsilons: the threat model of the robust-accuracy curves.
        attacks, attack_options: the cascade and its options (as for the scan).
        radii: L2 radii for certified accuracy (smoothing).
        l2_epsilons: L2 budgets for the C&W evaluation (distillation).
        cw_options: options of the C&W attack (also read from ``attack_options["cw"]``);
            by default the attack's own (100 steps, 9 binary-search steps) - fewer steps
            make C&W weak and the distilled model look better than it is.
        temperature: the distillation temperature (for the softened-logit attack).
    """
    from bastion.attacks import get_attack
    from bastion.evaluate import scan

    t0 = time.perf_counter()
    eps = sorted({0.0, *[float(e) for e in epsilons]})
    if limit is not None:
        x, y = x[:limit], y[:limit]
    opts = {str(k): dict(v) for k, v in (attack_options or {}).items()}
    base = list(attacks) if attacks else list(
        SMOOTH_CASCADE if method == "smooth" else DEFAULT_CASCADE)
    if method == "smooth" and not attacks:
        opts = {k: v for k, v in opts.items() if k in base}
    notes: list[str] = []
    warnings: list[str] = []

    def run(model: Any, cascade: list[Any], name: str) -> Curve:
        names = {c for c in cascade if isinstance(c, str)}
        o = {k: v for k, v in opts.items() if k in names}
        rep = scan(model, x, y, attacks=cascade, attack_options=o or None, norm=norm,
                   epsilons=eps, seed=seed, sanity_checks=sanity_checks, progress=progress)
        return _curve(rep, name=name)

    before_cascade: list[Any] = list(base)
    after_cascade: list[Any] = list(base)
    pgd_opts = opts.get("pgd", {"steps": 40})
    if method == "distill":
        from bastion.defend.distill import TemperatureScaled

        T = float(temperature or 100.0)
        naive = get_attack("pgd", norm=norm, seed=seed, **pgd_opts)
        soft = SurrogateAttack(attack=get_attack("pgd", norm=norm, seed=seed, **pgd_opts),
                               surrogate=TemperatureScaled(after, T), name="pgd-softened")
        after_cascade = [naive, soft] + [a for a in base if a != "pgd"]
        before_cascade = [get_attack("pgd", norm=norm, seed=seed, **pgd_opts)] + \
            [a for a in base if a != "pgd"]
        notes.append(
            "Distillation: plain PGD on the cross-entropy of the deployed (T=1) network "
            "first - the attack distillation was built to stop - then PGD on the softened "
            f"logits (divided by T={T:g}), then the cascade ({', '.join(map(str, base))}); "
            "Carlini-Wagner L2 on the logits was run separately, before and after.")
    elif method == "squeeze":
        transfer = SurrogateAttack(attack=get_attack("pgd", norm=norm, seed=seed, **pgd_opts),
                                   surrogate=getattr(after, "base", before),
                                   name="pgd-transfer")
        after_cascade = [transfer] + list(base)
        notes.append(
            "Feature squeezing: PGD crafted on the undefended model and transferred "
            "(non-adaptive) first, then the cascade "
            f"({', '.join(map(str, base))}) through BPDA: the squeezer's forward pass with "
            "a straight-through (identity) backward pass, so gradient attacks adapt.")
    elif method == "smooth":
        notes.append(
            "Randomized smoothing: the cascade "
            f"({', '.join(map(str, base))}) attacks the smoothed model through EOT "
            "gradients (each gradient averages the base model's softmax over fresh noise "
            "draws); success is checked on the smoothed prediction (a Monte Carlo vote). "
            "Certified accuracy comes from Cohen et al.'s CERTIFY (Clopper-Pearson bound).")
    elif method == "ensemble":
        notes.append(f"Ensemble: the cascade ({', '.join(map(str, base))}) attacks the whole "
                     "ensemble (the gradient of its averaged output), not single members.")
    else:
        notes.append(f"Adversarial training ({method}): the cascade "
                     f"({', '.join(map(str, base))}) attacks the hardened network directly.")

    b = run(before, before_cascade, str(getattr(before, "name", "before")))
    a = run(after, after_cascade, str(getattr(after, "name", "after")))

    if method == "distill":
        l2e = sorted({0.0, *[float(e) for e in (l2_epsilons or [0.5, 1.0, 2.0])]})
        cw = dict(cw_options or opts.get("cw") or {})  # default: the attack's own budget
        for curve, model in ((b, before), (a, after)):
            rep = scan(model, x, y, norm="l2", epsilons=l2e, seed=seed,
                       attacks=[get_attack("cw", norm="l2", seed=seed, **cw)],
                       sanity_checks=False)
            curve.l2_attack = "cw"
            curve.l2_robust_accuracy = dict(rep.robust_accuracy)
    if method == "smooth":
        from bastion.defend.smoothing import SmoothedClassifier, certified_accuracy_from

        if not isinstance(after, SmoothedClassifier):
            raise BastionError("smoothing evaluation needs a SmoothedClassifier")
        classes, r = after.certify(x)
        rr = list(radii) if radii else [0.0, 0.25, 0.5, 0.75, 1.0]
        rr = sorted({0.0, *[float(v) for v in rr]})
        a.certified_accuracy = certified_accuracy_from(classes, r, y, rr)
        a.abstain_rate = float(np.mean(classes < 0))
        r_max = after.max_radius()
        beyond = [v for v in rr if v > r_max]
        if beyond:
            warnings.append(
                f"L2 radii {', '.join(f'{v:g}' for v in beyond)} cannot be certified with "
                f"n={after.n} samples at alpha={after.alpha:g} (the largest certifiable "
                f"radius is sigma * Phi^-1(alpha^(1/n)) = {r_max:.3f}); their certified "
                "accuracy of 0 says nothing about the model. Raise n to certify them.")

    verdict, helps = _verdict(method, b, a, eps, notes, warnings)
    return Evaluation(before=b, after=a, notes=notes, verdict=verdict, helps=helps,
                      warnings=warnings, time_s=time.perf_counter() - t0)


def _pts(v: float) -> str:
    return f"{100 * v:.1f}%"


def _verdict(method: str, b: Curve, a: Curve, eps: list[float], notes: list[str],
             warnings: list[str]) -> tuple[str, bool | None]:
    pos = [e for e in eps if e > 0]
    parts: list[str] = []
    helps: bool | None
    if not pos:
        helps = None
        parts.append("No positive epsilon was evaluated, so robustness was not measured.")
    else:
        gains = {e: a.robust_accuracy[eps_key(e)] - b.robust_accuracy[eps_key(e)] for e in pos}
        best = max(pos, key=lambda e: gains[e])
        helps = gains[best] > MARGIN
        if helps:
            parts.append(
                f"Under the strongest attacks run, robust accuracy rose from "
                f"{_pts(b.robust_accuracy[eps_key(best)])} to "
                f"{_pts(a.robust_accuracy[eps_key(best)])} at epsilon {best:g} ({a.norm}).")
        else:
            parts.append(
                f"The defense does NOT raise robust accuracy against the adaptive attacks: "
                f"at every epsilon the hardened model is within {100 * MARGIN:.0f} points "
                "of the undefended one or below it (at epsilon "
                f"{pos[-1]:g}: {_pts(b.robust_accuracy[eps_key(pos[-1])])} before, "
                f"{_pts(a.robust_accuracy[eps_key(pos[-1])])} after).")
    drop = b.clean_accuracy - a.clean_accuracy
    parts.append(f"Clean accuracy {_pts(b.clean_accuracy)} -> {_pts(a.clean_accuracy)}"
                 + (f" (a cost of {100 * drop:.1f} points)." if drop > MARGIN else "."))

    first = a.attacks[0] if a.attacks else None
    if method in ("distill", "squeeze") and first and pos:
        stage = _stage(a, first) or {}
        e = pos[-1]
        naive = stage.get(eps_key(e))
        worst = a.robust_accuracy[eps_key(e)]
        if naive is not None and naive - worst > MARGIN:
            what = ("plain PGD through the softmax" if method == "distill"
                    else "PGD transferred from the undefended model")
            msg = (f"{what} alone leaves {_pts(naive)} robust accuracy at epsilon {e:g}, but "
                   f"the adaptive attacks leave {_pts(worst)}: quoting the first number would "
                   "overstate the defense" +
                   (" (gradient masking)." if method == "distill" else "."))
            parts.append(msg[0].upper() + msg[1:])
            warnings.append(msg[0].upper() + msg[1:])
    if method == "distill" and a.l2_robust_accuracy and b.l2_robust_accuracy:
        l2 = [k for k in a.l2_robust_accuracy if float(k) > 0]
        gain = max((a.l2_robust_accuracy[k] - b.l2_robust_accuracy.get(k, 0.0)) for k in l2) \
            if l2 else 0.0
        if gain <= MARGIN:
            k = l2[-1] if l2 else "0.0"
            parts.append(
                "Carlini-Wagner L2 on the logits breaks the distilled network as well as the "
                f"undefended one (at L2 {float(k):g}: "
                f"{_pts(b.l2_robust_accuracy.get(k, float('nan')))} before, "
                f"{_pts(a.l2_robust_accuracy[k])} after): distillation does not help "
                "against C&W, the known result of Carlini & Wagner (2017).")
            helps = False if helps is None else helps and gain > MARGIN
            warnings.append("Distillation does not help against Carlini-Wagner.")
    if method == "smooth" and a.certified_accuracy:
        cert = ", ".join(f"{_pts(v)} at r={float(r):g}" for r, v in a.certified_accuracy.items())
        parts.append(f"Certified (L2, probability >= 1 - alpha) accuracy: {cert}; "
                     f"abstained on {_pts(a.abstain_rate or 0.0)} of points.")
        if helps is False and any(v > 0 for r, v in a.certified_accuracy.items()
                                  if float(r) > 0):
            parts.append("The empirical attack gain is small, but the certificates hold "
                         "regardless of the attack.")
    if method == "squeeze" and helps is False:
        parts.append("Feature squeezing is not a defense against an attacker who knows it "
                     "is there; it is more useful as a detector (squeeze_disagreement).")
    return " ".join(parts), helps
