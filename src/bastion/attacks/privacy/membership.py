"""Membership inference: was this sample in the model's training set?

Three attacks, all returning a :class:`MIAResult` whose ``scores`` are higher for
samples judged to be members, scored against known members (``x_in``) and non-members
(``x_out``) with the ROC AUC and the true-positive rate at 0.1% and 1% false-positive
rate (the low-FPR regime Carlini et al. 2022 argue is the one that matters):

- :class:`LossThresholdAttack` (Yeom et al. 2018): score = minus the per-sample loss.
- :class:`ShadowModelAttack` (Shokri et al. 2017): shadow models trained on halves of an
  attacker-owned population set imitate the target; an attack classifier learns, from
  their outputs on their own members and non-members, to tell the two apart. (One attack
  classifier on class-independent features -- the true-class confidence, the loss and the
  sorted top confidences -- rather than the paper's one classifier per class, so that
  small data suffices.)
- :class:`OfflineLiRA` (Carlini et al. 2022, offline variant): shadow models trained
  *without* the target points give, per target, a Gaussian of the logit-scaled confidence
  ``phi = log(p_y / (1 - p_y))`` on OUT models (a global variance, as the paper advises
  for few shadows); the score is the one-sided log-likelihood ``log Phi((phi_target - mu)
  / sigma)``: how unusually confident the target model is on that point.

Shadow models are fresh copies of a white-box target's architecture trained like it
(``epochs``, ``lr``, ``weight_decay``), or built by a ``trainer(x, y, seed) -> model``
you provide (any model with ``predict_proba``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bastion.attacks.privacy._training import fresh_like, train_torch
from bastion.errors import BastionError, DataError

Trainer = Callable[[np.ndarray, np.ndarray, int], Any]


@dataclass
class MIAResult:
    """Scores for known members and non-members, and how well they separate."""

    attack: str
    scores: np.ndarray
    is_member: np.ndarray
    auc: float
    tpr_at_fpr: dict[str, float]
    roc_fpr: list[float]
    roc_tpr: list[float]
    time_s: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)


def mia_metrics(scores: np.ndarray, is_member: np.ndarray,
                fprs: tuple[float, ...] = (0.001, 0.01)) -> dict[str, Any]:
    """ROC AUC, TPR at each FPR in ``fprs`` and a down-sampled ROC curve."""
    from sklearn.metrics import roc_auc_score, roc_curve

    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member).astype(bool)
    if m.all() or not m.any():
        raise DataError("membership metrics need both members and non-members")
    s = np.nan_to_num(s, nan=-1e300, posinf=1e300, neginf=-1e300)
    fpr, tpr, _ = roc_curve(m, s)
    out_tpr = {}
    for a in fprs:
        ok = fpr <= a
        out_tpr[f"{a:g}"] = float(tpr[ok].max()) if ok.any() else 0.0
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 400)).astype(int))
    return {"auc": float(roc_auc_score(m, s)), "tpr_at_fpr": out_tpr,
            "roc_fpr": [float(v) for v in fpr[keep]], "roc_tpr": [float(v) for v in tpr[keep]]}


def _result(name: str, scores: np.ndarray, is_member: np.ndarray, t0: float,
            **extra: object) -> MIAResult:
    met = mia_metrics(scores, is_member)
    return MIAResult(name, np.asarray(scores), np.asarray(is_member), met["auc"],
                     met["tpr_at_fpr"], met["roc_fpr"], met["roc_tpr"],
                     time.perf_counter() - t0, dict(extra))


def _stack(x_in: np.ndarray, y_in: np.ndarray, x_out: np.ndarray, y_out: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(x_in) == 0 or len(x_out) == 0:
        raise DataError("membership inference needs both member and non-member samples")
    x = np.concatenate([np.asarray(x_in), np.asarray(x_out)]).astype(np.float32)
    y = np.concatenate([np.asarray(y_in), np.asarray(y_out)]).astype(np.int64)
    m = np.r_[np.ones(len(x_in), bool), np.zeros(len(x_out), bool)]
    return x, y, m


def _log_probs(model: Any, x: np.ndarray) -> np.ndarray:
    """Log-probabilities, from logits when the model has them (exact near p = 1)."""
    pl = getattr(model, "predict_logits", None)
    if callable(pl):
        z = np.asarray(pl(x), dtype=np.float64)
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))
    p = np.asarray(model.predict_proba(x), dtype=np.float64)
    return np.log(np.clip(p, 1e-300, 1.0))


def logit_confidence(model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``phi = log(p_y) - log(1 - p_y)``, computed stably."""
    lp = _log_probs(model, x)
    rows = np.arange(len(y))
    lpy = lp[rows, y]
    others = lp.copy()
    others[rows, y] = -np.inf
    mx = others.max(1)
    log_rest = mx + np.log(np.exp(others - mx[:, None]).sum(1))
    return lpy - log_rest


