"""Tensor helpers shared by the evasion attacks (white-box and black-box).

Everything here works on batched float tensors in *input space*, shape ``(n, *input_shape)``,
and never leaves torch inside a loop. The pieces:

- conversion and checks: :func:`to_tensor`, :func:`prepare_batch`, :func:`require_white_box`;
- geometry: :func:`flat_norm`, :func:`per_point`, :func:`project`, :func:`clip_to_bounds`,
  :func:`random_in_ball`, :func:`step_direction`;
- losses: :func:`attack_loss` (``"ce"``, ``"dlr"``, both targeted or not, always a loss to
  *maximise*), :func:`loss_and_grad`, :func:`is_success`;
- book-keeping: :class:`QueryCounter` (per-point model evaluations) and
  :func:`run_attack_epsilons`, the epsilon loop that
  :meth:`bastion.attacks.base.FixedEpsilonAttack.run` runs around an attack's per-epsilon
  hook and that gathers one :class:`~bastion.attacks.base.AttackResult`.

Norm names are ``"linf"`` and ``"l2"`` (see :func:`bastion.attacks.base.check_norm`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bastion.attacks.base import AttackResult, check_epsilons
from bastion.errors import BastionError, DataError

BOUNDS_TOL = 1e-5


# ---------------------------------------------------------------- conversion and checks


def require_white_box(model: object, attack: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``model``'s differentiable logits function, or raise a clear error.

    Accepts a Bastion white-box model (with ``logits(x)``) or a bare ``nn.Module``.
    """
    fn = getattr(model, "logits", None)
    if callable(fn):
        return fn  # type: ignore[no-any-return]
    if isinstance(model, torch.nn.Module):
        return model
    raise BastionError(
        f"{attack} needs gradients, but {type(model).__name__} exposes no differentiable "
        "logits (it is a black-box model)",
        hint="wrap a torch module in TorchModel, or use a black-box attack: square or hsj",
    )


