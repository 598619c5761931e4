"""Several seeds of one training recipe: each result, the median and the spread, and one
model kept on held-out (validation) data, never on the test set.

One training run of fast adversarial training is a draw: floating-point differences
between CPUs (and the seed) decide whether catastrophic overfitting strikes. So a number
worth printing is a median over seeds with its spread, and the model worth keeping is the
one that does best on data no run trained on and the test set never saw.

- :func:`derive_seeds` gives the per-seed seeds, deterministically from one seed: the seed
  itself first (so one seed is the single run), then ``seed + 1000 * i``.
- :func:`split_validation` holds out a validation part of the *training* data (the same
  points for every seed; no seed trains on them).
- :func:`train_seeds` trains one recipe per seed, scores each model on the validation
  part (clean and PGD accuracy at the training budget) and keeps the best.
- :func:`spread` summarises a list of numbers: median, min, max, quartiles.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bastion._util import torch_generator
from bastion.attacks.evasion.pgd import pgd_tensor
from bastion.errors import BastionError

MAX_SEEDS = 50


def derive_seeds(seed: int, n: int) -> list[int]:
    """``n`` seeds from ``seed``: ``[seed, seed + 1000, seed + 2000, ...]``."""
    check_n_seeds(n)
    return [int(seed) + 1000 * i for i in range(int(n))]


def check_n_seeds(n: Any) -> int:
    """``n`` as a whole number of seeds in ``1..MAX_SEEDS``, or one clear error."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= MAX_SEEDS:
        raise BastionError(f"seeds must be a whole number from 1 to {MAX_SEEDS}, got {n!r}",
                           hint="e.g. --seeds 3 trains three seeds and keeps the best on "
                           "validation data")
    return int(n)


def split_validation(x: np.ndarray, y: np.ndarray, *, seed: int, fraction: float = 0.1,
                     max_points: int = 1000, min_train: int = 8
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_fit, y_fit, x_val, y_val)``: a seeded random ``fraction`` of the training data
    (at most ``max_points``) held out for validation."""
    if not (math.isfinite(fraction) and 0.0 < fraction < 1.0):
        raise BastionError(f"the validation fraction must be in (0, 1), got {fraction}")
    n = len(x)
    n_val = max(1, min(int(max_points), int(round(n * fraction))))
    if n - n_val < min_train:
        raise BastionError(f"only {n} training points: too few to hold out validation data "
                           "for choosing among seeds",
                           hint="give more training data or train one seed")
    perm = np.random.default_rng(int(seed) + 104729).permutation(n)
    vi, ti = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return x[ti], y[ti], x[vi], y[vi]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the quartiles of ``values`` (NaNs ignored)."""
    a = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(a) == 0:
        return {"n": 0}
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"n": int(len(a)), "median": float(med), "min": float(a.min()),
            "max": float(a.max()), "q1": float(q1), "q3": float(q3)}


def robust_accuracy(model: Any, x: np.ndarray, y: np.ndarray, *, eps: float, norm: str,
                    steps: int = 20, seed: int = 0, batch: int = 500) -> tuple[float, float]:
    """``(clean, robust)`` accuracy of a torch model under PGD-``steps`` (random start)."""
    if len(x) == 0:
        return float("nan"), float("nan")
    model.module.eval()
    g = torch_generator(seed)
    ok_clean = ok_rob = 0
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch], dtype=np.float32))
        yb = torch.from_numpy(np.asarray(y[i:i + batch], dtype=np.int64))
        with torch.no_grad():
            ok_clean += int((model.logits(xb).argmax(1) == yb).sum())
        if eps > 0:
            xa = pgd_tensor(model, xb, yb, eps=eps, norm=norm, steps=steps,
                            random_start=True, generator=g)
            with torch.no_grad():
                ok_rob += int((model.logits(xa).argmax(1) == yb).sum())
    n = len(x)
    return ok_clean / n, (ok_rob / n if eps > 0 else ok_clean / n)


