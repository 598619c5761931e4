"""Adversarial-input detectors for the request path.

- :class:`ConfidenceDetector`: low top-class probability (``kind="maxprob"``, score
  ``1 - max p``) or high predictive entropy (``kind="entropy"``). Cheap; catches noisy,
  out-of-distribution and near-boundary inputs (e.g. weak or early-stopped attacks). A
  strong attack that drives the model to a *confident* wrong answer passes it, which is
  why it is combined with the two below.
- :class:`SqueezeDetector`: feature squeezing (Xu, Evans & Qi 2018): the L1 distance
  between the model's probabilities on ``x`` and on squeezed copies of ``x`` (bit-depth
  reduction, median smoothing); adversarial perturbations are fragile, so they disagree
  more. The squeezers are implemented here (bit depth + median filter, the same
  operations as :mod:`bastion.defend.squeeze`) because ``detect`` sits below ``defend``
  in the layer order and may not import it.
- :class:`LearnedAdversarialDetector`: a small classifier (standardised logistic
  regression by default) on the model's logits, penultimate features and squeeze/
  confidence statistics, trained to tell clean inputs from adversarial ones. ``detect``
  may not import ``attacks`` (layering), so the adversarial examples are given to
  ``fit`` (``x_adversarial``) or made by an ``attack`` callable passed to ``__init__``;
  :func:`bastion.runtime.detectors.learned_adversarial_detector` builds one with
  Bastion's PGD.

All follow the Detector shape: ``fit(x_reference)``, ``score(x)`` (higher = more
suspicious), ``calibrate(x_clean, fpr=...)`` -> ``threshold_``, ``predict(x)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bastion.detect._calibrated import CalibratedDetector, as_batch, model_features
from bastion.errors import BastionError, DataError


def _proba(model: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict_proba(x), dtype=np.float64)


def _entropy(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-12, 1.0)
    return -(q * np.log(q)).sum(axis=1)


class ConfidenceDetector(CalibratedDetector):
    """Low confidence as suspicion; see the module docs.

    Args:
        model: any model with ``predict_proba``.
        kind: ``"maxprob"`` (score ``1 - max p``) or ``"entropy"`` (predictive entropy).
    """

    def __init__(self, model: Any, *, kind: str = "maxprob") -> None:
        if kind not in ("maxprob", "entropy"):
            raise BastionError(f"unknown confidence kind {kind!r}", hint="maxprob or entropy")
        self.model = model
        self.kind = kind
        self.name = f"confidence-{kind}"

    def fit(self, x_reference: Any) -> ConfidenceDetector:
        """Record the reference score distribution (``reference_scores_``)."""
        self.reference_scores_ = self.score(x_reference)
        return self

    def score(self, x: Any) -> np.ndarray:
        # a text model takes its list of strings as it is
        text = getattr(self.model, "modality", None) == "text"
        p = _proba(self.model, list(x) if text else as_batch(x))
        return 1.0 - p.max(axis=1) if self.kind == "maxprob" else _entropy(p)

    @staticmethod
    def from_proba(p: np.ndarray, kind: str = "maxprob") -> np.ndarray:
        """The score from probabilities already computed (saves a model call)."""
        p = np.asarray(p, dtype=np.float64)
        return 1.0 - p.max(axis=1) if kind == "maxprob" else _entropy(p)


# ------------------------------------------------------------------------ squeezing


def bit_depth(x: torch.Tensor, bits: int, bounds: tuple[float, float]) -> torch.Tensor:
    """Quantise ``x`` (in ``bounds``) to ``2**bits`` levels."""
    lo, hi = bounds
    levels = 2 ** int(bits) - 1
    u = ((x - lo) / (hi - lo)).clamp(0, 1)
    return torch.round(u * levels) / levels * (hi - lo) + lo


def median_smooth(x: torch.Tensor, size: int) -> torch.Tensor:
    """Median over ``size x size`` windows of each channel of ``(n, C, H, W)`` images."""
    k = int(size)
    if k <= 1:
        return x
    if x.dim() != 4:
        raise BastionError("median smoothing needs image inputs shaped (C, H, W)",
                           hint="use bit-depth squeezing only for tabular data")
    p0, p1 = (k - 1) // 2, k // 2
    mode = "reflect" if min(x.shape[-2:]) > max(p0, p1) else "replicate"
    xp = F.pad(x, (p0, p1, p0, p1), mode=mode)
    patches = xp.unfold(2, k, 1).unfold(3, k, 1)
    return patches.reshape(*patches.shape[:4], k * k).median(dim=-1).values


def _default_squeezers(input_shape: Sequence[int]) -> list[dict[str, int]]:
    if len(input_shape) == 3:
        return [{"bits": 2}]
    return [{"bits": 4}]


class SqueezeDetector(CalibratedDetector):
    """Feature-squeezing disagreement; see the module docs.

    Args:
        model: any model with ``predict_proba``, ``bounds`` and ``input_shape``.
        squeezers: list of ``{"bits": b}``, ``{"median": k}`` or both in one dict
            (applied bits first); default: 2-bit depth for images, 4-bit for tables.
            (On 8x8 digits a 2x2 median filter changes clean images as much as
            adversarial ones; add ``{"median": 2}`` for larger images such as MNIST.)
    """

    name = "squeeze"

    def __init__(self, model: Any, *, squeezers: Sequence[dict[str, int]] | None = None
                 ) -> None:
        self.model = model
        self.squeezers = [dict(s) for s in (squeezers or _default_squeezers(model.input_shape))]
        for s in self.squeezers:
            if not set(s) <= {"bits", "median"} or not s:
                raise BastionError(f"bad squeezer {s}", hint='use {"bits": 4} or {"median": 2}')

    def squeeze(self, x: np.ndarray, s: dict[str, int]) -> np.ndarray:
        if not s.get("median"):
            # bit depth alone, in NumPy: the same float32 arithmetic as :func:`bit_depth`
            # (round half to even) without torch's per-operation overhead on one input
            lo, hi = (float(b) for b in self.model.bounds)
            levels = 2 ** int(s["bits"]) - 1
            a = np.ascontiguousarray(x, dtype=np.float32)
            u = np.clip((a - np.float32(lo)) / np.float32(hi - lo), 0, 1)
            return (np.round(u * np.float32(levels)) / np.float32(levels)
                    * np.float32(hi - lo) + np.float32(lo)).astype(np.float32)
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if s.get("bits"):
            t = bit_depth(t, int(s["bits"]), self.model.bounds)
        if s.get("median"):
            t = median_smooth(t, int(s["median"]))
        return t.numpy()

    def fit(self, x_reference: Any) -> SqueezeDetector:
        """Record the reference score distribution (``reference_scores_``)."""
        self.reference_scores_ = self.score(x_reference)
        return self

    def squeezed(self, x: np.ndarray) -> list[np.ndarray]:
        """The squeezed copies of the batch ``x``, one per squeezer (in order)."""
        return [self.squeeze(x, s) for s in self.squeezers]

    @staticmethod
    def score_from_proba(proba: np.ndarray, squeezed_proba: Sequence[np.ndarray]
                         ) -> np.ndarray:
        """The score from ``p(x)`` and ``[p(s(x)) for each squeezer]`` already computed
        (e.g. in one forward pass with the model's own answer)."""
        p = np.asarray(proba, dtype=np.float64)
        out = np.zeros(len(p))
        for q in squeezed_proba:
            out = np.maximum(out, np.abs(p - np.asarray(q, dtype=np.float64)).sum(1))
        return out

    def score(self, x: Any, *, proba: np.ndarray | None = None) -> np.ndarray:
        """``max_s || p(x) - p(s(x)) ||_1``; pass ``proba`` = ``p(x)`` if known."""
        a = as_batch(x)
        p = _proba(self.model, a) if proba is None else np.asarray(proba, dtype=np.float64)
        return self.score_from_proba(p, [_proba(self.model, q) for q in self.squeezed(a)])


# ------------------------------------------------------------------------ learned


class LearnedAdversarialDetector(CalibratedDetector):
    """A classifier telling clean inputs from adversarial ones; see the module docs.

    Args:
        model: a white-box model (its logits and penultimate features are the inputs of
            the classifier; a black box gets only its probabilities).
        attack: ``x -> x_adversarial``, used by ``fit`` when no ``x_adversarial`` is
            given (e.g. PGD against ``model``).
        use: which statistics to feed the classifier, from ``"logits"``, ``"features"``,
            ``"squeeze"`` (the squeezing disagreement), ``"confidence"``.
        classifier: a scikit-learn classifier factory ``seed -> estimator`` with
            ``predict_proba`` (default: standardised logistic regression).
        seed: random seed.
    """

    name = "learned-adversarial"

    def __init__(self, model: Any, *, attack: Callable[[np.ndarray], np.ndarray] | None = None,
                 use: Sequence[str] = ("logits", "features", "squeeze", "confidence"),
                 classifier: Callable[[int], Any] | None = None, seed: int = 0) -> None:
        bad = set(use) - {"logits", "features", "squeeze", "confidence"}
        if bad or not use:
            raise BastionError(f"unknown detector inputs {sorted(bad)}",
                               hint="use logits, features, squeeze, confidence")
        self.model = model
        self.attack = attack
        self.use = tuple(use)
        self.classifier = classifier
        self.seed = int(seed)
        self._squeeze = SqueezeDetector(model) if "squeeze" in self.use else None

    def _stats(self, x: np.ndarray) -> np.ndarray:
        white = callable(getattr(self.model, "logits", None))
        p = _proba(self.model, x)
        parts: list[np.ndarray] = []
        if "logits" in self.use:
            if white:
                z = model_features(self.model, x, what=self.name, layer="logits")
                zs = np.sort(z, axis=1)[:, ::-1]
                parts += [zs, (zs[:, :1] - zs[:, 1:2])]  # sorted logits and the margin
            else:
                parts.append(np.sort(np.log(np.clip(p, 1e-12, 1)), axis=1)[:, ::-1])
        if "features" in self.use and white and callable(getattr(self.model, "features", None)):
            f = model_features(self.model, x, what=self.name)
            parts += [f, np.linalg.norm(f, axis=1, keepdims=True)]
        if self._squeeze is not None:
            parts.append(self._squeeze.score(x, proba=p)[:, None])
        if "confidence" in self.use:
            parts += [p.max(1, keepdims=True), _entropy(p)[:, None]]
        return np.concatenate(parts, axis=1)

    def fit(self, x_reference: Any, x_adversarial: Any | None = None
            ) -> LearnedAdversarialDetector:
        """Train on clean ``x_reference`` (label 0) and ``x_adversarial`` (label 1), or
        on what ``attack(x_reference)`` makes."""
        xc = as_batch(x_reference, "reference inputs")
        if x_adversarial is None:
            if self.attack is None:
                raise BastionError(
                    "a learned adversarial detector needs adversarial examples",
                    hint="pass x_adversarial=..., or attack=... to the constructor "
                    "(bastion.runtime.detectors.learned_adversarial_detector does it)")
            x_adversarial = self.attack(xc)
        xa = as_batch(x_adversarial, "adversarial inputs")
        if xa.shape[1:] != xc.shape[1:]:
            raise DataError(f"adversarial inputs have shape {xa.shape[1:]}, clean ones "
                            f"{xc.shape[1:]}")
        feats = np.concatenate([self._stats(xc), self._stats(xa)])
        labels = np.concatenate([np.zeros(len(xc), int), np.ones(len(xa), int)])
        if self.classifier is None:
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            clf = make_pipeline(StandardScaler(), LogisticRegression(
                max_iter=2000, C=0.5, random_state=self.seed))
        else:
            clf = self.classifier(self.seed)
        self.classifier_ = clf.fit(feats, labels)
        self.n_train_ = (len(xc), len(xa))
        return self

    def score(self, x: Any) -> np.ndarray:
        """Probability that ``x`` is adversarial, by the trained classifier."""
        if not hasattr(self, "classifier_"):
            raise BastionError(f"{self.name}: call fit() first")
        return np.asarray(self.classifier_.predict_proba(self._stats(as_batch(x)))[:, 1],
                          dtype=np.float64)
