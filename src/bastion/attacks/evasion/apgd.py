"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", arXiv:2003.01690).

PGD without a step size to tune. Per point, starting at ``eta = 2 eps``:

    z        = P(x_k + eta * dir(grad_k))
    x_{k+1}  = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))        (momentum; plain step at k=0)

At checkpoints ``w_j`` (first after ``0.22 N`` iterations, then ever closer, down to
``0.06 N``) the step size is halved, and the iterate reset to the best point so far, when
(1) the loss rose in at most ``rho`` of the steps since the last checkpoint, or (2) the
step was not reduced at the last checkpoint and the best loss did not improve since.
The best-loss point and every fooling iterate are tracked. ``APGD-CE`` and ``APGD-DLR``
maximise cross-entropy or the DLR loss; ``APGD-T`` runs the targeted DLR loss towards each
of the top ``n_target_classes`` other classes in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bastion.attacks._rng import PointRandom
from bastion.attacks._torch import (
    QueryCounter,
    clip_to_bounds,
    flat_norm,
    is_success,
    loss_and_grad,
    per_point,
    project_and_clip,
    step_direction,
)
from bastion.attacks.base import EpsilonContext, FixedEpsilonAttack, check_norm
from bastion.errors import BastionError

Tensor = torch.Tensor


def _start(x: Tensor, eps: float, norm: str, gen: Any) -> Tensor:
    """The reference random start: a point on the boundary of the ``eps``-ball. ``gen``
    is a ``torch.Generator`` or a :class:`~bastion.attacks._rng.PointRandom` of the rows."""
    pr = gen if isinstance(gen, PointRandom) else None
    if norm == "linf":
        u = pr.torch_uniform(x.shape[1:]) if pr is not None else torch.rand(x.shape, generator=gen)
        t = 2 * u - 1
        d = t / per_point(flat_norm(t, "linf") + 1e-12, t)
    else:
        t = pr.torch_normal(x.shape[1:]) if pr is not None else torch.randn(x.shape, generator=gen)
        d = t / per_point(flat_norm(t, "l2") + 1e-12, t)
    return (eps * d).to(x.device, x.dtype)


def _point_gen(ctx: EpsilonContext, todo: Tensor, target_rank: int, restart: int) -> Any:
    """The per-point random source of one run (the run's ``torch.Generator`` for a
    context built without one)."""
    if ctx.prng is None:
        return ctx.gen
    return ctx.prng.take(ctx.idx[todo]).fold(target_rank, restart)


def _oscillation(loss_steps: Tensor, j: int, k: int, rho: float) -> Tensor:
    """Condition (1): the loss increased in at most a ``rho`` share of the last ``k`` steps."""
    t = torch.zeros(loss_steps.shape[1])
    for c in range(k):
        t += (loss_steps[j - c] > loss_steps[j - c - 1]).float()
    return t <= k * rho


