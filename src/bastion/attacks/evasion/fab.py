"""FAB, the Fast Adaptive Boundary attack (Croce & Hein 2020, "Minimally distorted
adversarial examples with a fast adaptive boundary attack", ICML, arXiv:1907.02044), in
AutoAttack's targeted form (FAB-T) and untargeted, for L-inf and L2.

FAB walks towards the decision boundary using the linearisation of the classifier: with
``f(x) = z_t(x) - z_y(x)`` (the margin towards class ``t``) and its gradient ``g``, the
boundary near the iterate ``x_k`` is the hyperplane ``{z : f(x_k) + g . (z - x_k) = 0}``.
Each iteration

1. projects both the iterate and the clean point ``x_0`` onto that hyperplane (the
   smallest ``norm`` step that reaches it *inside the input box*): steps ``d_k`` and ``d_0``;
2. moves to a convex combination biased towards the clean point,
   ``x_{k+1} = (1 - a)(x_k + eta d_k) + a (x_0 + eta d_0)`` with
   ``a = min(|d_k| / (|d_k| + |d_0|), alpha_max)`` and overshoot ``eta``;
3. when ``x_{k+1}`` is misclassified, remembers it if it is the closest so far, and pulls
   it back towards ``x_0`` by ``beta`` (so the search keeps shrinking the perturbation).

FAB-T takes ``t`` to be each of the ``n_target_classes`` classes ranked highest after the
true one at the clean point, in turn, on the points not yet broken. Untargeted FAB picks,
each iteration, the class whose linearised boundary is closest (it needs the gradient of
every logit: ``n_classes`` backward passes per iteration).

The box-constrained projection onto a hyperplane is solved exactly from its optimality
conditions: the minimiser moves every coordinate towards the plane by ``min(lam, room_i)``
(L-inf) or ``min(mu |w_i|, room_i)`` (L2), ``room_i`` being the distance to the box; the
hyperplane value is piecewise linear in the one scalar, so one sort and a cumulative sum
find it. When the hyperplane cannot be reached inside the box, the step goes as far as
the box allows (as in the reference).
"""

from __future__ import annotations

import torch

from bastion.attacks._torch import flat_norm, per_point
from bastion.attacks.base import EpsilonContext, FixedEpsilonAttack, check_norm
from bastion.errors import BastionError

Tensor = torch.Tensor

def _solve_piecewise(rate: Tensor, brk: Tensor, need: Tensor) -> Tensor:
    """Per row, the smallest ``t >= 0`` with ``sum_i rate_i * min(t, brk_i) = need`` (the
    largest breakpoint where even that falls short). The left side is piecewise linear,
    increasing and concave in ``t``: sort the breakpoints, evaluate it at each by a
    cumulative sum, and solve the one linear piece that crosses ``need``."""
    bs, order = brk.sort(dim=1)
    rs = rate.gather(1, order)
    done = torch.cumsum(rs * bs, dim=1)  # saturated coordinates' share at each breakpoint
    left = rs.sum(dim=1, keepdim=True) - torch.cumsum(rs, dim=1)  # still-linear rate
    at = done + bs * left  # the value at each breakpoint
    k = torch.searchsorted(at.contiguous(), need[:, None].contiguous()).squeeze(1)
    k = k.clamp(max=brk.shape[1] - 1)
    prev_done = torch.where(k > 0, done.gather(1, (k - 1).clamp_min(0)[:, None]).squeeze(1),
                            torch.zeros_like(need))
    prev_rate = torch.where(k > 0, left.gather(1, (k - 1).clamp_min(0)[:, None]).squeeze(1),
                            rs.sum(dim=1))
    t = (need - prev_done) / prev_rate.clamp_min(1e-30)
    reachable = at[:, -1] >= need
    return torch.where(reachable, torch.minimum(t, bs[:, -1]), bs[:, -1])


def project_hyperplane_box(
    t: Tensor, w: Tensor, b: Tensor, norm: str, bounds: tuple[float, float]
) -> Tensor:
    """The smallest ``norm`` step ``d`` (rows of a flat batch) with ``w . (t + d) = b`` and
    ``t + d`` inside ``bounds``; where the hyperplane is out of reach, the step that gets
    closest (every useful coordinate at its limit).

    The minimiser moves each coordinate towards the plane, ``sign(c w_i)``, by
    ``min(lam, room_i)`` (L-inf) or ``min(mu |w_i|, room_i)`` (L2), ``room_i`` being the
    distance to the box in that direction; the scalar comes from :func:`_solve_piecewise`.
    """
    lo, hi = bounds
    c = b - (w * t).sum(dim=1)  # the change of w . d that is needed
    direction = torch.sign(w) * torch.sign(c)[:, None]
    room = torch.where(direction > 0, hi - t, t - lo).clamp_min(0.0)
    aw = w.abs()
    if norm == "linf":
        lam = _solve_piecewise(aw, room, c.abs())
        step = torch.minimum(lam[:, None].expand_as(room), room)
    else:
        brk = torch.where(aw > 0, room / aw.clamp_min(1e-30), torch.full_like(room, 1e30))
        mu = _solve_piecewise(aw * aw, brk, c.abs())
        step = torch.minimum(mu[:, None] * aw, room)
    return direction * step


