"""The shared shape of the request-time detectors: fit, score, calibrate, predict.

``score(x)`` is higher for more suspicious inputs; ``calibrate(x_clean, fpr=...)`` sets
``threshold_`` to the ``1 - fpr`` quantile of the scores of known-clean inputs, so
about a share ``fpr`` of clean traffic is flagged; ``predict(x)`` is
``score(x) > threshold_``. Fitted attributes end with an underscore. Calibration keeps
the sorted clean scores (``cal_scores_``) and the rate (``fpr_``), so
:func:`threshold_at` can move the threshold to another false-positive rate later (the
healing controller's ``lower_threshold`` / ``raise_threshold``) without new clean data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from bastion.errors import BastionError, DataError, ModelError


@runtime_checkable
class Detector(Protocol):
    """Anything the guard can put in the request path."""

    threshold_: float | None

    def score(self, x: np.ndarray) -> np.ndarray: ...

    def predict(self, x: np.ndarray) -> np.ndarray: ...


class CalibratedDetector(ABC):
    """Base class: ``calibrate`` and ``predict`` from ``score``."""

    name = "detector"
    threshold_: float | None = None

    @abstractmethod
    def fit(self, x_reference: np.ndarray) -> CalibratedDetector:
        """Implemented by each subclass."""

    @abstractmethod
    def score(self, x: np.ndarray) -> np.ndarray:
        """Implemented by each subclass."""

    def calibrate(self, x_clean: np.ndarray, *, fpr: float = 0.01) -> float:
        """Set ``threshold_`` so that a share ``fpr`` of ``x_clean`` scores above it.

        Use clean inputs the detector was *not* fitted on, or the threshold is too low
        for new traffic (a fitted detector scores its own training data too kindly).
        """
        if not 0.0 < float(fpr) < 1.0:
            raise BastionError(f"fpr must be in (0, 1), got {fpr}",
                               hint="e.g. 0.01 flags about 1% of clean traffic")
        s = self.score(x_clean)
        if len(s) < 2:
            raise DataError("calibration needs at least two clean inputs")
        self.threshold_ = float(np.quantile(s, 1.0 - float(fpr), method="higher"))
        self.fpr_ = float(fpr)
        self.cal_scores_ = np.sort(np.asarray(s, dtype=np.float64).reshape(-1))
        return self.threshold_

    def predict(self, x: np.ndarray) -> np.ndarray:
        """True where ``score(x) > threshold_``."""
        if self.threshold_ is None:
            raise BastionError(f"{self.name}: the detector has no threshold",
                               hint="call calibrate(x_clean, fpr=...) first")
        return self.score(x) > self.threshold_

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold_={self.threshold_})"


def threshold_at(det: Any, fpr: float) -> float | None:
    """The threshold ``det`` would have had if calibrated to ``fpr`` on the same clean
    scores (``None`` when it kept none: a detector calibrated some other way)."""
    cs = getattr(det, "cal_scores_", None)
    if cs is None or len(cs) < 2:
        return None
    f = min(max(float(fpr), 0.0), 0.5)
    return float(np.quantile(cs, 1.0 - f, method="higher"))


def as_batch(x: Any, what: str = "inputs") -> np.ndarray:
    """``x`` as a float32 array with a batch dimension; rejects NaN/Inf and empty input."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim < 2:
        raise DataError(f"{what} need a batch dimension, got shape {a.shape}")
    if len(a) == 0:
        raise DataError(f"no {what}")
    if not np.isfinite(a).all():
        raise DataError(f"{what} contain NaN or Inf")
    return a


def flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def model_features(model: Any, x: np.ndarray, *, what: str, layer: str = "features",
                   batch_size: int = 512) -> np.ndarray:
    """Penultimate features (``layer="features"``) or logits of a white-box model."""
    fn = getattr(model, layer if layer == "features" else "logits", None)
    if not callable(fn):
        raise ModelError(
            f"{what} needs the model's {layer}, and {type(model).__name__} does not expose "
            "them (a black box)",
            hint="use on='inputs' or a detector that needs only predict_proba",
        )
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            f = fn(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size],
                                                         dtype=np.float32)))
            out.append(f.reshape(f.shape[0], -1).numpy())
    return np.concatenate(out).astype(np.float64)