def default_trainer(model: Any, *, epochs: int, lr: float, batch_size: int,
                    weight_decay: float) -> Trainer:
    """Shadow models like ``model``: fresh copies of a white-box architecture, or a
    scikit-learn clone of an estimator."""
    est = getattr(model, "estimator", None)
    if est is not None:
        from sklearn.base import clone

        def fit_sklearn(x: np.ndarray, y: np.ndarray, seed: int) -> Any:
            from bastion.models.sklearn_model import SklearnModel

            e = clone(est)
            if "random_state" in e.get_params():
                e.set_params(random_state=seed)
            e.fit(np.asarray(x).reshape(len(x), -1), y)
            return SklearnModel(e, n_classes=model.n_classes, input_shape=model.input_shape,
                                bounds=model.bounds)

        return fit_sklearn

    def fit_torch(x: np.ndarray, y: np.ndarray, seed: int) -> Any:
        m = fresh_like(model, seed=seed, name="shadow")
        return train_torch(m, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                           weight_decay=weight_decay)

    if getattr(model, "module", None) is None:
        raise BastionError(
            f"cannot train shadow models like a {type(model).__name__}",
            hint="pass trainer=(x, y, seed) -> model, or use the loss-threshold attack, "
            "which needs no shadow models",
        )
    return fit_torch


class LossThresholdAttack:
    """Yeom et al.: members have lower loss. Needs only ``predict_proba``."""

    name = "loss-threshold"

    def run(self, model: Any, x_in: np.ndarray, y_in: np.ndarray, x_out: np.ndarray,
            y_out: np.ndarray) -> MIAResult:
        t0 = time.perf_counter()
        x, y, m = _stack(x_in, y_in, x_out, y_out)
        lp = _log_probs(model, x)
        return _result(self.name, lp[np.arange(len(y)), y], m, t0)