def to_tensor(x: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x`` (NumPy array, list or tensor) as a detached tensor of ``dtype``."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def prepare_batch(
    model: Any, x: Any, y: Any, target: Any | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check and convert a batch: ``x`` float32 within ``model.bounds``, labels int64.

    Raises:
        DataError: shapes that do not match the model, labels out of range, or inputs
            outside the model's bounds.
    """
    xt = to_tensor(x)
    yt = to_tensor(y, torch.int64).reshape(-1)
    shape = tuple(getattr(model, "input_shape", xt.shape[1:]))
    if xt.ndim < 1 or tuple(xt.shape[1:]) != shape:
        raise DataError(
            f"inputs of shape {tuple(xt.shape)} do not match the model's input shape {shape}",
            hint=f"pass a batch of shape (n, {', '.join(map(str, shape))})",
        )
    if len(yt) != len(xt):
        raise DataError(f"{len(xt)} inputs but {len(yt)} labels")
    n_classes = int(getattr(model, "n_classes", 0) or 0)
    tt = None if target is None else to_tensor(target, torch.int64).reshape(-1)
    for name, lab in (("labels", yt), ("target classes", tt)):
        if lab is None or lab.numel() == 0:
            continue
        if len(lab) != len(xt):
            raise DataError(f"{len(xt)} inputs but {len(lab)} {name}")
        if int(lab.min()) < 0 or (n_classes and int(lab.max()) >= n_classes):
            raise DataError(f"{name} must lie in [0, {n_classes}), got {lab.min()}..{lab.max()}")
    lo, hi = bounds_of(model)
    if xt.numel() and not bool(torch.isfinite(xt).all()):
        raise DataError("inputs hold NaN or infinite values", hint="drop or impute them")
    if xt.numel() and (float(xt.min()) < lo - BOUNDS_TOL or float(xt.max()) > hi + BOUNDS_TOL):
        raise DataError(
            f"inputs lie in [{float(xt.min()):.4g}, {float(xt.max()):.4g}], outside the "
            f"model's bounds {(lo, hi)}",
            hint="attacks work in input space: pass un-normalised inputs, or fix model.bounds",
        )
    return xt.clamp(lo, hi), yt, tt


def bounds_of(model: Any) -> tuple[float, float]:
    """``model.bounds`` as two floats (``(0, 1)`` for a bare module without bounds)."""
    lo, hi = getattr(model, "bounds", (0.0, 1.0))
    return float(lo), float(hi)


# ---------------------------------------------------------------- geometry


def per_point(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """Reshape a per-point ``(n,)`` tensor to broadcast against ``like`` ``(n, ...)``."""
    if isinstance(v, torch.Tensor) and v.ndim == 1:
        return v.view(-1, *([1] * (like.ndim - 1)))
    return v


def flat_norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-point norm ``(n,)`` of a batch ``d``: ``"linf"``, ``"l2"`` or ``"l1"``."""
    if d.numel() == 0:
        return d.new_zeros(len(d))
    flat = d.reshape(len(d), -1)
    if flat.shape[1] == 0:
        return flat.new_zeros(len(d))
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    if norm == "l1":
        return flat.abs().sum(dim=1)
    raise BastionError(f"unknown norm {norm!r}", hint="use linf or l2")


def project(delta: torch.Tensor, eps: torch.Tensor | float, norm: str) -> torch.Tensor:
    """Project perturbations onto the ``norm`` ball of radius ``eps`` (float or ``(n,)``)."""
    e = per_point(eps, delta)
    if norm == "linf":
        if isinstance(e, torch.Tensor):
            return torch.maximum(torch.minimum(delta, e), -e)
        return delta.clamp(-e, e)
    n = flat_norm(delta, "l2")
    factor = torch.clamp(torch.as_tensor(eps, dtype=delta.dtype) / (n + 1e-12), max=1.0)
    return delta * per_point(factor, delta)


def clip_to_bounds(x: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """Clamp ``x`` into ``bounds``."""
    return x.clamp(bounds[0], bounds[1])


def project_and_clip(
    x_adv: torch.Tensor,
    x: torch.Tensor,
    eps: torch.Tensor | float,
    norm: str,
    bounds: tuple[float, float],
) -> torch.Tensor:
    """``x + project(x_adv - x)`` clamped to ``bounds``.

    Clamping after projecting keeps the budget: with ``x`` inside the bounds, clamping
    only shrinks each coordinate of the perturbation.
    """
    return clip_to_bounds(x + project(x_adv - x, eps, norm), bounds)


def random_in_ball(
    x: torch.Tensor, eps: torch.Tensor | float, norm: str, generator: Any
) -> torch.Tensor:
    """A perturbation drawn uniformly from the ``norm`` ball of radius ``eps`` around 0.

    ``generator`` is a CPU ``torch.Generator`` (or None), or a
    :class:`~bastion.attacks._rng.PointRandom` over the rows of ``x`` (per-point draws).

    Draws on the CPU from ``generator`` (never torch's global RNG), then moves to ``x``'s
    device, so a seed gives the same draw everywhere.
    """
    shape = tuple(x.shape)
    e = per_point(eps if not isinstance(eps, torch.Tensor) else eps.cpu(), x)
    pr = generator if hasattr(generator, "torch_uniform") else None  # a PointRandom
    if norm == "linf":
        u = (pr.torch_uniform(shape[1:]) if pr is not None  # type: ignore[union-attr]
             else torch.rand(shape, generator=generator))
        d = (2 * u - 1) * e
    else:
        g = (pr.torch_normal(shape[1:], 1) if pr is not None  # type: ignore[union-attr]
             else torch.randn(shape, generator=generator))
        g = g / per_point(flat_norm(g, "l2") + 1e-12, g)
        dim = max(1, int(np.prod(shape[1:])))
        u = (pr.torch_uniform((), 2) if pr is not None  # type: ignore[union-attr]
             else torch.rand(shape[0], generator=generator))
        r = u ** (1.0 / dim)
        d = g * per_point(r, g) * e
    return d.to(device=x.device, dtype=x.dtype)


def step_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit ``norm`` for a gradient: its sign for
    ``"linf"``, the gradient over its L2 norm for ``"l2"``."""
    if norm == "linf":
        return grad.sign()
    return grad / per_point(flat_norm(grad, "l2") + 1e-12, grad)


# ---------------------------------------------------------------- losses


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020), untargeted, to maximise:
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``."""
    if logits.shape[1] < 3:
        raise BastionError("the DLR loss needs at least 3 classes", hint="use loss='ce'")
    z_sorted = logits.sort(dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = logits.argmax(dim=1) == y
    other = torch.where(top_is_y, z_sorted[:, -2], z_sorted[:, -1])
    return -(z_y - other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR, to maximise: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``."""
    if logits.shape[1] < 4:
        raise BastionError("the targeted DLR loss needs at least 4 classes", hint="use loss='ce'")
    z_sorted = logits.sort(dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


def attack_loss(
    logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, loss: str
) -> torch.Tensor:
    """Per-point loss ``(n,)`` that an attack *maximises*.

    ``"ce"``: cross-entropy of the true class (untargeted) or minus that of the target;
    ``"dlr"``: the (targeted) Difference of Logits Ratio.
    """
    if loss == "ce":
        if target is None:
            return F.cross_entropy(logits, y, reduction="none")
        return -F.cross_entropy(logits, target, reduction="none")
    if loss == "dlr":
        return dlr_loss(logits, y) if target is None else dlr_targeted_loss(logits, y, target)
    raise BastionError(f"unknown loss {loss!r}", hint="use ce or dlr")


def loss_and_grad(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None = None,
    loss: str = "ce",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward and backward pass: ``(loss (n,), d loss / d x, logits)``, all detached.

    Only the input gradient is computed (no parameter gradients are accumulated).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = logits_fn(x)
        values = attack_loss(logits, y, target, loss)
        (grad,) = torch.autograd.grad(values.sum(), x)
    return values.detach(), grad.detach(), logits.detach()


def is_success(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Bool ``(n,)``: misclassified (untargeted) or classified as ``target`` (targeted)."""
    pred = logits.argmax(dim=1)
    return pred != y if target is None else pred == target


# ---------------------------------------------------------------- book-keeping


class QueryCounter:
    """Per-point count of model evaluations.

    A forward pass and a gradient computation (forward plus backward) each count as one
    query for every point in the batch that went through it.
    """

    def __init__(self, n: int) -> None:
        self.counts = torch.zeros(n, dtype=torch.int64)

    def add(self, idx: torch.Tensor | slice | None = None, k: int = 1) -> None:
        """Add ``k`` queries to the points ``idx`` (indices into the full batch; all if None)."""
        if idx is None:
            self.counts += k
        else:
            self.counts[idx] += k

    def numpy(self) -> np.ndarray:
        return self.counts.numpy().copy()


def clean_pass(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Logits at the clean points and the mean L2 norm of the cross-entropy input
    gradient there (a near-zero value hints at gradient masking)."""
    _, grad, logits = loss_and_grad(logits_fn, x, y, None, "ce")
    gn = float(flat_norm(grad, "l2").mean()) if len(x) else 0.0
    return logits, gn


def _require_scores(model: Any, name: str) -> None:
    if not callable(getattr(model, "predict_proba", None)):
        raise BastionError(
            f"{name} needs model.predict_proba, which {type(model).__name__} lacks",
            hint="wrap your classifier in a Bastion model adapter",
        )


def predict_scores(model: Any, x: torch.Tensor) -> torch.Tensor:
    """``model.predict_proba`` of a tensor batch, as a float64 tensor."""
    return torch.as_tensor(np.asarray(model.predict_proba(x.detach().cpu().numpy()),
                                      dtype=np.float64))


def run_attack_epsilons(
    attack: Any,
    model: Any,
    x: Any,
    y: Any,
    *,
    epsilons: Sequence[float] | float,
    target: Any | None = None,
    point_ids: Any | None = None,
) -> AttackResult:
    """The epsilon loop every :class:`~bastion.attacks.base.FixedEpsilonAttack` runs.

    Epsilons are visited in ascending order. One clean pass (a gradient pass for a
    white-box attack, ``predict_proba`` for a black-box one; one query per point) finds the
    points the model already gets wrong (or, when targeted, already puts in the target
    class): they succeed with a zero perturbation. A point fooled at a smaller epsilon keeps
    that adversarial input at every larger one, so ``attack.attack_epsilon`` only sees the
    remaining points; ``eps = 0`` gives the clean input. Whatever the hook returns is
    projected onto the ``eps``-ball and clipped to the bounds; a claimed success that the
    projection moved is re-checked with one more query.

    ``extra`` gets ``grad_norm_mean`` (white-box), ``clean_accuracy``, ``mean_queries``,
    ``queries_per_epsilon`` (the clean pass counts in the first epsilon's column) and the
    attack's :meth:`extra_info`.
    """
    from bastion._util import torch_generator
    from bastion.attacks._rng import PointRandom
    from bastion.attacks.base import EpsilonContext

    name = str(getattr(attack, "name", type(attack).__name__))
    norm = str(attack.norm)
    white = bool(getattr(attack, "white_box", True))
    eps_list = check_epsilons(epsilons)
    start = time.perf_counter()
    logits_fn = require_white_box(model, name) if white else None
    if not white:
        _require_scores(model, name)
    xt, yt, tt = prepare_batch(model, x, y, target)
    bounds = bounds_of(model)
    n = len(xt)
    counter = QueryCounter(n)
    info: dict[str, object] = {}
    if n and logits_fn is not None:
        clean_out, gn = clean_pass(logits_fn, xt, yt)
        info["grad_norm_mean"] = gn
    elif n:
        clean_out = predict_scores(model, xt)
    else:
        clean_out = torch.zeros(0, int(getattr(model, "n_classes", 2)))
    counter.add(None, 1)
    clean_success = is_success(clean_out, yt, tt) if n else torch.zeros(0, dtype=torch.bool)
    info["clean_accuracy"] = (float((clean_out.argmax(1) == yt).float().mean()) if n
                              else float("nan"))

    seed = int(getattr(attack, "seed", 0) or 0)
    gen = torch_generator(seed)
    rng = np.random.default_rng(seed)
    if point_ids is not None and len(np.asarray(point_ids).reshape(-1)) != n:
        raise BastionError(f"point_ids has {len(np.asarray(point_ids).reshape(-1))} ids for "
                           f"{n} points", hint="pass one id per point")
    prng = PointRandom(seed, point_ids, n=n)
    x_adv = xt.unsqueeze(0).repeat(len(eps_list), *([1] * xt.ndim))
    success = torch.zeros(len(eps_list), n, dtype=torch.bool)
    per_eps = np.zeros((len(eps_list), n), dtype=np.int64)
    done = clean_success.clone()
    done_x = xt.clone()
    rechecked = 0
    for i, eps in enumerate(eps_list):
        before = counter.counts.clone()
        x_adv[i] = done_x
        success[i] = done
        todo = torch.nonzero(~done).flatten()
        if eps > 0 and len(todo):
            tsub = None if tt is None else tt[todo]
            ctx = EpsilonContext(model=model, logits=logits_fn, bounds=bounds, eps_index=i,
                                 idx=todo, clean_logits=clean_out[todo], counter=counter,
                                 gen=gen, rng=rng, prng=prng.fold(  # keyed by the budget itself
                                     int(np.float64(eps).view(np.uint64))))
            adv, ok = attack.attack_epsilon(ctx, xt[todo].clone(), yt[todo], tsub, float(eps))
            adv = torch.as_tensor(adv).detach().to(xt.dtype).reshape(xt[todo].shape)
            ok = torch.as_tensor(ok, dtype=torch.bool).reshape(-1).cpu()
            fixed = project_and_clip(adv, xt[todo], float(eps), norm, bounds)
            moved = ok & (flat_norm(fixed - adv, "linf") > BOUNDS_TOL)
            if bool(moved.any()):  # the hook left the budget: trust only a fresh check
                sel = torch.nonzero(moved).flatten()
                with torch.no_grad():
                    out = (logits_fn(fixed[sel]) if logits_fn is not None
                           else predict_scores(model, fixed[sel]))
                counter.add(todo[sel])
                ok[sel] = is_success(out, yt[todo][sel], None if tsub is None else tsub[sel])
                rechecked += len(sel)
            x_adv[i, todo] = fixed
            success[i, todo] = ok
            done = success[i].clone()
            done_x = torch.where(per_point(done, xt), x_adv[i], done_x)  # type: ignore[arg-type]
        per_eps[i] = (counter.counts - before).numpy()
    if n:  # the clean pass was counted before the loop: it belongs to column 0
        per_eps[0] += 1

    norms = torch.stack([flat_norm(x_adv[i] - xt, norm) for i in range(len(eps_list))])
    info["mean_queries"] = float(counter.counts.float().mean()) if n else 0.0
    info["queries_per_epsilon"] = per_eps.tolist()
    info["rechecked_after_projection"] = rechecked
    info.update(attack.extra_info())
    return AttackResult(
        attack=name,
        norm=norm,
        epsilons=eps_list,
        x_adv=x_adv.cpu().numpy(),
        success=success.numpy(),
        norms=norms.cpu().numpy().astype(np.float64),
        queries=counter.numpy(),
        time_s=time.perf_counter() - start,
        targeted=tt is not None,
        extra=info,
    )


def minimal_result(
    *,
    name: str,
    norm: str,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    success: torch.Tensor,
    counter: QueryCounter,
    start: float,
    targeted: bool,
    extra: dict[str, object] | None = None,
) -> AttackResult:
    """An :class:`AttackResult` for a minimal attack: the clean input and norm ``inf``
    where it failed."""
    x_adv = torch.where(per_point(success, x), x_adv, x)  # type: ignore[arg-type]
    norms = flat_norm(x_adv - x, norm).double()
    norms = torch.where(success, norms, torch.full_like(norms, float("inf")))
    info = dict(extra or {})
    ok = success & torch.isfinite(norms)
    info["median_norm"] = float(norms[ok].median()) if bool(ok.any()) else float("nan")
    info["mean_queries"] = float(counter.counts.float().mean()) if len(x) else 0.0
    return AttackResult(
        attack=name,
        norm=norm,
        epsilons=None,
        x_adv=x_adv.detach().cpu().numpy()[None],
        success=success.cpu().numpy()[None],
        norms=norms.cpu().numpy()[None],
        queries=counter.numpy(),
        time_s=time.perf_counter() - start,
        targeted=targeted,
        extra=info,
    )
