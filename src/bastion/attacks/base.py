"""The attack contract.

Two kinds, as in Foolbox 3:

- :class:`FixedEpsilonAttack`: finds an adversarial input within a budget ``eps``; one
  ``run`` call covers a list of epsilons. ``run`` is owned by the base class (as Foolbox's
  ``FixedEpsilonAttack.__call__`` is): it validates the batch, makes ONE clean pass (logits
  and the mean input-gradient norm), walks the epsilons in ascending order, calls the
  attack's per-epsilon hook :meth:`FixedEpsilonAttack.attack_epsilon` only on the points not
  yet fooled, then projects every returned input onto the budget and the bounds and
  re-checks any success that the projection moved. An attack implements the hook, never
  the loop.
- :class:`MinimalAttack`: searches for the smallest perturbation that flips the decision
  and returns per-point norms, from which robust accuracy at any epsilon is read off.

Every attack takes its configuration keyword-only in ``__init__`` and has one
``run(model, x, y, ...)`` returning an :class:`AttackResult`. Inputs are NumPy arrays
(or tensors) in input space; the model's ``bounds`` are always respected.

A point that the model already misclassifies counts as a success with a zero
perturbation (the model is wrong there without any attack).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from bastion.errors import BastionError

Norm = Literal["linf", "l2"]
NORMS: tuple[str, ...] = ("linf", "l2")


@dataclass
class AttackResult:
    """What one attack run found.

    Attributes:
        attack: the attack's name (e.g. ``"pgd"``).
        norm: ``"linf"`` or ``"l2"``.
        epsilons: the budgets for a fixed-epsilon attack; ``None`` for a minimal one.
        x_adv: adversarial inputs, shape ``(n_eps, n, *input_shape)`` (``n_eps`` is 1
            for a minimal attack). Where no adversarial input was found, the entry is the
            best attempt (fixed) or the clean input (minimal).
        success: bool ``(n_eps, n)``: the decision flipped (or hit the target) within
            the budget.
        norms: float ``(n_eps, n)``: the perturbation's norm in ``norm``; ``inf`` for a
            minimal attack that failed on a point.
        queries: int ``(n,)``: model evaluations spent per point, over all epsilons.
        time_s: wall time of the run in seconds.
        targeted: whether the attack aimed at given target classes.
        extra: attack-specific diagnostics (e.g. mean gradient norm).
    """

    attack: str
    norm: str
    epsilons: list[float] | None
    x_adv: np.ndarray
    success: np.ndarray
    norms: np.ndarray
    queries: np.ndarray
    time_s: float
    targeted: bool = False
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``"fixed"`` or ``"minimal"``."""
        return "minimal" if self.epsilons is None else "fixed"

    @property
    def n_points(self) -> int:
        return int(self.success.shape[1])

    def success_at(self, eps: float) -> np.ndarray:
        """Bool ``(n,)``: an adversarial input was found with norm at most ``eps``."""
        if self.epsilons is None:
            tol = 1e-6 * max(1.0, eps)
            return self.success[0] & (self.norms[0] <= eps + tol)
        for i, e in enumerate(self.epsilons):
            if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12):
                return self.success[i]
        raise BastionError(
            f"{self.attack} was run at epsilons {self.epsilons}, not at {eps}",
            hint="run it again with that epsilon in the list",
        )

    def x_adv_at(self, eps: float) -> np.ndarray:
        """The adversarial inputs for budget ``eps`` (the clean input where none was found
        within ``eps`` for a minimal attack)."""
        if self.epsilons is None:
            raise BastionError("x_adv_at needs a fixed-epsilon result; use x_adv[0]")
        for i, e in enumerate(self.epsilons):
            if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12):
                return self.x_adv[i]
        raise BastionError(f"{self.attack} was not run at epsilon {eps}")

    def robust_accuracy(self, eps: float) -> float:
        """Share of points on which no adversarial input was found within ``eps``."""
        s = self.success_at(eps)
        return float(1.0 - s.mean()) if s.size else float("nan")


def check_epsilons(epsilons: Sequence[float] | float) -> list[float]:
    """Validate an epsilon list: non-empty, finite, non-negative, sorted ascending."""
    if isinstance(epsilons, int | float):
        epsilons = [float(epsilons)]
    eps = [float(e) for e in epsilons]
    if not eps:
        raise BastionError("the epsilon list is empty", hint="give at least one, e.g. 0.1")
    for e in eps:
        if not math.isfinite(e) or e < 0:
            raise BastionError(f"epsilon must be a finite number >= 0, got {e}")
    return sorted(eps)


