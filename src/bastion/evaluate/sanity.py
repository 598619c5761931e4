"""Sanity checks that say when a robustness number should not be trusted.

A robust-accuracy figure is only as good as the attacks behind it. The usual ways an
evaluation fools itself (Carlini et al. 2019, "On Evaluating Adversarial Robustness";
Croce & Hein 2020) leave fingerprints that are cheap to look for:

- robust accuracy that *rises* with epsilon (an attack that fails on bigger budgets);
- a black-box attack breaking points the white-box attacks left standing (the gradients
  are masked or obfuscated, so gradient attacks are blind);
- robust accuracy above chance at an epsilon so large that any input can be reached;
- zero or vanishing input gradients;
- clean accuracy near chance (the model, or the data, is wrong before any attack);
- a randomised model (two identical queries, two answers), which fools fixed-input attacks.

Each check returns human-readable warnings that say why the number may be wrong and
what to try; :func:`bastion.evaluate.scan` collects them into ``ScanReport.warnings``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bastion.attacks.base import Attack, FixedEpsilonAttack, MinimalAttack
from bastion.errors import BastionError
from bastion.models.base import is_white_box

#: robust/clean accuracy within this much of chance (1/n_classes) counts as "at chance"
CHANCE_MARGIN = 0.1
#: the masking warning fires when the lower end of the 95% (Wilson) interval of the share
#: of gradient-stage survivors that a gradient-free stage then broke exceeds this rate.
#: Where gradients work, Square-5000 still breaks a few of the survivors (0.9-2.6% on
#: Bastion's PGD-AT and TRADES models and on the public PGD-AT model of issue 16); on
#: gradient-masking fast-AT models it broke 6.4% (public, 53 of ~830) and 18.8% (Wong
#: et al.'s recipe trained by Bastion, 38 of 202). A bare share would be
#: noise on a few hundred points; the interval asks for enough points to be sure.
BLACK_BOX_RATE = 0.03
#: a gradient with norm below this is treated as zero
ZERO_GRAD = 1e-10
#: warn when more than this share of points have (near-)zero input gradients
ZERO_GRAD_SHARE = 0.1
#: largest probability change between two identical queries of a deterministic model
RANDOM_TOL = 1e-4
#: points used by the gradient and large-epsilon checks
SANITY_POINTS = 64


def full_range_epsilon(norm: str, bounds: tuple[float, float], input_shape: Sequence[int]) -> float:
    """The budget that reaches every valid input: ``hi - lo`` in linf, ``sqrt(d)*(hi - lo)``
    in l2."""
    width = float(bounds[1]) - float(bounds[0])
    if norm == "linf":
        return width
    return math.sqrt(float(np.prod(input_shape))) * width


def check_clean_accuracy(clean_accuracy: float, n_classes: int) -> list[str]:
    chance = 1.0 / n_classes
    if clean_accuracy <= chance + CHANCE_MARGIN:
        return [
            f"Clean accuracy is {clean_accuracy:.1%}, close to chance ({chance:.1%} for "
            f"{n_classes} classes): the robust accuracy below says little. Check that the "
            "labels match the data, that the inputs are scaled the way the model was trained "
            "(model bounds and normalisation), and that the right model was loaded."
        ]
    return []


def check_randomized(model: Any, x: np.ndarray) -> tuple[dict[str, Any], list[str]]:
    """Query the same inputs twice; different answers mean a randomised model."""
    info: dict[str, Any] = {"output_change_on_repeat": None}
    if not len(x):
        return info, []
    p1 = np.asarray(model.predict_proba(x), dtype=np.float64)
    p2 = np.asarray(model.predict_proba(x), dtype=np.float64)
    diff = float(np.abs(p1 - p2).max())
    flips = int((p1.argmax(1) != p2.argmax(1)).sum())
    info["output_change_on_repeat"] = diff
    if diff > RANDOM_TOL:
        return info, [
            f"The model answers the same {len(x)} inputs differently on a second query "
            f"(largest probability change {diff:.3g}, {flips} changed prediction(s)): it is "
            "randomised (dropout left on, random transforms, noise). Attacks that see one "
            "random draw overestimate its robustness: put the model in eval mode if the "
            "randomness is unintended, else evaluate with Expectation over Transformation "
            "(average gradients and predictions over many draws)."
        ]
    return info, []


def check_monotone(per_attack: Sequence[Any]) -> list[str]:
    """Warn when an attack broke a point at a smaller epsilon but not at a larger one."""
    out = []
    for s in per_attack:
        if s.non_monotone_points > 0:
            out.append(
                f"{s.name} broke {s.non_monotone_points} point(s) at a smaller epsilon but "
                "failed on them at a larger one, so its own robust accuracy does not fall "
                "as epsilon grows. The reported worst case carries each break to larger "
                "epsilons, but the attack is unreliable: give it more steps or restarts, "
                "check its step size, and look for gradient masking."
            )
    return out


def check_rejected(per_attack: Sequence[Any]) -> list[str]:
    out = []
    for s in per_attack:
        if s.rejected > 0:
            out.append(
                f"{s.rejected} success(es) claimed by {s.name} did not verify (the model "
                "still predicted the true label, or the input left the budget or the bounds) "
                "and were not counted. The attack or the model is inconsistent: check that "
                "the model is deterministic (eval mode, no dropout) and report the attack."
            )
    return out


def check_black_box_after_white_box(
    per_attack: Sequence[Any],
    n_points: int,
    *,
    evidence: dict[str, Any] | None = None,
    escalations: Sequence[dict[str, Any]] = (),
) -> list[str]:
    """Warn when black-box stages broke points that earlier white-box stages left standing,
    naming the evidence (how many points, which stage) and any escalation rounds."""
    from bastion.evaluate.presets import wilson_interval

    seen_white = False
    by_stage: dict[str, int] = {}
    survivors = 0  # points the first gradient-free stage after a gradient stage attacked
    for s in per_attack:
        if getattr(s, "phase", "main") != "main":
            continue
        if s.white_box:
            seen_white = True
            continue
        if seen_white:
            survivors = survivors or int(getattr(s, "points_attacked", n_points))
            if int(s.points_broken) > 0:
                by_stage[f"{s.stage}. {s.name}"] = int(s.points_broken)
    count = sum(by_stage.values())
    zero = (evidence or {}).get("zero_grad_fraction")
    grads = ", ".join(s.name for s in per_attack
                      if s.white_box and getattr(s, "phase", "main") == "main")
    lower, upper = wilson_interval(count, max(survivors, count, 1))
    if evidence is not None:
        evidence["survivors"] = survivors
        evidence["rate_interval_95"] = [round(lower, 4), round(upper, 4)]
        evidence["warning_rate"] = BLACK_BOX_RATE
    if count >= 2 and lower > BLACK_BOX_RATE:
        what = "; ".join(f"stage {k} broke {v}" for k, v in by_stage.items())
        msg = (f"Gradient masking: black-box stage(s) broke {count} of the {survivors} "
               f"point(s) that the gradient stages ({grads}) left standing ({what}; "
               f"{count / max(survivors, 1):.1%}, 95% interval {lower:.1%}-{upper:.1%}, above "
               f"the {BLACK_BOX_RATE:.0%} that Square still finds where gradients work). A "
               "gradient attack with the same budget should be about as strong, so the "
               "gradients are masked or obfuscated (non-differentiable layers, randomness, "
               "saturated softmax).")
    elif zero is not None and zero > ZERO_GRAD_SHARE:
        msg = (f"Gradient masking: the input gradient is zero on {zero:.0%} of the checked "
               "points, so the gradient stages were blind there.")
    else:
        return []
    if escalations:
        rounds = ", ".join(
            f"round {e['round']} (square restart, {e['max_queries']} queries, on "
            f"{e['points_attacked']} points: the "
            f"{e.get('share_of_survivors', 1.0):.0%} of survivors closest to falling) "
            f"removed {e['removed']}" for e in escalations)
        msg += (f" The scan escalated on the survivors: {rounds}; it stopped when a round "
                "removed nothing or the budget ran out.")
    else:
        msg += " No escalation ran (quick preset, an attack list, or escalate=False)."
    msg += (" Do not trust the white-box numbers alone: try the thorough preset (restarts, "
            "EOT, BPDA through bpda=, a surrogate), or remove the non-differentiable part.")
    return [msg]


def _margin_grad_norms(model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-point norms of the gradient of the logit margin ``z_y - max_{k!=y} z_k``.

    The margin does not saturate like cross-entropy does on confident points, so a zero
    here means the model really has no usable gradient."""
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32)).clone().requires_grad_(True)
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    with torch.enable_grad():
        z = model.logits(xt)
        zy = z.gather(1, yt[:, None]).squeeze(1)
        other = z.clone()
        other[torch.arange(len(yt)), yt] = -torch.inf
        margin = zy - other.max(dim=1).values
        if not margin.requires_grad:
            return np.zeros(len(x))
        (g,) = torch.autograd.grad(margin.sum(), xt, allow_unused=True)
    if g is None:
        return np.zeros(len(x))
    return g.reshape(len(x), -1).norm(dim=1).detach().cpu().numpy().astype(np.float64)