def apgd_single_run(
    logits_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str,
    loss: str,
    steps: int,
    rho: float,
    bounds: tuple[float, float],
    gen: Any,
    idx: Tensor,
    counter: QueryCounter,
    loss_target: Tensor | None = None,
    success_target: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One APGD run on a batch: ``(x_adv, success)``; ``x_adv`` is the first fooling
    iterate where one was found, else the highest-loss point. Fooled points leave the batch
    (their step-size schedule is per point, so the others run exactly as they would)."""
    n2, n_min, size_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(
        int(0.03 * steps), 1)
    m = len(x)
    out, ok = x.clone(), torch.zeros(m, dtype=torch.bool)
    active = torch.arange(m)
    x0, lt, st = x, loss_target, success_target

    def evaluate(xa: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        values, grad, logits = loss_and_grad(logits_fn, xa, y[active], lt, loss)
        counter.add(idx[active])
        return values, grad, is_success(logits, y[active], st)

    x_adv = clip_to_bounds(x0 + _start(x0, eps, norm, gen), bounds)
    loss_v, grad, hit = evaluate(x_adv)
    out[active[hit]], ok[active[hit]] = x_adv[hit], True
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss_v.clone()
    eta = torch.full((m,), 2.0 * eps)
    x_old = x_adv.clone()
    loss_steps = torch.zeros(steps, m)
    loss_best_last = loss_best.clone()
    reduced_last = torch.ones(m, dtype=torch.bool)
    k, counter3 = n2, 0

    for i in range(steps):
        if bool(hit.any()):  # drop fooled points from every per-point state
            keep = ~hit
            active, x0, x_adv, x_old, grad, x_best, grad_best = (
                v[keep] for v in (active, x0, x_adv, x_old, grad, x_best, grad_best))
            loss_best, loss_best_last, reduced_last, eta = (
                v[keep] for v in (loss_best, loss_best_last, reduced_last, eta))
            loss_steps = loss_steps[:, keep]
            lt = None if lt is None else lt[keep]
            st = None if st is None else st[keep]
            if len(active) == 0:
                break
        # gradient step with momentum
        a = 0.75 if i > 0 else 1.0
        e = per_point(eta, x_adv)
        z = project_and_clip(x_adv + e * step_direction(grad, norm), x0, eps, norm, bounds)
        x_new = x_adv + (z - x_adv) * a + (x_adv - x_old) * (1 - a)
        x_old = x_adv
        x_adv = project_and_clip(x_new, x0, eps, norm, bounds)

        loss_v, grad, hit = evaluate(x_adv)
        out[active[hit]], ok[active[hit]] = x_adv[hit], True

        # best-loss point
        loss_steps[i] = loss_v
        better = loss_v > loss_best
        bb = per_point(better, x_adv)
        x_best = torch.where(bb, x_adv, x_best)  # type: ignore[arg-type]
        grad_best = torch.where(bb, grad, grad_best)  # type: ignore[arg-type]
        loss_best = torch.where(better, loss_v, loss_best)

        # step-size checkpoint
        counter3 += 1
        if counter3 == k:
            reduce = _oscillation(loss_steps, i, k, rho)
            reduce |= (~reduced_last) & (loss_best_last >= loss_best)
            reduced_last, loss_best_last = reduce.clone(), loss_best.clone()
            eta = torch.where(reduce, eta / 2.0, eta)
            rr = per_point(reduce, x_adv)
            x_adv = torch.where(rr, x_best, x_adv)  # type: ignore[arg-type]
            grad = torch.where(rr, grad_best, grad)  # type: ignore[arg-type]
            counter3 = 0
            k = max(k - size_decr, n_min)

    if len(active):  # not fooled: the highest-loss point
        rest = ~ok[active]
        out[active[rest]] = x_best[rest]
    return out, ok


class APGD(FixedEpsilonAttack):
    """Auto-PGD with the cross-entropy (``APGD-CE``) or DLR (``APGD-DLR``) loss.

    Args:
        norm: ``"linf"`` or ``"l2"``.
        loss: ``"ce"`` or ``"dlr"`` (needs at least 3 classes; 4 when targeted).
        steps: iterations per restart (the reference uses 100).
        restarts: random restarts; each one attacks only the points not yet fooled.
        rho: the oscillation threshold of the step-size rule (0.75).
        seed: seed of the random starts (a private ``torch.Generator``).

    ``run(model, x, y, *, epsilons, target=None)``:
        model: a white-box model (``logits``); a black-box one raises ``BastionError``.
        x: inputs ``(n, *input_shape)`` in input space, within ``model.bounds``.
        y: true labels ``(n,)``.
        epsilons: budgets in ``norm``; one call covers them all.
        target: optional target classes ``(n,)``; the loss becomes targeted (minus the
            target's cross-entropy, or the targeted DLR) and success means predicting them.

    Queries: one per gradient (each iteration) for each point still attacked.
    """

    def __init__(
        self,
        *,
        norm: str = "linf",
        loss: str = "ce",
        steps: int = 100,
        restarts: int = 1,
        rho: float = 0.75,
        seed: int = 0,
    ) -> None:
        if loss not in ("ce", "dlr"):
            raise BastionError(f"unknown loss {loss!r}", hint="use ce or dlr")
        if steps < 1 or restarts < 1:
            raise BastionError(f"steps and restarts must be >= 1, got {steps}, {restarts}")
        self.norm = check_norm(norm)
        self.loss = loss
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.rho = float(rho)
        self.seed = int(seed)
        self.name = f"apgd-{loss}"

    def attack_epsilon(self, ctx: EpsilonContext, x: Tensor, y: Tensor, target: Tensor | None,
                       eps: float) -> tuple[Tensor, Tensor]:
        best, found = x.clone(), torch.zeros(len(x), dtype=torch.bool)
        for r in range(self.restarts):
            todo = torch.nonzero(~found).flatten()
            if len(todo) == 0:
                break
            tt = None if target is None else target[todo]
            adv, ok = apgd_single_run(
                ctx.logits, x[todo], y[todo], eps=eps, norm=self.norm, loss=self.loss,
                steps=self.steps, rho=self.rho, bounds=ctx.bounds,
                gen=_point_gen(ctx, todo, 0, r),
                idx=ctx.idx[todo], counter=ctx.counter, loss_target=tt, success_target=tt)
            best[todo], found[todo] = adv, ok
        return best, found


class APGDT(FixedEpsilonAttack):
    """Targeted Auto-PGD with the targeted DLR loss (``APGD-T``), an untargeted attack.

    For each of the ``n_target_classes`` classes ranked highest after the true one at the
    clean point, in order, runs APGD with the targeted DLR loss towards that class on the
    points not yet misclassified. Success means misclassification (any wrong class).

    Args:
        norm: ``"linf"`` or ``"l2"``.
        steps: iterations per run (the reference uses 100).
        n_target_classes: how many target classes to try (capped at ``n_classes - 1``).
        restarts: random restarts per target class.
        rho: the oscillation threshold of the step-size rule (0.75).
        seed: seed of the random starts (a private ``torch.Generator``).

    ``run(model, x, y, *, epsilons, target=None)``:
        model: a white-box model (``logits``) with at least 4 classes.
        x: inputs ``(n, *input_shape)`` in input space, within ``model.bounds``.
        y: true labels ``(n,)``.
        epsilons: budgets in ``norm``; one call covers them all.
        target: optional target classes ``(n,)``; then only these are tried and success
            means predicting them.

    Queries: one per gradient (the target classes come from the base class's clean pass).
    """

    name = "apgd-t"

    def __init__(
        self,
        *,
        norm: str = "linf",
        steps: int = 100,
        n_target_classes: int = 9,
        restarts: int = 1,
        rho: float = 0.75,
        seed: int = 0,
    ) -> None:
        if steps < 1 or restarts < 1 or n_target_classes < 1:
            raise BastionError("steps, restarts and n_target_classes must be >= 1")
        self.norm = check_norm(norm)
        self.steps = int(steps)
        self.n_target_classes = int(n_target_classes)
        self.restarts = int(restarts)
        self.rho = float(rho)
        self.seed = int(seed)

    def attack_epsilon(self, ctx: EpsilonContext, x: Tensor, y: Tensor, target: Tensor | None,
                       eps: float) -> tuple[Tensor, Tensor]:
        if target is None:  # the targets: the classes ranked highest at the clean point
            order = ctx.clean_logits.argsort(dim=1)
            n_t = min(self.n_target_classes, order.shape[1] - 1)
            targets = [order[:, -r] for r in range(2, n_t + 2)]
        else:
            targets = [target]
        best, found = x.clone(), torch.zeros(len(x), dtype=torch.bool)
        for ti, tc in enumerate(targets):
            for r in range(self.restarts):
                todo = torch.nonzero(~found).flatten()
                if len(todo) == 0:
                    return best, found
                adv, ok = apgd_single_run(
                    ctx.logits, x[todo], y[todo], eps=eps, norm=self.norm, loss="dlr",
                    steps=self.steps, rho=self.rho, bounds=ctx.bounds,
                    gen=_point_gen(ctx, todo, ti + 1, r),
                    idx=ctx.idx[todo], counter=ctx.counter, loss_target=tc[todo],
                    success_target=None if target is None else target[todo])
                best[todo], found[todo] = adv, ok
        return best, found
