"""A request-path outlier detector fast enough for single-item requests.

PyOD's isolation forest and ECOD cost 30-120 ms to score one input (per-tree Python
loops; ECOD re-ranks against the whole training set), which would dominate a guarded
request. :class:`KnnOutlierDetector` is the classic k-nearest-neighbour outlier score
(mean distance to the ``k`` nearest clean reference inputs; PyOD's ``KNN(method="mean")``)
in plain NumPy: one float32 matrix product per batch over inputs centred on the reference
mean (distances do not change under a shift, and centring keeps float32's rounding small:
the scores match a float64 computation to about 1e-6 relative), ~0.03 ms for one input
and ~0.15 ms for 32 against 1,000 references. It follows Bastion's detector contract
(``fit``, ``score``, ``calibrate``, ``threshold_``, ``predict``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bastion.errors import DataError


class KnnOutlierDetector:
    """Mean Euclidean distance to the ``k`` nearest reference inputs (higher = stranger).

    Args:
        k: neighbours.
        max_reference: keep at most this many reference inputs (random subset).
        seed: subset seed.
    """

    name = "outlier-knn"

    def __init__(self, *, k: int = 5, max_reference: int = 1000, seed: int = 0) -> None:
        self.k, self.max_reference, self.seed = int(k), int(max_reference), int(seed)
        self.threshold_: float | None = None

    def _x(self, x: Any) -> np.ndarray:
        a = np.asarray(x, dtype=np.float32)
        return a.reshape(len(a), -1)

    def fit(self, x_reference: Any) -> KnnOutlierDetector:
        r = self._x(x_reference)
        if len(r) <= self.k:
            raise DataError(f"need more than k={self.k} reference inputs, got {len(r)}")
        if len(r) > self.max_reference:
            r = r[np.random.default_rng(self.seed).permutation(len(r))[: self.max_reference]]
        self.ref_ = r
        # centred (in float64, then stored as float32) and transposed once here rather than
        # on every score call
        mu = r.astype(np.float64).mean(0)
        c = r.astype(np.float64) - mu
        self.mean_ = mu
        self.ref_t_ = np.ascontiguousarray(c.T.astype(np.float32))
        self.ref_sq_ = (c ** 2).sum(1).astype(np.float32)
        return self

    def score(self, x: Any) -> np.ndarray:
        """Mean distance of each input to its ``k`` nearest references (fit first)."""
        if not hasattr(self, "ref_t_"):
            raise DataError("fit the detector on reference inputs first")
        try:
            a = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError("inputs must be numbers") from None
        a = a.reshape(len(a), -1) if a.ndim else a.reshape(1, -1)
        if a.shape[1] != len(self.mean_):
            raise DataError(f"inputs have {a.shape[1]} features, the reference has "
                            f"{len(self.mean_)}")
        # centred before the cast, so large offsets do not eat float32's digits
        q = (a - self.mean_).astype(np.float32)
        # |r|^2 - 2 q.r per reference, in place; the row's own |q|^2 is added to the k
        # smallest only (it does not change which they are)
        d2 = q @ self.ref_t_
        d2 *= -2.0
        d2 += self.ref_sq_
        k = min(self.k, d2.shape[1])
        part = np.partition(d2, k - 1, axis=1)[:, :k]
        part += np.einsum("ij,ij->i", q, q)[:, None]
        np.maximum(part, 0.0, out=part)
        np.sqrt(part, out=part)
        return part.mean(1, dtype=np.float64)

    def calibrate(self, x_clean: Any, *, fpr: float = 0.01) -> KnnOutlierDetector:
        s = self.score(x_clean)
        self.threshold_ = float(np.quantile(s, 1.0 - float(fpr)))
        self.fpr_ = float(fpr)
        self.cal_scores_ = np.sort(np.asarray(s, dtype=np.float64))
        return self

    def predict(self, x: Any) -> np.ndarray:
        if self.threshold_ is None:
            raise DataError("calibrate the detector first")
        return self.score(x) > self.threshold_