def _attack_features(model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    lp = _log_probs(model, x)
    p = np.exp(lp)
    top = -np.sort(-p, axis=1)[:, : min(3, p.shape[1])]
    rows = np.arange(len(y))
    phi = logit_confidence(model, x, y)
    ent = -(p * lp).sum(1)
    return np.column_stack([p[rows, y], lp[rows, y], np.clip(phi, -50, 50), ent, top])


def _shadow_features(item: tuple[int, np.ndarray], *, fit: Trainer, xp: np.ndarray,
                     yp: np.ndarray, seed: int) -> np.ndarray:
    """Train shadow ``s`` on the population rows ``inside`` and return the attack features
    of its outputs on the whole population (one engine task)."""
    s, inside = item
    shadow = fit(xp[inside], yp[inside], seed + 1 + s)
    return _attack_features(shadow, xp, yp)


def _shadow_phi(item: tuple[int, np.ndarray], *, fit: Trainer, xp: np.ndarray,
                yp: np.ndarray, x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Train OUT shadow ``s`` on the population rows ``idx`` and return its logit-scaled
    confidence on the targets (one engine task)."""
    s, idx = item
    shadow = fit(xp[idx], yp[idx], seed + 101 + s)
    return logit_confidence(shadow, x, y)


def _local_engine(engine: Any) -> Any:
    if engine is not None:
        return engine
    from bastion.engine import LocalEngine

    return LocalEngine()


class _ShadowBase:
    def __init__(self, *, n_shadows: int, trainer: Trainer | None, epochs: int, lr: float,
                 batch_size: int, weight_decay: float, seed: int) -> None:
        if int(n_shadows) < 1:
            raise BastionError(f"n_shadows must be at least 1, got {n_shadows}")
        self.n_shadows = int(n_shadows)
        self.trainer = trainer
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.batch_size = int(batch_size)
        self.weight_decay = float(weight_decay)
        self.seed = int(seed)

    def _trainer(self, model: Any) -> Trainer:
        if self.trainer is not None:
            return self.trainer
        return default_trainer(model, epochs=self.epochs, lr=self.lr,
                               batch_size=self.batch_size, weight_decay=self.weight_decay)


class ShadowModelAttack(_ShadowBase):
    """Shokri et al. shadow-model attack; see the module docs.

    Args:
        n_shadows: shadow models (each on a random half of the population set).
        trainer: ``(x, y, seed) -> model``; default trains copies like the target.
        epochs, lr, batch_size, weight_decay: training of default shadows.
        seed: random seed.
    """

    name = "shadow-models"

    def __init__(self, *, n_shadows: int = 4, trainer: Trainer | None = None, epochs: int = 30,
                 lr: float = 3e-3, batch_size: int = 64, weight_decay: float = 0.0,
                 seed: int = 0) -> None:
        super().__init__(n_shadows=n_shadows, trainer=trainer, epochs=epochs, lr=lr,
                         batch_size=batch_size, weight_decay=weight_decay, seed=seed)

    def run(self, model: Any, x_in: np.ndarray, y_in: np.ndarray, x_out: np.ndarray,
            y_out: np.ndarray, *, x_pop: np.ndarray, y_pop: np.ndarray,
            engine: Any = None) -> MIAResult:
        """``x_pop``/``y_pop``: the attacker's own data from the same distribution.
        ``engine`` (a :class:`bastion.engine.Engine`): trains the shadows in parallel
        there; each shadow's half and seed are fixed first, so the result is the same."""
        from sklearn.ensemble import GradientBoostingClassifier

        t0 = time.perf_counter()
        x, y, m = _stack(x_in, y_in, x_out, y_out)
        xp, yp = np.asarray(x_pop, dtype=np.float32), np.asarray(y_pop).astype(np.int64)
        if len(xp) < 4:
            raise DataError("the shadow-model attack needs a population set of at least 4")
        fit = self._trainer(model)
        rng = np.random.default_rng(self.seed)
        labels = []
        for _ in range(self.n_shadows):
            inside = np.zeros(len(xp), bool)
            inside[rng.choice(len(xp), size=len(xp) // 2, replace=False)] = True
            labels.append(inside)
        feats = _local_engine(engine).map(_shadow_features, list(enumerate(labels)),
                                          shared={"fit": fit, "xp": xp, "yp": yp,
                                                  "seed": self.seed})
        clf = GradientBoostingClassifier(random_state=self.seed).fit(
            np.concatenate(feats), np.concatenate(labels))
        scores = clf.predict_proba(_attack_features(model, x, y))[:, 1]
        return _result(self.name, scores, m, t0, n_shadows=self.n_shadows)


class OfflineLiRA(_ShadowBase):
    """Offline likelihood-ratio attack (Carlini et al. 2022); see the module docs.

    Args:
        n_shadows: OUT shadow models (each on a random half of the population set,
            which must not contain the target points).
        fix_variance: one global standard deviation for every target (recommended
            with few shadows) instead of per-example ones.
        trainer, epochs, lr, batch_size, weight_decay, seed: as in
            :class:`ShadowModelAttack`.
    """

    name = "lira-offline"

    def __init__(self, *, n_shadows: int = 8, fix_variance: bool = True,
                 trainer: Trainer | None = None, epochs: int = 30, lr: float = 3e-3,
                 batch_size: int = 64, weight_decay: float = 0.0, seed: int = 0) -> None:
        super().__init__(n_shadows=n_shadows, trainer=trainer, epochs=epochs, lr=lr,
                         batch_size=batch_size, weight_decay=weight_decay, seed=seed)
        self.fix_variance = bool(fix_variance)

    def run(self, model: Any, x_in: np.ndarray, y_in: np.ndarray, x_out: np.ndarray,
            y_out: np.ndarray, *, x_pop: np.ndarray, y_pop: np.ndarray,
            engine: Any = None) -> MIAResult:
        """``x_pop``/``y_pop``: population data that excludes every target point.
        ``engine``: trains the shadows in parallel there (same result)."""
        from scipy.stats import norm

        t0 = time.perf_counter()
        x, y, m = _stack(x_in, y_in, x_out, y_out)
        xp, yp = np.asarray(x_pop, dtype=np.float32), np.asarray(y_pop).astype(np.int64)
        if len(xp) < 4:
            raise DataError("LiRA needs a population set of at least 4 samples")
        fit = self._trainer(model)
        rng = np.random.default_rng(self.seed)
        halves = [rng.choice(len(xp), size=len(xp) // 2, replace=False)
                  for _ in range(self.n_shadows)]
        phis = np.stack(_local_engine(engine).map(
            _shadow_phi, list(enumerate(halves)),
            shared={"fit": fit, "xp": xp, "yp": yp, "x": x, "y": y, "seed": self.seed}))
        phis = np.clip(phis, -50, 50)
        mu = phis.mean(0)
        if self.fix_variance or self.n_shadows < 2:
            sd = np.full(len(x), max(float(phis.std(0).mean()), 1e-3)) if self.n_shadows > 1 \
                else np.full(len(x), max(float(phis.std()), 1e-3))
        else:
            sd = np.maximum(phis.std(0), 1e-3)
        target_phi = np.clip(logit_confidence(model, x, y), -50, 50)
        scores = norm.logcdf(target_phi, loc=mu, scale=sd)
        return _result(self.name, scores, m, t0, n_shadows=self.n_shadows,
                       fix_variance=self.fix_variance)
