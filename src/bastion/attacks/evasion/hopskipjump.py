"""HopSkipJump: a decision-based black-box attack (Chen, Jordan & Wainwright, 2020).

"HopSkipJumpAttack: a query-efficient decision-based attack", IEEE S&P 2020,
https://arxiv.org/abs/1904.02144.

Only the predicted label (the argmax of ``model.predict_proba``) is used. From an
adversarial starting point the attack repeats three moves:

1. **binary search** along the line to the clean input, onto the decision boundary;
2. **gradient-direction estimate** at the boundary from the signs of ``n_t`` random probes
   at radius ``delta_t`` (``n_t = init_evals * sqrt(t)``, capped at ``max_evals``), with
   the paper's baseline subtraction;
3. **geometric step** along that direction with size ``dist / sqrt(t)``, halved until the
   point is adversarial again.

It is a minimal-perturbation attack: it returns, per point, the smallest adversarial
perturbation found within ``max_queries`` model evaluations (``inf`` where it found no
adversarial start).
"""

from __future__ import annotations

import math
import time

import numpy as np

from bastion.attacks.base import AttackResult, MinimalAttack, check_norm
from bastion.attacks.evasion.square import as_query_dtype, check_blackbox_inputs, query
from bastion.errors import BastionError, DataError


class HopSkipJump(MinimalAttack):
    """HopSkipJump, L2 or Linf, untargeted or targeted; black-box (labels only).

    Args:
        norm: ``"l2"`` or ``"linf"``: the norm the search minimises and reports.
        max_queries: model evaluations allowed per point, all included (the clean check,
            the search for a start, every probe). Never exceeded.
        steps: at most this many iterations (the budget usually ends the search first).
        init_evals: probes for the first gradient estimate (the paper's 100).
        max_evals: cap on probes for one gradient estimate (the paper's 10,000).
        gamma: sets the binary-search tolerance ``theta = gamma / d^1.5`` (L2) or
            ``gamma / d^2`` (Linf), ``d`` the input dimension.
        init_tries: random uniform inputs tried at most when looking for an adversarial
            start (untargeted, or targeted without ``target_inputs``).
        seed: seed of the random probes; two runs with one seed give one result.

    ``run(model, x, y, target=None, target_inputs=None)``: a targeted run needs a start
    of the target class for each point; give it as ``target_inputs`` (shape like ``x``,
    e.g. clean examples of each target class). Without it, or when a given start is not
    classified as the target, random inputs are tried, which rarely works for a
    targeted search.

    The result's ``norms`` are the smallest perturbations found (``inf`` where no
    adversarial start was found, ``0`` where the model is already wrong); ``queries`` is
    exact per point. A model with a budget of its own that runs out raises
    :class:`~bastion.errors.QueryBudgetExceeded` out of ``run``: give the attack a
    ``max_queries`` whose total (points x ``max_queries``) fits.
    """

    name = "hsj"
    white_box = False

    def __init__(
        self,
        *,
        norm: str = "l2",
        max_queries: int = 1000,
        steps: int = 64,
        init_evals: int = 100,
        max_evals: int = 10_000,
        gamma: float = 1.0,
        init_tries: int = 100,
        seed: int = 0,
    ) -> None:
        self.norm = check_norm(norm)
        if int(max_queries) < 1:
            raise BastionError(f"max_queries must be >= 1, got {max_queries}")
        if int(steps) < 0 or int(init_evals) < 1 or int(max_evals) < 1 or int(init_tries) < 0:
            raise BastionError(
                "steps and init_tries must be >= 0, init_evals and max_evals >= 1; got "
                f"steps={steps}, init_evals={init_evals}, max_evals={max_evals}, "
                f"init_tries={init_tries}"
            )
        if not gamma > 0:
            raise BastionError(f"gamma must be > 0, got {gamma}")
        self.max_queries = int(max_queries)
        self.steps = int(steps)
        self.init_evals = int(init_evals)
        self.max_evals = int(max_evals)
        self.gamma = float(gamma)
        self.init_tries = int(init_tries)
        self.seed = int(seed)

    def run(
        self,
        model: object,
        x: np.ndarray,
        y: np.ndarray,
        *,
        target: np.ndarray | None = None,
        target_inputs: np.ndarray | None = None,
        point_ids: np.ndarray | None = None,
    ) -> AttackResult:
        """Search each point's smallest flipping perturbation; see the class docstring.

        Each point draws from its own generator, seeded by ``(seed, point id)``
        (``point_ids``, default ``0..n-1``): its result does not depend on its batch."""
        t0 = time.perf_counter()
        x, y, target = check_blackbox_inputs(model, x, y, target)
        targeted = target is not None
        labels = target if target is not None else y
        n = len(x)
        if target_inputs is not None:
            if not targeted:
                raise BastionError("target_inputs only make sense with target", hint="give target")
            target_inputs = np.asarray(target_inputs, dtype=np.float32)
            if target_inputs.shape != x.shape:
                raise DataError(
                    f"target_inputs must have the shape of x {x.shape}, got "
                    f"{target_inputs.shape}",
                    hint="give one starting input of the target class per point",
                )
        lo, hi = (float(b) for b in model.bounds)  # type: ignore[attr-defined]
        ids = (np.arange(n) if point_ids is None
               else np.asarray(point_ids, dtype=np.int64).reshape(-1))
        if len(ids) != n or (ids < 0).any():
            raise BastionError("point_ids must be one integer >= 0 per point")

        x_adv = x.copy()
        norms = np.full(n, np.inf)
        queries = np.zeros(n, dtype=np.int64)
        iterations = np.zeros(n, dtype=np.int64)
        started = np.zeros(n, dtype=bool)
        if n:
            pred = query(model, x, np.float32).argmax(axis=1)
            queries += 1
            done = pred == labels if targeted else pred != labels
            norms[done] = 0.0
            for i in np.flatnonzero(~done):
                search = _PointSearch(self, model, x[i], int(labels[i]), targeted, lo, hi,
                                      np.random.default_rng([self.seed & (2**63 - 1),
                                                             int(ids[i])]))
                start = None if target_inputs is None else target_inputs[i]
                best, its = search.run(start)
                queries[i] += search.used
                iterations[i] = its
                if best is not None:
                    started[i] = True
                    x_adv[i] = best.astype(np.float32)
                    norms[i] = _dist(x_adv[i].astype(np.float64), x[i].astype(np.float64),
                                     self.norm)
        success = np.isfinite(norms)
        return AttackResult(
            attack=self.name,
            norm=self.norm,
            epsilons=None,
            x_adv=x_adv[None],
            success=success[None],
            norms=norms[None],
            queries=queries,
            time_s=time.perf_counter() - t0,
            targeted=targeted,
            extra={
                "max_queries": self.max_queries,
                "iterations": iterations.tolist(),
                "found_start": started.tolist(),
            },
        )