def _margin_and_grad(logits_fn: object, x: Tensor, y: Tensor, t: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """``(z_t - z_y, its input gradient, logits)`` at ``x``."""
    xr = x.detach().requires_grad_(True)
    rows = torch.arange(len(x))
    with torch.enable_grad():
        z = logits_fn(xr)  # type: ignore[operator]
        f = z[rows, t] - z[rows, y]
        (g,) = torch.autograd.grad(f.sum(), xr)
    return f.detach(), g.detach(), z.detach()


def _closest_boundary(logits_fn: object, x: Tensor, y: Tensor, norm: str
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Untargeted FAB: the margin and gradient towards the class whose linearised
    boundary is closest, and the logits."""
    xr = x.detach().requires_grad_(True)
    rows = torch.arange(len(x))
    with torch.enable_grad():
        z = logits_fn(xr)  # type: ignore[operator]
        grads = []
        for k in range(z.shape[1]):
            (gk,) = torch.autograd.grad(z[:, k].sum(), xr, retain_graph=k < z.shape[1] - 1)
            grads.append(gk.detach())
    jac = torch.stack(grads, dim=1)  # (n, k, *shape)
    zd = z.detach()
    df = zd - zd[rows, y][:, None]
    dg = jac - jac[rows, y][:, None]
    dual = dg.reshape(len(x), zd.shape[1], -1)
    dual_norm = dual.abs().sum(dim=2) if norm == "linf" else dual.norm(dim=2)
    dist = df.abs() / (dual_norm + 1e-12)
    dist[rows, y] = float("inf")
    k = dist.argmin(dim=1)
    return df[rows, k], dg[rows, k], zd


def fab_run(
    logits_fn: object,
    x0: Tensor,
    y: Tensor,
    target: Tensor | None,
    *,
    eps: float,
    norm: str,
    steps: int,
    alpha_max: float,
    eta: float,
    beta: float,
    bounds: tuple[float, float],
    start: Tensor | None,
    idx: Tensor,
    counter: object,
    success_target: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One FAB run: ``(x_adv, success)``, success meaning misclassified within ``eps``.

    ``target`` is the class each point is pushed towards (``None``: untargeted, the
    closest boundary each step). A point leaves the run as soon as it is broken within
    ``eps``; the others run ``steps`` iterations, two queries each (the gradient, and the
    forward pass that checks the new iterate).
    """
    n = len(x0)
    shape = x0.shape
    flat0 = x0.reshape(n, -1)
    out, ok = x0.clone(), torch.zeros(n, dtype=torch.bool)
    best = torch.full((n,), float("inf"))
    x1 = x0.clone() if start is None else start.clone()
    active = torch.arange(n)
    n_cls = 1
    for _ in range(steps):
        if len(active) == 0:
            break
        xa, ya = x1[active], y[active]
        if target is not None:
            f, g, _ = _margin_and_grad(logits_fn, xa, ya, target[active])
        else:
            f, g, z = _closest_boundary(logits_fn, xa, ya, norm)
            n_cls = z.shape[1]
        counter.add(idx[active], n_cls)  # type: ignore[attr-defined]
        m = len(active)
        w = g.reshape(m, -1)
        b = (w * xa.reshape(m, -1)).sum(dim=1) - f  # the linearised boundary w . z = b
        pts = torch.cat([xa.reshape(m, -1), flat0[active]])
        d = project_hyperplane_box(pts, torch.cat([w, w]), torch.cat([b, b]), norm, bounds)
        d1, d2 = d[:m], d[m:]
        a1 = flat_norm(d1, norm).clamp_min(1e-8)
        a2 = flat_norm(d2, norm).clamp_min(1e-8)
        alpha = (a1 / (a1 + a2)).clamp(0.0, alpha_max)[:, None]
        new = ((xa.reshape(m, -1) + eta * d1) * (1 - alpha)
               + (flat0[active] + eta * d2) * alpha).clamp(bounds[0], bounds[1])
        new = new.reshape(m, *shape[1:])
        with torch.no_grad():
            pred = logits_fn(new).argmax(dim=1)  # type: ignore[operator]
        counter.add(idx[active])  # type: ignore[attr-defined]
        adv = pred != ya if success_target is None else pred == success_target[active]
        dist = flat_norm(new - x0[active], norm)
        closer = adv & (dist < best[active])
        sel = active[closer]
        out[sel], best[sel] = new[closer], dist[closer]
        # a misclassified iterate is pulled back towards the clean point
        back = x0[active] + beta * (new - x0[active])
        new = torch.where(per_point(adv, new), back, new)  # type: ignore[arg-type]
        x1[active] = new
        done = best[active] <= eps * (1 + 1e-6)
        ok[active[done]] = True
        active = active[~done]
    ok = best <= eps * (1 + 1e-6)
    out = torch.where(per_point(ok, out), out, x0)  # type: ignore[arg-type]
    return out, ok


class FAB(FixedEpsilonAttack):
    """FAB (L-inf or L2), targeted as in AutoAttack's FAB-T or untargeted.

    Args:
        norm: ``"linf"`` or ``"l2"``.
        targeted: FAB-T (the margin towards one target class at a time: one gradient per
            iteration) or untargeted FAB (the closest of all boundaries: ``n_classes``
            gradients per iteration).
        n_target_classes: FAB-T's target classes, the highest-ranked after the true one
            at the clean point (AutoAttack: 9).
        steps: iterations per run (AutoAttack: 100).
        restarts: runs per target class; the first starts at the clean point, the others
            at a random point at half the budget (as in the reference).
        alpha_max, eta, beta: the bias towards the clean point, the overshoot and the
            pull-back after a success (AutoAttack: 0.1, 1.05, 0.9).
        seed: seed of the random restarts.

    ``run(model, x, y, *, epsilons, target=None)``: a white-box model; ``target`` fixes
    the classes FAB-T aims at (success still means any misclassification). Queries: two
    per iteration and point attacked (gradient and check), ``n_classes + 1`` untargeted.
    """

    def __init__(
        self,
        *,
        norm: str = "linf",
        targeted: bool = True,
        n_target_classes: int = 9,
        steps: int = 100,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        seed: int = 0,
    ) -> None:
        if steps < 1 or restarts < 1 or n_target_classes < 1:
            raise BastionError("steps, restarts and n_target_classes must be >= 1")
        if not 0.0 <= alpha_max <= 1.0 or eta < 1.0 or not 0.0 < beta <= 1.0:
            raise BastionError(
                f"need 0 <= alpha_max <= 1, eta >= 1, 0 < beta <= 1; got {alpha_max}, "
                f"{eta}, {beta}", hint="AutoAttack uses alpha_max=0.1, eta=1.05, beta=0.9")
        self.norm = check_norm(norm)
        self.targeted = bool(targeted)
        self.n_target_classes = int(n_target_classes)
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.alpha_max = float(alpha_max)
        self.eta = float(eta)
        self.beta = float(beta)
        self.seed = int(seed)
        self.name = "fab-t" if self.targeted else "fab"

    def _start(self, x: Tensor, eps: float, restart: int, ctx: EpsilonContext,
               bounds: tuple[float, float], idx: Tensor | None = None,
               target_rank: int = 0) -> Tensor | None:
        if restart == 0:
            return None
        gen = ctx.gen  # a random point at half the budget, as in the reference
        if ctx.prng is not None and idx is not None:  # per point: ignores the batch
            pr = ctx.prng.take(idx).fold(target_rank, restart)
            t = (2 * pr.torch_uniform(x.shape[1:]) - 1 if self.norm == "linf"
                 else pr.torch_normal(x.shape[1:]))
        elif self.norm == "linf":
            t = 2 * torch.rand(x.shape, generator=gen) - 1  # type: ignore[arg-type]
        else:
            t = torch.randn(x.shape, generator=gen)  # type: ignore[arg-type]
        t = t / per_point(flat_norm(t, self.norm).clamp_min(1e-12), t)
        return (x + 0.5 * eps * t).clamp(bounds[0], bounds[1])

    def attack_epsilon(self, ctx: EpsilonContext, x: Tensor, y: Tensor, target: Tensor | None,
                       eps: float) -> tuple[Tensor, Tensor]:
        if self.targeted:
            if target is None:
                order = ctx.clean_logits.argsort(dim=1)  # type: ignore[attr-defined]
                n_t = min(self.n_target_classes, order.shape[1] - 1)
                targets: list[Tensor | None] = [order[:, -r] for r in range(2, n_t + 2)]
            else:
                targets = [target]
        else:
            targets = [None]
        best, found = x.clone(), torch.zeros(len(x), dtype=torch.bool)
        for ti, tc in enumerate(targets):
            for r in range(self.restarts):
                todo = torch.nonzero(~found).flatten()
                if len(todo) == 0:
                    return best, found
                adv, ok = fab_run(
                    ctx.logits, x[todo], y[todo], None if tc is None else tc[todo],
                    eps=eps, norm=self.norm, steps=self.steps, alpha_max=self.alpha_max,
                    eta=self.eta, beta=self.beta, bounds=ctx.bounds,
                    start=self._start(x[todo], eps, r, ctx, ctx.bounds, ctx.idx[todo], ti),
                    idx=ctx.idx[todo], counter=ctx.counter,  # type: ignore[arg-type]
                    success_target=None if target is None else target[todo])
                best[todo], found[todo] = adv, ok
        return best, found