def check_gradients(
    model: Any, x: np.ndarray, y: np.ndarray, per_attack: Sequence[Any] = ()
) -> tuple[dict[str, Any], list[str]]:
    """Look for zero input gradients: directly on a white-box model, and in what the
    attacks reported (``grad_norm_mean``). Returns ``(measurements, warnings)``."""
    info: dict[str, Any] = {"zero_grad_fraction": None, "grad_norm_median": None}
    out = []
    if is_white_box(model) and len(x):
        norms = _margin_grad_norms(model, x, y)
        frac = float((norms <= ZERO_GRAD).mean())
        info["zero_grad_fraction"] = frac
        info["grad_norm_median"] = float(np.median(norms))
        if frac > ZERO_GRAD_SHARE:
            out.append(
                f"The input gradient of the model's logit margin is zero on {frac:.0%} of "
                f"{len(x)} checked points: gradient attacks cannot move these inputs, so "
                "their robust accuracy is an overestimate (gradient masking: rounding, "
                "quantisation, argmax or other non-differentiable steps in the model). "
                "Evaluate with black-box attacks (square, hsj) or with a differentiable "
                "approximation of the masking step (BPDA)."
            )
    zero_attacks = [
        s.name
        for s in per_attack
        if s.white_box and s.grad_norm_mean is not None and s.grad_norm_mean <= ZERO_GRAD
    ]
    # Trust the direct margin check when it ran: the attacks report the cross-entropy
    # gradient, which underflows to zero on confidently classified points without masking.
    if zero_attacks and info["zero_grad_fraction"] is None:
        out.append(
            f"White-box attack(s) {', '.join(zero_attacks)} saw a zero mean input "
            "gradient: they were blind, so their numbers overestimate robustness. Check the "
            "model for non-differentiable steps and evaluate with black-box attacks."
        )
    return info, out