class _OutOfBudget(Exception):
    """Internal: the point's query budget cannot pay for the next question."""


class _PointSearch:
    """The HopSkipJump iterations for one point, on that point's budget."""

    def __init__(
        self,
        attack: HopSkipJump,
        model: object,
        x0: np.ndarray,
        label: int,
        targeted: bool,
        lo: float,
        hi: float,
        rng: np.random.Generator,
    ) -> None:
        self.a = attack
        self.model = model
        self.x0 = x0.astype(np.float64)
        self.label = label
        self.targeted = targeted
        self.lo, self.hi = lo, hi
        self.rng = rng
        self.budget = attack.max_queries - 1  # the clean check is already paid
        self.used = 0
        self.d = int(self.x0.size)
        if attack.norm == "l2":
            self.theta = attack.gamma / (self.d * math.sqrt(self.d))
        else:
            self.theta = attack.gamma / self.d**2
        self.best: np.ndarray | None = None
        self.best_dist = math.inf

    # -- the oracle --------------------------------------------------------------------

    def decide(self, xs: np.ndarray) -> np.ndarray:
        """Adversarial or not, for each row of ``xs`` (already clipped and rounded)."""
        k = len(xs)
        if self.used + k > self.budget:
            raise _OutOfBudget
        pred = query(self.model, xs, np.float32).argmax(axis=1)
        self.used += k
        ok = pred == self.label if self.targeted else pred != self.label
        return np.asarray(ok, dtype=bool)

    def _clip(self, x: np.ndarray) -> np.ndarray:
        return as_query_dtype(np.clip(x, self.lo, self.hi))

    def _keep(self, x: np.ndarray) -> None:
        """Remember ``x`` (verified adversarial) when it is the closest so far."""
        dist = _dist(x, self.x0, self.a.norm)
        if dist < self.best_dist:
            self.best, self.best_dist = x.copy(), dist

    # -- the search --------------------------------------------------------------------

    def run(self, start: np.ndarray | None) -> tuple[np.ndarray | None, int]:
        """Return the closest adversarial input found (or None) and the iterations done."""
        its = 0
        try:
            x = self._initialise(start)
            if x is None:
                return None, 0
            x, dist_post = self._binary_search(x)
            dist = _dist(x, self.x0, self.a.norm)
            for t in range(1, self.a.steps + 1):
                delta = self._delta(t, dist_post)
                n_evals = min(int(self.a.init_evals * math.sqrt(t)), self.a.max_evals)
                # keep enough for the step and the binary search after it
                reserve = int(math.ceil(math.log2(1.0 / self.theta))) + 4
                n_evals = min(n_evals, self.budget - self.used - reserve)
                if n_evals < 1:
                    break
                grad = self._gradient(x, n_evals, delta)
                if grad is None:
                    break
                update = np.sign(grad) if self.a.norm == "linf" else grad
                stepped = self._geometric_step(x, update, dist / math.sqrt(t))
                if stepped is None:
                    break
                x, dist_post = self._binary_search(stepped)
                dist = _dist(x, self.x0, self.a.norm)
                its = t
        except _OutOfBudget:
            pass
        return self.best, its

    def _initialise(self, start: np.ndarray | None) -> np.ndarray | None:
        """An adversarial start, blended towards ``x0`` by a binary search (L2)."""
        noise = None
        if start is not None:
            cand = self._clip(np.asarray(start, dtype=np.float64))
            if self.decide(cand[None])[0]:
                noise = cand
        tries = 0
        while noise is None and tries < self.a.init_tries:
            cand = self._clip(self.rng.uniform(self.lo, self.hi, size=self.x0.shape))
            tries += 1
            if self.decide(cand[None])[0]:
                noise = cand
        if noise is None:
            return None
        self._keep(noise)
        low, high, verified = 0.0, 1.0, noise
        while high - low > 0.001:
            mid = (high + low) / 2.0
            blended = self._clip((1.0 - mid) * self.x0 + mid * noise)
            if self.decide(blended[None])[0]:
                high, verified = mid, blended
                self._keep(blended)
            else:
                low = mid
        return verified

    def _project(self, x: np.ndarray, alpha: float) -> np.ndarray:
        if self.a.norm == "l2":
            return self._clip((1.0 - alpha) * self.x0 + alpha * x)
        return self._clip(np.clip(x, self.x0 - alpha, self.x0 + alpha))

    def _binary_search(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """Move the adversarial ``x`` onto the boundary; return it and ``x``'s distance."""
        dist_post = _dist(x, self.x0, self.a.norm)
        if self.a.norm == "linf":
            high, threshold = dist_post, min(dist_post * self.theta, self.theta)
        else:
            high, threshold = 1.0, self.theta
        low, verified = 0.0, x
        try:
            while (high - low) > threshold:
                mid = (high + low) / 2.0
                cand = self._project(x, mid)
                if self.decide(cand[None])[0]:
                    high, verified = mid, cand
                else:
                    low = mid
        finally:
            self._keep(verified)
        return verified, dist_post

    def _delta(self, t: int, dist_post: float) -> float:
        if t == 1:
            return 0.1 * (self.hi - self.lo)
        if self.a.norm == "l2":
            return math.sqrt(self.d) * self.theta * dist_post
        return self.d * self.theta * dist_post

    def _gradient(self, x: np.ndarray, n_evals: int, delta: float) -> np.ndarray | None:
        """Monte Carlo estimate of the boundary's normal at ``x`` (unit L2 norm)."""
        shape = (n_evals, *x.shape)
        if self.a.norm == "l2":
            rv = self.rng.standard_normal(shape)
        else:
            rv = self.rng.uniform(-1.0, 1.0, size=shape)
        axes = tuple(range(1, rv.ndim))
        rv /= np.maximum(np.sqrt(np.sum(rv**2, axis=axes, keepdims=True)), 1e-12)
        probes = self._clip(x[None] + delta * rv)
        rv = (probes - x[None]) / delta
        fval = 2.0 * self.decide(probes).astype(np.float64) - 1.0
        mean = fval.mean()
        if mean == 1.0:
            grad = rv.mean(axis=0)
        elif mean == -1.0:
            grad = -rv.mean(axis=0)
        else:
            grad = ((fval - mean).reshape((-1,) + (1,) * x.ndim) * rv).mean(axis=0)
        norm = float(np.linalg.norm(grad))
        if not norm > 0 or not math.isfinite(norm):
            return None
        return grad / norm

    def _geometric_step(self, x: np.ndarray, update: np.ndarray, eps: float) -> np.ndarray | None:
        """Step along ``update``, halving until adversarial; None if it never is."""
        for _ in range(30):
            cand = self._clip(x + eps * update)
            if self.decide(cand[None])[0]:
                self._keep(cand)
                return cand
            eps /= 2.0
        return None


def _dist(a: np.ndarray, b: np.ndarray, norm: str) -> float:
    d = (a - b).reshape(-1)
    if norm == "linf":
        return float(np.abs(d).max()) if d.size else 0.0
    return float(np.sqrt(np.sum(d**2)))