@dataclass
class SeedRun:
    """One seed's training and its validation score."""

    seed: int
    val_clean_accuracy: float
    val_robust_accuracy: float
    train_s: float
    epochs_run: int = 0
    best_epoch: int = 0
    stopped_early: bool = False
    ended_on_best: bool = False
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)


@dataclass
class SeedsOutcome:
    """All seeds' runs, their models, and which one is kept (index into ``runs``)."""

    runs: list[SeedRun]
    models: list[Any]
    kept: int
    n_val: int
    histories: list[list[Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        return self.models[self.kept]

    def summary(self, *, eps: float, val_steps: int) -> dict[str, Any]:
        """JSON for reports: each seed, the median and spread, the kept seed and why."""
        keys = ["val_clean_accuracy", "val_robust_accuracy", "train_s"]
        stats = {k: spread([getattr(r, k) for r in self.runs]) for k in keys}
        test_keys = sorted({k for r in self.runs for k in r.test})
        for k in test_keys:
            stats[f"test_{k}"] = spread([r.test.get(k, float("nan")) for r in self.runs])
        return {
            "n_seeds": len(self.runs),
            "seeds": [r.seed for r in self.runs],
            "runs": [vars(r) for r in self.runs],
            "stats": stats,
            "kept_seed": self.runs[self.kept].seed,
            "selection": (f"highest PGD-{val_steps} accuracy at eps {eps:g} (then clean "
                          f"accuracy) on {self.n_val} validation points held out of the "
                          "training data; no seed trained on them and the test set played "
                          "no part"),
        }


def train_seeds(
    make_trainer: Callable[[int], Any],
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seeds: Sequence[int],
    eps: float,
    norm: str = "linf",
    split_seed: int = 0,
    val_fraction: float = 0.1,
    val_max: int = 1000,
    val_steps: int = 20,
    on_epoch: Callable[[Any], None] | None = None,
    on_seed: Callable[[SeedRun], None] | None = None,
) -> SeedsOutcome:
    """Train ``make_trainer(seed).fit(model, ...)`` for every seed on the training data
    minus a validation part, score each on that part, keep the best.

    ``make_trainer`` returns an object with ``fit(model, (x, y), on_epoch=...)`` and the
    :class:`~bastion.defend.training.AdversarialTrainer` fitted attributes.
    """
    if not seeds:
        raise BastionError("no seeds to train")
    x_fit, y_fit, x_val, y_val = split_validation(x, y, seed=split_seed,
                                                  fraction=val_fraction, max_points=val_max)
    runs: list[SeedRun] = []
    models: list[Any] = []
    histories: list[list[Any]] = []
    for s in seeds:
        tr = make_trainer(int(s))
        t0 = time.perf_counter()
        m = tr.fit(model, (x_fit, y_fit), on_epoch=on_epoch)
        train_s = time.perf_counter() - t0
        clean, robust = robust_accuracy(m, x_val, y_val, eps=eps, norm=norm,
                                        steps=val_steps, seed=split_seed + 7)
        run = SeedRun(seed=int(s), val_clean_accuracy=clean, val_robust_accuracy=robust,
                      train_s=train_s, epochs_run=len(tr.history_),
                      best_epoch=int(getattr(tr, "best_epoch_", 0)),
                      stopped_early=bool(getattr(tr, "stopped_early_", False)),
                      ended_on_best=bool(getattr(tr, "ended_on_best_", False)),
                      recoveries=list(getattr(tr, "recoveries_", [])))
        runs.append(run)
        models.append(m)
        histories.append(list(tr.history_))
        if on_seed is not None:
            on_seed(run)
    kept = max(range(len(runs)), key=lambda i: (runs[i].val_robust_accuracy,
                                                runs[i].val_clean_accuracy, -i))
    return SeedsOutcome(runs=runs, models=models, kept=kept, n_val=len(x_val),
                        histories=histories)
