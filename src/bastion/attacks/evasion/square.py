"""Square Attack: a score-based black-box attack by random search (Andriushchenko et al., 2020).

"Square Attack: a query-efficient black-box adversarial attack via random search",
ECCV 2020, https://arxiv.org/abs/1912.00049.

Only ``model.predict_proba`` is called (for a plain ``TorchModel``, whose probabilities are
the softmax of ``predict_logits``, the logits themselves: the same margins, one forward
pass and no float64 round trip). Each step proposes a random change inside one
square window of the image and keeps it when the loss drops:

- Linf: start from vertical stripes of ``+-eps``; a step sets one ``s x s`` window (all
  channels) to ``+-eps`` per channel.
- L2: start from a grid of pseudo-Gaussian bumps of norm ``eps``; a step moves the mass
  of a second window into the first, reshaped as a new bump, so the norm stays ``eps``.

The window area is a share ``p`` of the image, halved on the paper's schedule (at 10, 50,
200, 500, 1000, 2000, 4000, 6000 and 8000 out of 10,000 iterations, rescaled to the query
budget). Points are attacked in batches; a point stops being queried as soon as it is
fooled, so every point's query count is exact and never above ``max_queries``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from bastion.attacks._rng import PointRandom
from bastion.attacks.base import EpsilonContext, FixedEpsilonAttack, check_norm
from bastion.errors import BastionError, DataError

#: The paper's standard ``p_init`` per norm (ImageNet); robust or small models may want more.
DEFAULT_P_INIT = {"linf": 0.05, "l2": 0.1}


class Square(FixedEpsilonAttack):
    """The Square Attack, Linf or L2, untargeted or targeted; black-box (scores only).

    Args:
        norm: ``"linf"`` or ``"l2"``.
        max_queries: model evaluations allowed per point and per epsilon (the one clean
            evaluation of each point is counted in the first epsilon's budget).
        p_init: initial share of the image changed by one step; ``None`` takes the paper's
            defaults (0.05 for Linf, 0.1 for L2).
        loss: ``"margin"`` (difference of log-probabilities between the true class and the
            best other class; the paper's choice) or ``"ce"`` (cross-entropy).
        seed: seed of the random search; two runs with one seed give one result.

    ``run(model, x, y, epsilons=[...], target=None)``: with ``target`` (one class per
    point) the attack aims at those classes. A point fooled at a smaller epsilon keeps its
    adversarial input at larger ones without spending more queries. ``queries`` in the
    result is exact; ``extra["queries_per_epsilon"]`` splits it per epsilon.

    A model with a budget of its own (:class:`~bastion.models.query.QueryBudget`,
    ``HTTPModel(max_queries=...)``) that runs out raises
    :class:`~bastion.errors.QueryBudgetExceeded` out of ``run``: give the attack a
    ``max_queries`` whose total (points x epsilons x ``max_queries``) fits.
    """

    name = "square"
    white_box = False

    def __init__(
        self,
        *,
        norm: str = "linf",
        max_queries: int = 1000,
        p_init: float | None = None,
        loss: str = "margin",
        seed: int = 0,
    ) -> None:
        self.norm = check_norm(norm)
        if int(max_queries) < 1:
            raise BastionError(f"max_queries must be >= 1, got {max_queries}")
        self.max_queries = int(max_queries)
        p = DEFAULT_P_INIT[self.norm] if p_init is None else float(p_init)
        if not 0.0 < p <= 1.0:
            raise BastionError(f"p_init must be in (0, 1], got {p_init}")
        self.p_init = p
        if loss not in ("margin", "ce"):
            raise BastionError(f"unknown loss {loss!r}", hint="use margin or ce")
        self.loss = loss
        self.seed = int(seed)

    def attack_epsilon(self, ctx: EpsilonContext, x: torch.Tensor, y: torch.Tensor,
                       target: torch.Tensor | None, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random search at one epsilon; the clean query of each point counts in the first
        epsilon's budget."""
        budget = self.max_queries - (1 if ctx.eps_index == 0 else 0)
        if budget <= 0:
            return x, torch.zeros(len(x), dtype=torch.bool)
        lo, hi = ctx.bounds
        # per-point draws (keyed by seed, point id and budget): a point's search does not
        # depend on the batch it is in, so a scan sharded over an engine gives the same points
        pr = (ctx.prng.take(ctx.idx) if ctx.prng is not None
              else PointRandom(self.seed, n=len(x)).fold(ctx.eps_index))
        if self.norm == "linf":
            labels_t = (target if target is not None else y).detach().cpu().to(torch.int64)
            xt = x.detach().cpu().float()
            x3 = xt.reshape((len(xt), *image_shape(xt.shape[1:])))
            xb_t, s_t, q_t = self._linf(ctx.model, x3, labels_t, eps, budget, lo, hi,
                                        pr, target is not None)
            ctx.counter.add(ctx.idx, q_t)
            return xb_t.reshape(xt.shape), s_t
        xn = x.detach().cpu().numpy().astype(np.float32)
        labels = (target if target is not None else y).cpu().numpy().astype(np.int64)
        x3 = xn.reshape((len(xn), *image_shape(xn.shape[1:]))).astype(np.float64)
        xb, s, q = self._l2(ctx.model, x3, labels, eps, budget, lo, hi, pr,
                            target is not None)
        ctx.counter.add(ctx.idx, torch.as_tensor(q, dtype=torch.int64))
        return (torch.from_numpy(xb.reshape(xn.shape).astype(np.float32)),
                torch.from_numpy(np.asarray(s, dtype=bool)))

    def extra_info(self) -> dict[str, object]:
        return {"max_queries": self.max_queries, "p_init": self.p_init, "loss": self.loss}

    # ------------------------------------------------------------------ the two searches

    def _linf(
        self,
        model: object,
        x: torch.Tensor,
        labels: torch.Tensor,
        eps: float,
        budget: int,
        lo: float,
        hi: float,
        rng: PointRandom,
        targeted: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The L-inf search in float32 tensors: windows are boolean masks built from
        broadcast comparisons (no per-point Python), the loss comes from the model's logits
        when it is a plain :class:`TorchModel` (one forward pass, no softmax round trip),
        and nothing goes through float64 or NumPy inside the loop."""
        m, c, h, w = x.shape
        score = _scorer(model, self.loss, targeted)
        q = torch.zeros(m, dtype=torch.int64)
        ar_c = torch.arange(c)[None, :, None, None]
        # vertical stripes of +-eps work best (paper, Sec. 3.1)
        init = torch.from_numpy((eps * rng.signs((c, 1, w), 0)).astype(np.float32))
        x_best = (x + init).clamp_(lo, hi)
        loss_min, succ = score(x_best, labels)
        q += 1
        # the points still standing, kept compact (gathered again only when some fall)
        act = torch.nonzero(~succ).flatten()
        xa, xba, la, lossa = x[act], x_best[act], labels[act], loss_min[act]
        qa = torch.zeros(len(act), dtype=torch.int64)
        ra = rng.take(act)  # the active points' generators, kept aligned with ``act``
        for it in range(1, budget):
            k = int(act.numel())
            if k == 0:
                break
            p = p_selection(self.p_init, it, budget)
            sh, sw = window_size(p, h, w, minimum=1, linf=True)
            top = torch.from_numpy(ra.integers(h - sh + 1, it, 1, 0))
            left = torch.from_numpy(ra.integers(w - sw + 1, it, 1, 1))
            win = (torch.arange(k)[:, None, None, None], ar_c,
                   (top[:, None] + torch.arange(sh)[None])[:, None, :, None],
                   (left[:, None] + torch.arange(sw)[None])[:, None, None, :])
            xc_win, xb_win = xa[win], xba[win]  # (k, c, sh, sw)
            up = (xc_win + eps).clamp_(lo, hi)
            down = (xc_win - eps).clamp_(lo, hi)
            # per point and channel: would +eps / -eps leave the window as it is?
            same_up = (up - xb_win).abs_().flatten(2).amax(2) < 1e-7
            same_down = (down - xb_win).abs_().flatten(2).amax(2) < 1e-7
            positive = torch.from_numpy(ra.uniform((c,), it, 2) < 0.5)
            # resample windows whose proposal would not change the image (paper's code)
            for r in range(10):
                same = torch.where(positive, same_up, same_down).all(1)
                if not bool(same.any()):
                    break
                positive[same] = torch.from_numpy(ra.take(same).uniform((c,), it, 3, r) < 0.5)
            x_new = xba.clone()
            x_new[win] = torch.where(positive[:, :, None, None], up, down)
            loss, s_new = score(x_new, la)
            qa += 1
            keep = (loss < lossa) | s_new
            xba = torch.where(keep[:, None, None, None], x_new, xba)
            lossa = torch.where(keep, loss, lossa)
            if bool(s_new.any()):  # write the fooled points back and drop them
                done = act[s_new]
                x_best[done], succ[done] = x_new[s_new], True
                q[done] += qa[s_new]
                stay = ~s_new
                act, xa, xba, la = act[stay], xa[stay], xba[stay], la[stay]
                lossa, qa, ra = lossa[stay], qa[stay], ra.take(stay)
        x_best[act], q[act] = xba, q[act] + qa
        return x_best, succ, q

    def _l2(
        self,
        model: object,
        x: np.ndarray,
        labels: np.ndarray,
        eps: float,
        budget: int,
        lo: float,
        hi: float,
        rng: PointRandom,
        targeted: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m, c, h, w = x.shape
        q = np.zeros(m, dtype=np.int64)
        delta = _l2_init(rng, m, c, h, w)
        x_best = as_query_dtype(np.clip(x + delta / _l2norm(delta) * eps, lo, hi))
        loss_min, succ = scores(query(model, x_best, np.float32), labels,
                                targeted, self.loss)
        q += 1
        for it in range(1, budget):
            idx = np.flatnonzero(~succ)
            if idx.size == 0:
                break
            p = p_selection(self.p_init, it, budget)
            sh, sw = window_size(p, h, w, minimum=3, linf=False)
            xc, xb = x[idx], x_best[idx]
            delta = xb - xc
            k = len(idx)
            sub = rng.take(idx)
            win1 = _window_index(sub, c, h, w, sh, sw, it, 1)
            win2 = _window_index(sub, c, h, w, sh, sw, it, 2)
            union = np.zeros((k, 1, h, w), dtype=bool)
            union[(win1[0], np.zeros_like(win1[1]), win1[2], win1[3])] = True
            union[(win2[0], np.zeros_like(win2[1]), win2[2], win2[3])] = True

            old = delta[win1]
            norm_win1 = np.sqrt(np.sum(old**2, axis=(2, 3), keepdims=True))
            norm_img = _l2norm(delta)
            norm_union = np.sqrt(np.sum((delta * union) ** 2, axis=(2, 3), keepdims=True))
            bump = _bumps(sh, sw, sub, it, 3)
            new = bump * sub.signs((c, 1, 1), it, 4) + old / (1e-10 + norm_win1)
            new_norm = np.sqrt(np.sum(new**2, axis=(2, 3), keepdims=True))
            room = np.maximum(eps**2 - norm_img**2, 0.0) / c + norm_union**2
            new = new / np.maximum(new_norm, 1e-12) * np.sqrt(room)
            delta[win2] = 0.0
            delta[win1] = new
            x_new = as_query_dtype(np.clip(xc + delta / _l2norm(delta) * eps, lo, hi))
            loss, s_new = scores(query(model, x_new, np.float32), labels[idx],
                                 targeted, self.loss)
            q[idx] += 1
            self._accept(idx, loss, s_new, x_new, loss_min, succ, x_best)
        return x_best, succ, q

    @staticmethod
    def _accept(
        idx: np.ndarray,
        loss: np.ndarray,
        s_new: np.ndarray,
        x_new: np.ndarray,
        loss_min: np.ndarray,
        succ: np.ndarray,
        x_best: np.ndarray,
    ) -> None:
        """Keep proposals that lower the loss or fool the model (in place)."""
        keep = (loss < loss_min[idx]) | s_new
        kept = idx[keep]
        loss_min[kept] = loss[keep]
        x_best[kept] = x_new[keep]
        succ[kept] = s_new[keep]


# ---------------------------------------------------------------------- shared helpers
# (also used by the other black-box attacks)


def check_blackbox_inputs(
    model: object, x: np.ndarray, y: np.ndarray, target: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate a black-box attack's inputs; return float32 ``x``, int64 ``y`` and target."""
    if not callable(getattr(model, "predict_proba", None)):
        raise BastionError(
            f"{type(model).__name__} has no predict_proba",
            hint="wrap your classifier in a Bastion model adapter",
        )
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    shape = tuple(model.input_shape)  # type: ignore[attr-defined]
    if tuple(x.shape[1:]) != shape:
        raise DataError(f"inputs of shape {tuple(x.shape[1:])} do not match the model's {shape}")
    if len(y) != len(x):
        raise DataError(f"{len(x)} inputs but {len(y)} labels")
    n_classes = int(model.n_classes)  # type: ignore[attr-defined]
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise DataError(f"labels must lie in [0, {n_classes}), got {y.min()}..{y.max()}")
    if not np.all(np.isfinite(x)):
        raise DataError("inputs hold NaN or infinite values")
    if target is not None:
        target = np.asarray(target).astype(np.int64).reshape(-1)
        if target.shape != y.shape:
            raise DataError(f"target has {target.size} entries for {len(y)} points")
        if target.size and (target.min() < 0 or target.max() >= n_classes):
            raise DataError(f"target classes must lie in [0, {n_classes})")
    return x, y, target


def query(model: object, x: np.ndarray, dtype: type | np.dtype) -> np.ndarray:
    """``predict_proba`` of ``x`` (reshaped to the model's input shape) as float64."""
    in_shape = tuple(model.input_shape)  # type: ignore[attr-defined]
    xq = np.asarray(x, dtype=dtype).reshape((len(x), *in_shape))
    return np.asarray(model.predict_proba(xq), dtype=np.float64)  # type: ignore[attr-defined]


def as_query_dtype(x: np.ndarray) -> np.ndarray:
    """Round to float32 (what the model sees) but keep float64 storage for arithmetic."""
    return x.astype(np.float32).astype(np.float64)


def scores(
    probs: np.ndarray, labels: np.ndarray, targeted: bool, loss: str
) -> tuple[np.ndarray, np.ndarray]:
    """Loss to minimise and success mask from probabilities.

    Margin: ``log p_y - max_{j != y} log p_j`` (untargeted) or
    ``max_{j != t} log p_j - log p_t`` (targeted). CE: ``log p_y`` or ``-log p_t``.
    Success is read off the argmax, as :func:`bastion.models.base.predict` does.
    """
    logp = np.log(np.clip(probs, 1e-30, None))
    rows = np.arange(len(labels))
    lab = logp[rows, labels]
    other = logp.copy()
    other[rows, labels] = -np.inf
    best_other = other.max(axis=1)
    pred = probs.argmax(axis=1)
    if targeted:
        value = best_other - lab if loss == "margin" else -lab
        return value, pred == labels
    value = lab - best_other if loss == "margin" else lab
    return value, pred != labels


def _scorer(model: object, loss: str, targeted: bool):  # noqa: ANN202 - a closure
    """``f(x, labels) -> (loss to minimise, success)`` for float32 tensors.

    A plain :class:`~bastion.models.torch_model.TorchModel` (whose ``predict_proba`` is
    the softmax of its ``predict_logits``) is scored from its logits: the margin of the
    log-probabilities equals the margin of the logits, so the search is unchanged and
    skips the softmax, the log and the float64 copies. Any other model is queried through
    ``predict_proba`` only (the black-box contract), as :func:`scores` does.
    """
    from bastion.models.torch_model import TorchModel

    in_shape = tuple(model.input_shape)  # type: ignore[attr-defined]
    direct = getattr(type(model), "predict_proba", None) is TorchModel.predict_proba

    def f(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xq = x.reshape((len(x), *in_shape))
        if direct:
            z = torch.from_numpy(model.predict_logits(xq))  # type: ignore[attr-defined]
            if loss == "ce":
                z = torch.log_softmax(z.double(), dim=1)
        else:
            pr = np.asarray(model.predict_proba(xq.numpy()),  # type: ignore[attr-defined]
                            dtype=np.float64)
            z = torch.from_numpy(np.log(np.clip(pr, 1e-30, None)))
        rows = torch.arange(len(labels))
        lab = z[rows, labels]
        pred = z.argmax(1)
        if loss == "margin":
            other = z.clone()
            other[rows, labels] = -torch.inf
            best_other = other.amax(1)
            value = best_other - lab if targeted else lab - best_other
        else:
            value = -lab if targeted else lab
        return value.double(), (pred == labels) if targeted else (pred != labels)

    return f


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """The paper's piecewise-constant schedule of ``p``, rescaled to ``n_iters``."""
    i = int(it / max(n_iters, 1) * 10000)
    for upper, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32),
                       (4000, 64), (6000, 128), (8000, 256), (10000, 512)):
        if i <= upper:
            return p_init / div
    return p_init


def image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """View any input as ``(channels, height, width)``: 1-D inputs become ``(1, 1, d)``."""
    s = tuple(int(v) for v in input_shape)
    if len(s) == 3:
        return s  # type: ignore[return-value]
    if len(s) == 2:
        return (1, s[0], s[1])
    if len(s) == 1:
        return (1, 1, s[0])
    return (1, 1, int(np.prod(s)))


def window_size(p: float, h: int, w: int, *, minimum: int, linf: bool) -> tuple[int, int]:
    """Side(s) of a window covering a share ``p`` of an ``h x w`` image."""
    if h == 1:  # 1-D input: a segment of p*w features
        s = max(int(round(p * w)), minimum)
        s = min(s, w - 1 if linf and w > 1 else w)
        return 1, max(s, 1)
    side = min(h, w)
    s = max(int(round(math.sqrt(p * h * w))), minimum)
    if linf:
        s = max(min(s, side - 1), 1)
    else:
        s = min(s, side)
        if s % 2 == 0:  # the paper keeps L2 windows odd
            s = s + 1 if s + 1 <= side else s - 1
        s = max(s, 1)
    return s, s


def _window_index(
    rng: PointRandom, c: int, h: int, w: int, sh: int, sw: int, *tag: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fancy index of one random ``sh x sw`` window per point, all channels."""
    k = len(rng)
    top = rng.integers(h - sh + 1, *tag, 0)
    left = rng.integers(w - sw + 1, *tag, 1)
    rows = top[:, None] + np.arange(sh)[None]
    cols = left[:, None] + np.arange(sw)[None]
    return (
        np.arange(k)[:, None, None, None],
        np.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    )


def _l2norm(d: np.ndarray) -> np.ndarray:
    return np.maximum(np.sqrt(np.sum(d**2, axis=(1, 2, 3), keepdims=True)), 1e-12)


def _pseudo_gaussian(a: int, b: int) -> np.ndarray:
    """Nested rectangles weighted ``1/(k+1)^2`` around the centre, unit L2 norm."""
    d = np.zeros((a, b))
    if a == 0 or b == 0:
        return d
    ca, cb = a // 2 + 1, b // 2 + 1
    r, col = ca - 1, cb - 1
    for k in range(max(ca, cb)):
        d[max(r, 0) : min(r + 2 * k + 1, a), max(col, 0) : min(col + 2 * k + 1, b)] += (
            1.0 / (k + 1) ** 2
        )
        r -= 1
        col -= 1
    return d / np.sqrt(np.sum(d**2))


def _meta_pseudo_gaussian(sh: int, sw: int) -> np.ndarray:
    """Two pseudo-Gaussian halves of opposite sign (the paper's L2 update shape)."""
    d = np.zeros((sh, sw))
    if sh >= 2:
        d[: sh // 2] = _pseudo_gaussian(sh // 2, sw)
        d[sh // 2 :] = -_pseudo_gaussian(sh - sh // 2, sw)
    elif sw >= 2:
        d[:, : sw // 2] = _pseudo_gaussian(sh, sw // 2)
        d[:, sw // 2 :] = -_pseudo_gaussian(sh, sw - sw // 2)
    else:
        d[:] = 1.0
    d /= np.sqrt(np.sum(d**2))
    return d


def _bumps(sh: int, sw: int, rng: PointRandom, *tag: int) -> np.ndarray:
    """One meta pseudo-Gaussian per point ``(k, 1, sh, sw)``, transposed at random (per
    point) when square."""
    d = _meta_pseudo_gaussian(sh, sw)
    out = np.broadcast_to(d, (len(rng), 1, sh, sw))
    if sh == sw:
        flip = (rng.uniform((), *tag) > 0.5)[:, None, None, None]
        out = np.where(flip, d.T[None, None], out)
    return out


def _l2_init(rng: PointRandom, m: int, c: int, h: int, w: int) -> np.ndarray:
    """A grid of bumps of side ``min(h, w) // 5`` with random signs (paper, Sec. 3.2)."""
    delta = np.zeros((m, c, h, w))
    if h == 1:
        s = max(w // 5, 1)
        for left in range(0, w, s):
            width = min(s, w - left)
            delta[:, :, :, left : left + width] += _bumps(1, width, rng, 0, left, 0) * (
                rng.signs((c, 1, 1), 0, left, 1))
        return delta
    s = max(min(h, w) // 5, 1)
    start_h, start_w = (h - s * (h // s)) // 2, (w - s * (w // s)) // 2
    for top in range(start_h, h - s + 1, s):
        for left in range(start_w, w - s + 1, s):
            delta[:, :, top : top + s, left : left + s] += _bumps(
                s, s, rng, 0, top, left, 0) * rng.signs((c, 1, 1), 0, top, left, 1)
    return delta


def perturbation_norms(x_adv: np.ndarray, x: np.ndarray, norm: str) -> np.ndarray:
    """Per-point ``norm`` of ``x_adv - x``; ``x_adv`` is ``(n_eps, n, ...)`` and ``x``
    broadcasts against it. Returns ``(n_eps, n)``."""
    n_eps, n = x_adv.shape[:2]
    per_point = int(np.prod(x_adv.shape[2:]))
    if n == 0 or per_point == 0:
        return np.zeros((n_eps, n))
    d = (x_adv.astype(np.float64) - x.astype(np.float64)).reshape(n_eps, n, per_point)
    if norm == "linf":
        return np.abs(d).max(axis=2)
    return np.sqrt(np.sum(d**2, axis=2))
