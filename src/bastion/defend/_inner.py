"""Inner maximisation steps used *inside* training loops.

PGD-AT uses the shared :func:`bastion.attacks.evasion.pgd.pgd_tensor`. TRADES maximises a
KL divergence to the clean prediction instead of the cross-entropy, and fast AT's single
step differs in one detail that matters (the random start is not clipped to the input
box before the gradient), so those two inner steps live here, written against a plain
function ``f(x) -> logits`` in input space. The evaluation of every hardened model
always goes through the shared attacks and the scan.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Logits = Callable[[torch.Tensor], torch.Tensor]


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project ``delta`` onto the ``norm`` ball of radius ``eps``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = _flat_norm(delta)
    return delta * torch.clamp(eps / n, max=1.0)


def ascend(delta: torch.Tensor, grad: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    """One steepest-ascent step of size ``alpha`` in ``norm``."""
    if norm == "linf":
        return delta + alpha * grad.sign()
    return delta + alpha * grad / _flat_norm(grad)


def random_start(
    x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None
) -> torch.Tensor:
    """A uniform random point of the ``norm`` ball (uniform per coordinate for linf)."""
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator)
        return (2 * u - 1) * eps
    d = torch.randn(x.shape, generator=generator)
    d = d / _flat_norm(d)
    r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator)
    return d * eps * r ** (1.0 / max(1, x[0].numel()))


def clip_box(x: torch.Tensor, delta: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Shrink ``delta`` so that ``x + delta`` stays within ``[lo, hi]``."""
    return torch.clamp(x + delta, lo, hi) - x


def trades_adv(
    f: Logits,
    x: torch.Tensor,
    *,
    eps: float,
    norm: str,
    steps: int,
    alpha: float,
    bounds: tuple[float, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TRADES' inner maximisation (Zhang et al. 2019): maximise
    ``KL(f(x) || f(x'))`` from a small Gaussian start (0.001 as in the reference code)."""
    lo, hi = bounds
    x = x.detach()
    if eps <= 0 or steps <= 0:
        return x.clone()
    with torch.no_grad():
        p_nat = F.softmax(f(x), dim=1)
    delta = 0.001 * torch.randn(x.shape, generator=generator)
    delta = clip_box(x, delta, lo, hi)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.kl_div(F.log_softmax(f(x + delta), dim=1), p_nat, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [delta])
        delta = ascend(delta.detach(), grad, alpha, norm)
        delta = clip_box(x, project(delta, eps, norm), lo, hi)
    return (x + delta).detach()


def fgsm_rs(
    f: Logits,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str,
    alpha: float,
    bounds: tuple[float, float],
    rand_init: bool = True,
    generator: torch.Generator | None = None,
    noise: float | None = None,
    project_ball: bool = True,
) -> torch.Tensor:
    """Fast AT's inner step exactly as in Wong, Rice & Kolter (2020): a uniform start in
    the eps-ball that is *not* clipped to the input box before the gradient (on MNIST,
    where most pixels sit at 0 or 1, clipping would halve the noise on those pixels), one
    signed step of size ``alpha``, projection onto the ball, then onto the box.

    ``noise`` (default ``eps``) is the radius of the random start and ``project_ball=False``
    skips the projection onto the eps-ball: with ``noise=2 * eps``, ``alpha=eps`` that is
    N-FGSM (de Jorge et al. 2022), whose training points may lie up to ``3 * eps`` away
    from ``x`` (still clipped to the input box)."""
    lo, hi = bounds
    x = x.detach()
    r = eps if noise is None else float(noise)
    delta = random_start(x, r, norm, generator) if rand_init and r > 0 else torch.zeros_like(x)
    delta.requires_grad_(True)
    loss = F.cross_entropy(f(x + delta), y)
    (grad,) = torch.autograd.grad(loss, [delta])
    delta = ascend(delta.detach(), grad, alpha, norm)
    if project_ball:
        delta = project(delta, eps, norm)
    return (x + clip_box(x, delta, lo, hi)).detach()