def check_norm(norm: str) -> str:
    n = str(norm).lower()
    if n not in NORMS:
        raise BastionError(f"unknown norm {norm!r}", hint="use linf or l2")
    return n


class Attack(ABC):  # noqa: B024 - the abstract run() is on the two subclasses
    """Common base: a name and a seed; subclasses define ``run``."""

    name: str = "attack"
    norm: str = "linf"
    white_box: bool = True

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()))
        return f"{type(self).__name__}({params})"


@dataclass
class EpsilonContext:
    """What the base class hands an attack's per-epsilon hook.

    Attributes:
        model: the model being attacked.
        logits: the model's differentiable logits function (``None`` for a black-box
            attack, which only calls ``model.predict_proba``).
        bounds: the model's input bounds ``(lo, hi)``.
        eps_index: position of this epsilon in the run's (ascending) list.
        idx: indices (into the whole batch) of the points this call attacks; use them for
            ``counter.add``.
        clean_logits: the model's output at the clean points ``idx`` (logits for a
            white-box attack, probabilities for a black-box one), computed once per run.
        counter: the run's :class:`~bastion.attacks._torch.QueryCounter`.
        gen: a ``torch.Generator`` seeded with the attack's seed, shared by all epsilons
            of the run.
        rng: a NumPy ``Generator`` seeded likewise.
        prng: per-point random numbers (:class:`~bastion.attacks._rng.PointRandom`) for
            the whole batch of the run (index it with ``idx``), keyed by the attack's seed,
            each point's id and the epsilon's position: draw from it (not from ``gen`` or
            ``rng``) so a point's result does not depend on the batch it is in.
    """

    model: Any
    logits: Any
    bounds: tuple[float, float]
    eps_index: int
    idx: Any
    clean_logits: Any
    counter: Any
    gen: Any
    rng: np.random.Generator
    prng: Any = None


class FixedEpsilonAttack(Attack):
    """An attack with a perturbation budget: ``run(model, x, y, epsilons=[...])``.

    Subclasses implement :meth:`attack_epsilon` (one epsilon, a batch of tensors); the
    inherited :meth:`run` owns the epsilon loop, the clean pass, clipping and
    verification. ``white_box`` decides whether the clean pass uses the model's
    gradients (and ``attack_epsilon`` gets ``ctx.logits``) or only ``predict_proba``.
    """

    seed: int = 0

    def run(
        self,
        model: object,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epsilons: Sequence[float],
        target: np.ndarray | None = None,
        point_ids: np.ndarray | None = None,
    ) -> AttackResult:
        """Attack ``x`` (labels ``y``, optional ``target`` classes) at every epsilon.

        ``point_ids`` (one integer per point; default ``0..n-1``) key each point's random
        numbers: a point with the same id gets the same result in any batch.

        Do not override: implement :meth:`attack_epsilon`. (A wrapper that hands the whole
        run to another attack, such as a transfer attack, may still override it.)
        """
        from bastion.attacks._torch import run_attack_epsilons

        return run_attack_epsilons(self, model, x, y, epsilons=epsilons, target=target,
                                   point_ids=point_ids)

    def attack_epsilon(
        self, ctx: EpsilonContext, x: Any, y: Any, target: Any | None, eps: float
    ) -> tuple[Any, Any]:
        """Attack the points ``x`` (float tensor), labels ``y`` (int64 tensor), optional
        ``target`` at budget ``eps > 0``; return ``(x_adv, success)`` tensors. ``x_adv``
        outside the budget or the bounds is projected back by the base class (and its
        success re-checked); queries go to ``ctx.counter`` at ``ctx.idx``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement attack_epsilon")

    def extra_info(self) -> dict[str, object]:
        """Attack-specific entries for ``AttackResult.extra`` (settings worth reporting)."""
        return {}


class MinimalAttack(Attack):
    """An attack that looks for the smallest flipping perturbation: ``run(model, x, y)``."""

    @abstractmethod
    def run(
        self,
        model: object,
        x: np.ndarray,
        y: np.ndarray,
        *,
        target: np.ndarray | None = None,
    ) -> AttackResult:
        """Run the attack; see the class docstring."""