def default_large_eps_attack(model: Any, norm: str, seed: int) -> Attack:
    """A cheap attack for the large-epsilon check: PGD for white-box models, Square for
    black-box ones."""
    from bastion.attacks import get_attack

    if is_white_box(model):
        return get_attack("pgd", norm=norm, seed=seed, steps=10)
    return get_attack("square", norm=norm, seed=seed, max_queries=200)


def check_large_epsilon(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    norm: str,
    seed: int = 0,
    attack: Attack | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Attack at a budget that reaches every valid input; anything clearly above chance
    means the attack is failing. Returns ``(measurements, warnings)``."""
    eps = full_range_epsilon(norm, model.bounds, model.input_shape)
    info: dict[str, Any] = {
        "large_eps": eps,
        "large_eps_robust_accuracy": None,
        "large_eps_attack": None,
    }
    if not len(x):
        return info, []
    try:
        atk = attack if attack is not None else default_large_eps_attack(model, norm, seed)
    except BastionError as exc:
        info["large_eps_note"] = f"skipped: {exc}"
        return info, []
    info["large_eps_attack"] = getattr(atk, "name", type(atk).__name__)
    if isinstance(atk, FixedEpsilonAttack):
        res = atk.run(model, x, y, epsilons=[eps])
    elif isinstance(atk, MinimalAttack):
        res = atk.run(model, x, y)
    else:
        raise BastionError(f"{atk!r} is not a fixed-epsilon or minimal attack")
    x_adv = np.asarray(res.x_adv[0])
    pred = np.asarray(model.predict_proba(x_adv)).argmax(1)
    acc = float((pred == y).mean())
    info["large_eps_robust_accuracy"] = acc
    chance = 1.0 / model.n_classes
    if acc > chance + CHANCE_MARGIN:
        return info, [
            f"At epsilon {eps:.4g} ({norm}), a budget that reaches every valid input, "
            f"{info['large_eps_attack']} still left {acc:.0%} of {len(x)} points correctly "
            f"classified (chance is {chance:.0%}). A working attack must break nearly all "
            "of them, so the attacks are failing on this model and the robust accuracy "
            "is an overestimate: check for gradient masking, raise steps/queries, or "
            "try other attacks."
        ]
    return info, []
