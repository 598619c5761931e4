"""Projected Gradient Descent (Madry et al. 2018, arXiv:1706.06083).

From a random point in the ``eps``-ball, repeat

    x <- Proj_{B(x0, eps) ∩ bounds}( x + alpha * sign(grad_x L(x, y)) )      (L-inf)
    x <- Proj_{B(x0, eps) ∩ bounds}( x + alpha * grad / ||grad||_2 )           (L2)

:func:`pgd_tensor` is the bare loop for training (all points, all steps, last iterate);
:class:`PGD` is the evaluation attack: it keeps, per point, the first iterate that fools
the model, stops attacking a point once it is fooled, and retries the others from new
random starts.
"""

from __future__ import annotations

import torch

from bastion.attacks._torch import (
    bounds_of,
    clip_to_bounds,
    is_success,
    loss_and_grad,
    project_and_clip,
    random_in_ball,
    require_white_box,
    step_direction,
)
from bastion.attacks.base import EpsilonContext, FixedEpsilonAttack, check_norm
from bastion.errors import BastionError

LOSSES = ("ce", "dlr")
Tensor = torch.Tensor


def pgd_tensor(
    model: object,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    loss: str = "ce",
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """PGD on tensors, for training loops: returns the last iterate, detached.

    Args:
        model: a white-box model (``logits``, ``bounds``) or a bare ``nn.Module`` (bounds
            then default to ``(0, 1)``). Its train/eval mode is left as it is, and no
            parameter gradients are accumulated.
        x: clean inputs in input space, on the model's device.
        y: true labels ``(n,)``.
        eps: the budget in ``norm``.
        norm: ``"linf"`` or ``"l2"``.
        steps: number of gradient steps.
        step_size: absolute step size; ``None`` means ``2.5 * eps / steps``.
        random_start: start from a uniform point of the ball (else from ``x``).
        generator: the random source for the start (CPU ``torch.Generator``); ``None``
            draws from torch's global RNG.
        loss: ``"ce"`` or ``"dlr"``.
        target: optional target classes; the loss then pulls towards them.
    """
    logits_fn = require_white_box(model, "pgd")
    norm = check_norm(norm)
    bounds = bounds_of(model)
    x, y = x.detach(), y.detach().long()
    target = None if target is None else target.detach().long()
    alpha = 2.5 * eps / max(steps, 1) if step_size is None else float(step_size)
    x_adv = x.clone()
    if random_start and eps > 0:
        x_adv = clip_to_bounds(x + random_in_ball(x, eps, norm, generator), bounds)
    for _ in range(steps):
        _, grad, _ = loss_and_grad(logits_fn, x_adv, y, target, loss)
        x_adv = project_and_clip(x_adv + alpha * step_direction(grad, norm), x, eps, norm, bounds)
    return x_adv.detach()


class PGD(FixedEpsilonAttack):
    """Projected gradient descent with random restarts.

    Args:
        norm: ``"linf"`` or ``"l2"``.
        steps: gradient steps per restart.
        step_size: absolute step size; overrides ``rel_stepsize``.
        rel_stepsize: step size as a fraction of ``eps`` (e.g. ``0.01 / 0.3``); when both
            are ``None`` the step is ``2.5 * eps / steps``.
        restarts: random restarts; each one attacks only the points not yet fooled.
        random_start: start each restart from a uniform point of the ball.
        loss: ``"ce"`` (cross-entropy) or ``"dlr"`` (Difference of Logits Ratio).
        seed: seed of the random starts (a private ``torch.Generator``).

    ``run(model, x, y, *, epsilons, target=None)``:
        model: a white-box model (``logits``); a black-box one raises ``BastionError``.
        x: inputs ``(n, *input_shape)`` in input space, within ``model.bounds``.
        y: true labels ``(n,)``.
        epsilons: budgets in ``norm``; one call covers them all, attacking at each only
            the points not fooled at a smaller one.
        target: optional target classes ``(n,)``; success then means predicting them.

    Per point the first iterate that fools the model is kept (the last iterate of the last
    restart otherwise). Queries: one per gradient and per forward pass for each point.
    """

    name = "pgd"

    def __init__(
        self,
        *,
        norm: str = "linf",
        steps: int = 40,
        step_size: float | None = None,
        rel_stepsize: float | None = None,
        restarts: int = 1,
        random_start: bool = True,
        loss: str = "ce",
        seed: int = 0,
    ) -> None:
        if steps < 1 or restarts < 1:
            raise BastionError(f"steps and restarts must be >= 1, got {steps}, {restarts}")
        if loss not in LOSSES:
            raise BastionError(f"unknown loss {loss!r}", hint="use ce or dlr")
        self.norm = check_norm(norm)
        self.steps = int(steps)
        self.step_size = step_size
        self.rel_stepsize = rel_stepsize
        self.restarts = int(restarts)
        self.random_start = bool(random_start)
        self.loss = loss
        self.seed = int(seed)

    def _alpha(self, eps: float) -> float:
        if self.step_size is not None:
            return float(self.step_size)
        if self.rel_stepsize is not None:
            return float(self.rel_stepsize) * eps
        return 2.5 * eps / self.steps

    def attack_epsilon(self, ctx: EpsilonContext, x: Tensor, y: Tensor, target: Tensor | None,
                       eps: float) -> tuple[Tensor, Tensor]:
        logits_fn, bounds, gen, counter = ctx.logits, ctx.bounds, ctx.gen, ctx.counter

        def one_restart(x0: Tensor, y0: Tensor, t0: Tensor | None, idx: Tensor, r: int
                        ) -> tuple[Tensor, Tensor]:
            alpha = self._alpha(eps)
            x_adv = x0.clone()
            if self.random_start:  # per-point draws: a point's start ignores its batch
                src = gen if ctx.prng is None else ctx.prng.take(idx).fold(r)
                x_adv = clip_to_bounds(x0 + random_in_ball(x0, eps, self.norm, src), bounds)
            out, ok = x_adv.clone(), torch.zeros(len(x0), dtype=torch.bool)
            active = torch.arange(len(x0))
            for _ in range(self.steps):
                _, grad, logits = loss_and_grad(logits_fn, x_adv, y0, t0, self.loss)
                counter.add(idx[active])
                hit = is_success(logits, y0, t0)
                if bool(hit.any()):  # keep the fooling iterate, stop attacking that point
                    out[active[hit]], ok[active[hit]] = x_adv[hit], True
                    keep = ~hit
                    active, x_adv, grad, x0, y0 = (v[keep] for v in (active, x_adv, grad, x0, y0))
                    t0 = None if t0 is None else t0[keep]
                    if len(active) == 0:
                        return out, ok
                x_adv = project_and_clip(x_adv + alpha * step_direction(grad, self.norm), x0,
                                         eps, self.norm, bounds)
            with torch.no_grad():
                hit = is_success(logits_fn(x_adv), y0, t0)
            counter.add(idx[active])
            out[active], ok[active] = x_adv, hit
            return out, ok

        best, found = x.clone(), torch.zeros(len(x), dtype=torch.bool)
        for r in range(self.restarts):
            todo = torch.nonzero(~found).flatten()
            if len(todo) == 0:
                break
            adv, ok = one_restart(x[todo], y[todo], None if target is None else target[todo],
                                  ctx.idx[todo], r)
            best[todo], found[todo] = adv, ok
        return best, found
