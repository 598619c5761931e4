"""Extraction-pattern detection on a client's query stream (PRADA, Juuti et al. 2019).

Natural queries from one client are spread like natural data: the distance from each
new query to the closest earlier one is roughly normally distributed. Extraction
attacks that synthesise queries (perturbations of seeds, Jacobian augmentation, random
noise) produce many tiny distances next to large ones. PRADA keeps, per predicted class,
a *growing set* of the client's queries; each new query's minimum L2 distance to its
class's growing set joins the distance set ``D`` (and the query joins the growing set
when that distance is above the class's threshold ``mean - std`` of the growing set's
distances); a Shapiro-Wilk test on ``D`` whose statistic ``W`` falls below ``delta``
raises the alarm.

Natural streams are not exactly normal either: the distances mix per-class distributions
(near-duplicate digits such as 1s give a left tail) and shrink as the growing sets fill,
so on benign MNIST streams ``W`` wanders between about 0.88 and 0.99, lowest in the first
few dozen distances. A fixed ``delta=0.9`` tested from 50 distances therefore raised
false alarms on 1-2 of 5 benign streams in our benchmark; test from 100 distances (the
default here) and set ``delta`` with :meth:`PradaDetector.calibrate` on benign streams
from the same source, at a stated false-alarm rate.

:class:`PradaDetector` is streaming (``update(query, label)`` then ``.drift_detected``,
as River's detectors); :class:`QueryStreamMonitor` keeps one detector per client.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from bastion.errors import BastionError


class _Rows:
    """A growing set of equal-length vectors in one amortised-doubling array, with their
    squared norms: the distance from a query to all of them is one matrix-vector product
    (``|g|^2 - 2 g.x + |x|^2``), with no per-query copy."""

    __slots__ = ("_a", "_sq", "_n")

    def __init__(self, first: np.ndarray) -> None:
        self._a = np.empty((16, first.size), dtype=np.float64)
        self._sq = np.empty(16, dtype=np.float64)
        self._n = 0
        self.add(first)

    def __len__(self) -> int:
        return self._n

    def add(self, x: np.ndarray) -> None:
        if self._n == len(self._a):
            self._a = np.concatenate([self._a, np.empty_like(self._a)])
            self._sq = np.concatenate([self._sq, np.empty_like(self._sq)])
        self._a[self._n] = x
        self._sq[self._n] = float(x @ x)
        self._n += 1

    def view(self) -> np.ndarray:
        return self._a[: self._n]

    def min_dist(self, x: np.ndarray) -> float:
        """Euclidean distance from ``x`` to the nearest vector of the set."""
        n = self._n
        d2 = self._sq[:n] - 2.0 * (self._a[:n] @ x)
        return math.sqrt(max(float(d2.min()) + float(x @ x), 0.0))


class _Floats:
    """A growing list of floats in one amortised-doubling array (a window of it is a
    view, not a copy)."""

    __slots__ = ("_a", "_n")

    def __init__(self) -> None:
        self._a = np.empty(64, dtype=np.float64)
        self._n = 0

    def append(self, v: float) -> None:
        if self._n == len(self._a):
            self._a = np.concatenate([self._a, np.empty_like(self._a)])
        self._a[self._n] = v
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def last(self, k: int) -> np.ndarray:
        """The last ``k`` values (a view)."""
        return self._a[max(self._n - k, 0) : self._n]

    def __getitem__(self, i: Any) -> Any:
        return self._a[: self._n][i]

    def __iter__(self) -> Any:
        return iter(self._a[: self._n].tolist())


class PradaDetector:
    """One client's query stream; see the module docs.

    Args:
        delta: alarm when the Shapiro-Wilk statistic ``W`` of the distance set is below
            this (``calibrate`` can set it from benign streams).
        min_queries: distances needed before testing (the test needs at least 3; ``W``
            of a few dozen natural distances swings widely, so the default waits for 100).
        window: test on at most the last ``window`` distances (bounds the cost).
    """

    name = "prada"

    def __init__(self, *, delta: float = 0.9, min_queries: int = 100, window: int = 2000) -> None:
        if not 0.0 < float(delta) < 1.0:
            raise BastionError(f"delta must be in (0, 1), got {delta}")
        if int(min_queries) < 3:
            raise BastionError("min_queries must be at least 3 (Shapiro-Wilk needs 3 values)")
        self.delta = float(delta)
        self.min_queries = int(min_queries)
        self.window = int(window)
        self.reset()

    def reset(self) -> PradaDetector:
        self.growing_: dict[int, _Rows] = {}
        # per class: count, sum and sum of squares of the distances that grew the set
        # (their mean minus their standard deviation is the class's threshold)
        self.growing_dists_: dict[int, list[float]] = {}
        self.thresholds_: dict[int, float] = {}
        self.distances_ = _Floats()
        self.n_queries_ = 0
        self.w_: float = 1.0
        self.detected_at_: int | None = None
        return self

    @property
    def drift_detected(self) -> bool:
        """True once the stream has looked like an extraction attack."""
        return self.detected_at_ is not None

    def update(self, query: np.ndarray, label: int | None = None, *,
               test: bool = True) -> PradaDetector:
        """Add one query (and the model's predicted label for it, when known).

        ``test=False`` only records the query's distance; call :meth:`test` after the
        last query of a batch (one Shapiro-Wilk test per batch instead of per query)."""
        x = np.asarray(query, dtype=np.float64).reshape(-1)
        c = 0 if label is None else int(label)
        self.n_queries_ += 1
        g = self.growing_.get(c)
        if g is None or len(g) == 0:
            self.growing_[c] = _Rows(x)
            self.growing_dists_[c] = [0.0, 0.0, 0.0]
            self.thresholds_[c] = 0.0
            return self
        d = g.min_dist(x)
        self.distances_.append(d)
        if d > self.thresholds_[c]:
            g.add(x)
            gd = self.growing_dists_[c]
            gd[0] += 1
            gd[1] += d
            gd[2] += d * d
            mean = gd[1] / gd[0]
            std = math.sqrt(max(gd[2] / gd[0] - mean * mean, 0.0))
            self.thresholds_[c] = max(self.thresholds_[c], mean - std)
        if test:
            self.test()
        return self

    def test(self) -> PradaDetector:
        """Run the Shapiro-Wilk test on the distances so far (once ``min_queries``
        exist): sets ``w_`` and, below ``delta``, ``detected_at_``."""
        if len(self.distances_) >= self.min_queries:
            self.w_ = self._shapiro(self.distances_.last(self.window))
            if self.w_ < self.delta and self.detected_at_ is None:
                self.detected_at_ = self.n_queries_
        return self

    @staticmethod
    def _shapiro(d: np.ndarray | list[float]) -> float:
        from scipy.stats import shapiro

        a = np.asarray(d)
        if np.ptp(a) == 0:
            return 0.0  # identical distances: nothing natural about that
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the undecorated test (same statistic): scipy's nan-policy wrapper costs ~8x
            # the test itself on every query, and the distances are always finite
            return float(getattr(shapiro, "__wrapped__", shapiro)(a).statistic)

    def run(self, queries: np.ndarray, labels: Iterable[int] | None = None) -> PradaDetector:
        """Feed a whole stream (resetting first)."""
        self.reset()
        labs = [None] * len(queries) if labels is None else list(labels)
        for q, lab in zip(queries, labs, strict=True):
            self.update(q, lab)
        return self

    def score(self, queries: np.ndarray, labels: Iterable[int] | None = None) -> float:
        """``1 - W`` of a whole stream (higher = more suspicious)."""
        det = PradaDetector(delta=self.delta, min_queries=self.min_queries,
                            window=self.window).run(queries, labels)
        if len(det.distances_) < 3:
            return 0.0
        return 1.0 - det._shapiro(det.distances_.last(self.window))

    def min_w(self, queries: np.ndarray, labels: Iterable[int] | None = None) -> float:
        """The lowest ``W`` seen along a stream once ``min_queries`` distances exist."""
        det = PradaDetector(delta=self.delta, min_queries=self.min_queries, window=self.window)
        labs = [None] * len(queries) if labels is None else list(labels)
        lowest = 1.0
        for q, lab in zip(queries, labs, strict=True):
            det.update(q, lab)
            if len(det.distances_) >= self.min_queries:
                lowest = min(lowest, det.w_)
        return lowest

    def calibrate(self, benign_streams: list[np.ndarray],
                  benign_labels: list[Iterable[int]] | None = None, *,
                  fpr: float = 0.0, margin: float = 0.01) -> float:
        """Set ``delta`` from benign streams for a stated false-alarm rate.

        Each benign stream's lowest ``W`` (from ``min_queries`` distances on) is what it
        would have to stay above; ``fpr`` is the share of such streams allowed to alarm.
        ``fpr=0`` puts ``delta`` ``margin`` under the lowest minimum (no false alarm on the
        calibration streams); ``fpr > 0`` uses the ``fpr`` quantile of the minima, less
        ``margin``. Use many streams (e.g. 20 for ``fpr=0.05``) from the same source as
        the clients' traffic: with a handful, the realised false-alarm rate on new
        streams is much higher than the calibration set suggests.
        """
        if not benign_streams:
            raise BastionError("calibrate needs at least one benign query stream")
        if not 0.0 <= float(fpr) < 1.0:
            raise BastionError(f"fpr must be in [0, 1), got {fpr}")
        labs = benign_labels or [None] * len(benign_streams)  # type: ignore[list-item]
        mins = np.array([self.min_w(s, lab) for s, lab in zip(benign_streams, labs,
                                                                strict=True)])
        base = float(np.quantile(mins, fpr)) if fpr > 0 else float(mins.min())
        self.delta = float(np.clip(base - margin, 1e-3, 0.999))
        self.threshold_ = self.delta
        return self.delta


class QueryStreamMonitor:
    """Keep one :class:`PradaDetector` per client id."""

    def __init__(self, **detector_kwargs: Any) -> None:
        self.detector_kwargs = detector_kwargs
        self.clients_: dict[str, PradaDetector] = {}

    def update(self, client: str, query: np.ndarray, label: int | None = None) -> bool:
        """Add a query from ``client``; return whether that client is now flagged."""
        det = self.clients_.get(client)
        if det is None:
            det = self.clients_[client] = PradaDetector(**self.detector_kwargs)
        det.update(query, label)
        return det.drift_detected

    def flagged(self) -> list[str]:
        return sorted(c for c, d in self.clients_.items() if d.drift_detected)
