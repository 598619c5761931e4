"""Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy 2015, arXiv:1412.6572).

One step of size ``eps`` along the steepest-ascent direction of the loss at the clean
point: ``x_adv = clip(x + eps * sign(grad_x L(x, y)))`` (L-inf), or along the
normalised gradient (L2, the "fast gradient method").
"""

from __future__ import annotations

import torch

from bastion.attacks._torch import (
    is_success,
    loss_and_grad,
    project_and_clip,
    step_direction,
)
from bastion.attacks.base import EpsilonContext, FixedEpsilonAttack, check_norm

Tensor = torch.Tensor


class FGSM(FixedEpsilonAttack):
    """Fast gradient (sign) method: a single gradient step of size ``eps``.

    Args:
        norm: ``"linf"`` (sign of the gradient) or ``"l2"`` (gradient over its L2 norm).
        seed: accepted for a uniform interface; FGSM is deterministic.

    ``run(model, x, y, *, epsilons, target=None)``:
        model: a white-box model (``logits``); a black-box one raises ``BastionError``.
        x: inputs ``(n, *input_shape)`` in input space, within ``model.bounds``.
        y: true labels ``(n,)``.
        epsilons: budgets in ``norm``; one call covers them all.
        target: optional target classes ``(n,)``; the step then lowers the target's
            cross-entropy and success means predicting the target.

    Queries: one gradient and one forward pass per point and epsilon attacked (plus one
    gradient at the clean point for diagnostics, ``extra["grad_norm_mean"]``).
    """

    name = "fgsm"

    def __init__(self, *, norm: str = "linf", seed: int = 0) -> None:
        self.norm = check_norm(norm)
        self.seed = int(seed)

    def attack_epsilon(self, ctx: EpsilonContext, x: Tensor, y: Tensor, target: Tensor | None,
                       eps: float) -> tuple[Tensor, Tensor]:
        logits_fn = ctx.logits
        _, grad, _ = loss_and_grad(logits_fn, x, y, target, "ce")
        x_adv = project_and_clip(x + eps * step_direction(grad, self.norm), x, eps, self.norm,
                                 ctx.bounds)
        with torch.no_grad():
            ok = is_success(logits_fn(x_adv), y, target)
        ctx.counter.add(ctx.idx, 2)
        return x_adv, ok
