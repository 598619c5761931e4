"""Per-sample poison and label-noise detectors for a labelled training set.

Each detector follows the Detector shape with labels: ``fit(x, y)`` (and then
``scores_`` holds the suspicion score of every fitted sample, higher = more suspicious),
``score(x, y)``, ``calibrate(x_clean, y_clean, fpr=...)`` sets ``threshold_``,
``predict(x, y)`` returns a boolean array. Fitted attributes end with ``_``.

- :class:`SpectralSignatureDetector` (Tran, Li & Madry 2018): for each class, centre the
  penultimate features, take the top right singular vector, score = squared projection.
  Raw squared projections are not comparable across classes (each class has its own
  spread), and a global removal budget needs one scale, so by default the projection is
  standardised by the class's *median and MAD* before squaring (a robust z-score: the
  poisons are a minority of their class, so the median and MAD follow the clean bulk).
  ``normalise="none"`` gives the paper's raw score. Like the paper, it assumes poisons
  are less than half of their (relabelled) class.
- :class:`ActivationClusteringDetector` (Chen et al. 2018): for each class, reduce the
  features to ``n_components`` dims (PCA by default; FastICA as in the paper with
  ``reduce="ica"``), 2-means; a class
  whose smaller cluster holds less than ``size_threshold`` of it is *poisoned* and its
  small cluster is suspicious. Score: ``(d_big - d_small) / (d_big + d_small)`` in
  [-1, 1] (closeness to the small cluster), plus 1 for members of a flagged small
  cluster; ``silhouette_`` holds each class's silhouette score (the paper's second test).
- :class:`ConfidentLearningDetector` (Northcutt et al. 2021, "confident learning"):
  out-of-fold predicted probabilities from K-fold cross-validation; per-class threshold
  ``t_j`` = mean predicted probability of class ``j`` over samples labelled ``j``; a
  sample is a label issue when some other class ``j`` reaches ``t_j`` (the confident
  joint's off-diagonal). Score ``1 - p(given label)`` (+1 for confident-joint issues);
  ``suggested_labels_`` for relabelling.
- :class:`KnnLabelDetector`: share of the ``k`` nearest neighbours (inputs or features)
  whose label disagrees; ``suggested_labels_`` is the neighbours' majority.
- :class:`StripPoisonDetector`: STRIP (Gao et al. 2019) applied to the *training set*
  with the model trained on it: each sample is superimposed on ``n_overlays`` other
  training samples and scored by minus the mean entropy of the model's predictions (a
  sample carrying a learned trigger keeps the target class whatever is overlaid). It
  does not rely on the poisons being a minority of their class, so it works at low and
  high poison rates alike (MNIST BadNets, 10k images: 1.00 / 0.99 of the poisons within
  a 5% removal budget at 1% / 5% poison, all of them within 15% at 10% poison, where
  activation clustering found 0.00 / 0.94 / 0.02 within 5%). It needs a backdoor the
  model has learned (a trigger that dominates the prediction); it is not a label-noise
  filter.
  With a white-box model, each score is raised to the mean score of the sample's ``k``
  nearest same-label neighbours in feature space (poisons collapse together there), which
  catches the few poisons whose own STRIP entropy happened to be high.

Spectral signatures and activation clustering need a white-box model's penultimate
features; the two label-noise filters need only the data (or a black box's outputs);
STRIP needs the model's ``predict_proba`` (its feature smoothing, the features).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bastion.errors import BastionError, DataError, ModelError


def extract_features(model: Any, x: np.ndarray, *, what: str, batch_size: int = 512) -> np.ndarray:
    """Penultimate features of ``x`` from a white-box model, as ``(n, k)``.

    Raises:
        ModelError: the model exposes no ``features`` (a black box); says what works instead.
    """
    fn = getattr(model, "features", None)
    if not callable(fn):
        raise ModelError(
            f"{what} needs the model's penultimate-layer features, and "
            f"{type(model).__name__} does not expose them (a black box)",
            hint="give a white-box TorchModel; on a black box use the label-noise filters "
            "(confident learning, kNN label agreement) and STRIP, which need only outputs",
        )
    xs = np.asarray(x, dtype=np.float32)
    out = []
    with torch.no_grad():
        for i in range(0, len(xs), batch_size):
            f = fn(torch.from_numpy(xs[i : i + batch_size]))
            out.append(f.reshape(f.shape[0], -1).numpy())
    return np.concatenate(out).astype(np.float64)


def _check_xy(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y).astype(np.int64)
    if len(x) == 0:
        raise DataError("no samples to score")
    if y.shape != (len(x),):
        raise DataError(f"labels have shape {y.shape}; expected ({len(x)},)")
    return x, y


class _LabelledDetector(ABC):
    """fit / score / calibrate / predict for detectors that score (x, y) pairs."""

    name = "detector"
    threshold_: float | None = None
    scores_: np.ndarray

    @abstractmethod
    def fit(self, x: np.ndarray, y: np.ndarray) -> _LabelledDetector:
        """Implemented by each subclass."""

    @abstractmethod
    def score(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Implemented by each subclass."""

    def fit_score(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``fit(x, y)`` and return ``scores_``."""
        self.fit(x, y)
        return self.scores_

    def calibrate(self, x_clean: np.ndarray, y_clean: np.ndarray, *, fpr: float = 0.05) -> float:
        """Set ``threshold_`` so that a share ``fpr`` of known-clean samples is flagged."""
        if not 0.0 < fpr < 1.0:
            raise BastionError(f"fpr must be in (0, 1), got {fpr}")
        s = self.score(x_clean, y_clean)
        self.threshold_ = float(np.quantile(s, 1.0 - fpr))
        return self.threshold_

    def predict(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if self.threshold_ is None:
            raise BastionError(f"{self.name}: call calibrate() before predict()")
        return self.score(x, y) > self.threshold_

    def _feats(self, x: np.ndarray) -> np.ndarray:
        model = getattr(self, "model", None)
        if model is None:
            return np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        return extract_features(model, x, what=self.name)


class SpectralSignatureDetector(_LabelledDetector):
    """Spectral signatures (Tran et al. 2018); see the module docs.

    Args:
        model: a white-box model with ``features`` (e.g. the model trained on the
            suspect data). ``None`` uses the flattened inputs as features.
        normalise: ``"robust"`` (median/MAD z-score per class, comparable across
            classes) or ``"none"`` (the paper's raw squared projection).
    """

    name = "spectral-signature"

    def __init__(self, *, model: Any = None, normalise: str = "robust") -> None:
        if normalise not in ("robust", "none"):
            raise BastionError(f"unknown normalise {normalise!r}", hint="use robust or none")
        self.model = model
        self.normalise = normalise

    def fit(self, x: np.ndarray, y: np.ndarray) -> SpectralSignatureDetector:
        x, y = _check_xy(x, y)
        f = self._feats(x)
        self.classes_ = np.unique(y)
        self.means_: dict[int, np.ndarray] = {}
        self.vectors_: dict[int, np.ndarray] = {}
        self.centers_: dict[int, float] = {}
        self.scales_: dict[int, float] = {}
        for c in self.classes_:
            fc = f[y == c]
            mu = fc.mean(0)
            if len(fc) < 2:
                v = np.zeros(f.shape[1])
            else:
                _, _, vt = np.linalg.svd(fc - mu, full_matrices=False)
                v = vt[0]
            proj = (fc - mu) @ v
            med = float(np.median(proj))
            mad = float(np.median(np.abs(proj - med))) * 1.4826
            if mad <= 1e-12:
                mad = float(proj.std()) or 1.0
            self.means_[int(c)], self.vectors_[int(c)] = mu, v
            self.centers_[int(c)], self.scales_[int(c)] = med, mad
        self.scores_ = self._score_feats(f, y)
        return self

    def _score_feats(self, f: np.ndarray, y: np.ndarray) -> np.ndarray:
        s = np.zeros(len(f))
        for c in np.unique(y):
            m = y == c
            if int(c) not in self.vectors_:
                continue  # a class never seen in fit: no evidence
            proj = (f[m] - self.means_[int(c)]) @ self.vectors_[int(c)]
            if self.normalise == "robust":
                proj = (proj - self.centers_[int(c)]) / self.scales_[int(c)]
            s[m] = proj**2
        return s

    def score(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = _check_xy(x, y)
        return self._score_feats(self._feats(x), y)


class ActivationClusteringDetector(_LabelledDetector):
    """Activation clustering (Chen et al. 2018); see the module docs.

    Args:
        model: white-box model with ``features`` (``None``: flattened inputs).
        n_components: dimensions after reduction (10 in the paper).
        reduce: ``"pca"`` (default) or ``"ica"`` (FastICA, as the paper). PCA is the
            default because on our MNIST BadNets benchmark (5% poison, 10k samples)
            FastICA's 2-means split missed most poisons (recall 0.38 at a 5% budget)
            where PCA found 0.98 of them.
        size_threshold: a class is flagged when its smaller cluster holds less than
            this share of it (0.35 in the paper's reference implementation).
        seed: random seed (ICA, k-means).
    """

    name = "activation-clustering"

    def __init__(self, *, model: Any = None, n_components: int = 10, reduce: str = "pca",
                 size_threshold: float = 0.35, seed: int = 0) -> None:
        if reduce not in ("ica", "pca"):
            raise BastionError(f"unknown reduction {reduce!r}", hint="use ica or pca")
        self.model = model
        self.n_components = int(n_components)
        self.reduce = reduce
        self.size_threshold = float(size_threshold)
        self.seed = int(seed)

    def _reducer(self, n: int, d: int) -> Any:
        from sklearn.decomposition import PCA, FastICA

        k = max(1, min(self.n_components, d, n - 1))
        if self.reduce == "ica":
            return FastICA(n_components=k, random_state=self.seed, max_iter=400,
                           whiten="unit-variance")
        return PCA(n_components=k, random_state=self.seed)

    def fit(self, x: np.ndarray, y: np.ndarray) -> ActivationClusteringDetector:
        from sklearn.cluster import KMeans
        from sklearn.metrics import silhouette_score

        x, y = _check_xy(x, y)
        f = self._feats(x)
        self.classes_ = np.unique(y)
        self.reducers_: dict[int, Any] = {}
        self.kmeans_: dict[int, Any] = {}
        self.small_cluster_: dict[int, int] = {}
        self.small_share_: dict[int, float] = {}
        self.silhouette_: dict[int, float] = {}
        self.flagged_classes_: list[int] = []
        for c in self.classes_:
            fc = f[y == c]
            if len(fc) < 4:
                continue
            red = self._reducer(len(fc), fc.shape[1])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = red.fit_transform(fc)
            km = KMeans(n_clusters=2, n_init=10, random_state=self.seed).fit(r)
            counts = np.bincount(km.labels_, minlength=2)
            small = int(np.argmin(counts))
            share = float(counts[small] / counts.sum())
            sil = float(silhouette_score(r, km.labels_)) if counts.min() > 0 else 0.0
            self.reducers_[int(c)], self.kmeans_[int(c)] = red, km
            self.small_cluster_[int(c)], self.small_share_[int(c)] = small, share
            self.silhouette_[int(c)] = sil
            if share < self.size_threshold:
                self.flagged_classes_.append(int(c))
        self.scores_ = self._score_feats(f, y)
        return self

    def _score_feats(self, f: np.ndarray, y: np.ndarray) -> np.ndarray:
        s = np.full(len(f), -1.0)
        for c in np.unique(y):
            if int(c) not in self.kmeans_:
                continue
            m = np.flatnonzero(y == c)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = self.reducers_[int(c)].transform(f[m])
            km = self.kmeans_[int(c)]
            small = self.small_cluster_[int(c)]
            d = km.transform(r)  # distances to the two centres
            d_small, d_big = d[:, small], d[:, 1 - small]
            rel = (d_big - d_small) / np.maximum(d_big + d_small, 1e-12)
            if int(c) in self.flagged_classes_:
                rel = rel + (km.predict(r) == small).astype(float)
            s[m] = rel
        return s

    def score(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = _check_xy(x, y)
        return self._score_feats(self._feats(x), y)


def _default_classifier(seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0,
                                                              random_state=seed))


class ConfidentLearningDetector(_LabelledDetector):
    """Label-noise filter from cross-validated predicted probabilities (confident learning).

    Args:
        classifier: a scikit-learn classifier factory ``seed -> estimator`` trained on
            the flattened inputs (default: standardised logistic regression), or
        pred_probs: precomputed out-of-fold probabilities ``(n, n_classes)`` (e.g. from
            cross-validated copies of your own model); then ``fit`` trains nothing.
        n_folds: K of the K-fold cross-validation.
        seed: random seed of the folds and the classifier.
    """

    name = "confident-learning"

    def __init__(self, *, classifier: Callable[[int], Any] | None = None,
                 pred_probs: np.ndarray | None = None, n_folds: int = 5, seed: int = 0) -> None:
        if int(n_folds) < 2:
            raise BastionError(f"n_folds must be at least 2, got {n_folds}")
        self.classifier = classifier or _default_classifier
        self.pred_probs = pred_probs
        self.n_folds = int(n_folds)
        self.seed = int(seed)

    def fit(self, x: np.ndarray, y: np.ndarray) -> ConfidentLearningDetector:
        from sklearn.model_selection import StratifiedKFold

        x, y = _check_xy(x, y)
        flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        k = int(y.max()) + 1
        if self.pred_probs is not None:
            p = np.asarray(self.pred_probs, dtype=np.float64)
            if p.shape[0] != len(x):
                raise DataError(f"pred_probs has {p.shape[0]} rows for {len(x)} samples")
            k = max(k, p.shape[1])
        else:
            counts = np.bincount(y, minlength=k)
            folds = min(self.n_folds, int(counts[counts > 0].min()))
            if folds < 2:
                raise DataError("a class has a single sample; cross-validation needs two")
            p = np.zeros((len(x), k))
            skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.seed)
            for tr, te in skf.split(flat, y):
                clf = self.classifier(self.seed).fit(flat[tr], y[tr])
                p[np.ix_(te, clf.classes_)] = clf.predict_proba(flat[te])
            self.clf_ = self.classifier(self.seed).fit(flat, y)
        self.pred_probs_ = p
        thr = np.ones(k)
        for j in range(k):
            if (y == j).any():
                thr[j] = p[y == j, j].mean()
        self.thresholds_ = thr
        above = p >= thr[None, :]
        # the confident label: the most probable class among those above threshold
        masked = np.where(above, p, -1.0)
        conf_label = masked.argmax(1)
        has = above.any(1)
        self.issues_ = has & (conf_label != y)
        self.suggested_labels_ = np.where(self.issues_, conf_label, p.argmax(1))
        self.scores_ = 1.0 - p[np.arange(len(y)), y] + self.issues_.astype(float)
        return self

    def score(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = _check_xy(x, y)
        if not hasattr(self, "clf_"):
            raise BastionError("score() needs a detector fitted on data, not on pred_probs")
        flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        p = np.zeros((len(x), len(self.thresholds_)))
        p[:, self.clf_.classes_] = self.clf_.predict_proba(flat)
        above = p >= self.thresholds_[None, :]
        conf = np.where(above, p, -1.0).argmax(1)
        issue = above.any(1) & (conf != y)
        return 1.0 - p[np.arange(len(y)), y] + issue.astype(float)


class KnnLabelDetector(_LabelledDetector):
    """k-nearest-neighbour label agreement; see the module docs.

    Args:
        k: number of neighbours.
        model: optional white-box model whose features define the neighbourhoods
            (default: the flattened inputs).
        standardise: scale each dimension to unit variance first. ``None`` (default):
            only for tabular inputs (2-D ``x``) without a model. Images are left raw:
            standardising pixels blows up near-constant ones (e.g. an empty corner
            where a BadNets trigger sits), which makes triggered samples each other's
            neighbours (on MNIST at 1% BadNets poison, recall at a 5% budget went from
            0.16 standardised to 0.97 raw).
    """

    name = "knn-label"

    def __init__(self, *, k: int = 10, model: Any = None,
                 standardise: bool | None = None) -> None:
        if int(k) < 1:
            raise BastionError(f"k must be at least 1, got {k}")
        self.k = int(k)
        self.model = model
        self.standardise = standardise

    def _prep(self, x: np.ndarray) -> np.ndarray:
        f = self._feats(x)
        return (f - self.mu_) / self.sd_

    def fit(self, x: np.ndarray, y: np.ndarray) -> KnnLabelDetector:
        from sklearn.neighbors import NearestNeighbors

        x, y = _check_xy(x, y)
        f = self._feats(x)
        std = self.standardise
        if std is None:
            std = self.model is None and np.asarray(x).ndim == 2
        if std:
            self.mu_, self.sd_ = f.mean(0), f.std(0) + 1e-8
        else:
            self.mu_, self.sd_ = np.zeros(f.shape[1]), np.ones(f.shape[1])
        self.ref_ = (f - self.mu_) / self.sd_
        self.y_ = y.copy()
        k = min(self.k, len(x) - 1)
        if k < 1:
            raise DataError("kNN label agreement needs at least two samples")
        self.nn_ = NearestNeighbors(n_neighbors=k + 1).fit(self.ref_)
        _, idx = self.nn_.kneighbors(self.ref_)
        idx = idx[:, 1:]  # drop the point itself
        self.scores_, self.suggested_labels_ = self._vote(idx, y)
        return self

    def _vote(self, idx: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ny = self.y_[idx]
        score = (ny != y[:, None]).mean(1)
        k = int(self.y_.max()) + 1
        votes = np.apply_along_axis(lambda r: np.bincount(r, minlength=k), 1, ny)
        return score, votes.argmax(1)

    def score(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = _check_xy(x, y)
        _, idx = self.nn_.kneighbors(self._prep(x), n_neighbors=min(self.k, len(self.y_)))
        return self._vote(idx, y)[0]


class StripPoisonDetector(_LabelledDetector):
    """STRIP entropy of every training sample under the model trained on them; see the
    module docs.

    Args:
        model: the model trained on the suspect data (``predict_proba`` and ``bounds``;
            a black box works).
        n_overlays: training samples superimposed on each sample (model queries per sample).
        k: feature-space neighbours (same label, the sample included) whose mean score
            lifts a sample's own score, when the model exposes ``features``; ``k=1`` or a
            black box: the sample's own score only.
        mode / alpha: how inputs are superimposed (see
            :class:`~bastion.detect.backdoor.StripDetector`).
        seed: random seed of the overlays.

    ``scores_`` (higher = more suspicious) are minus a mean entropy (in nats), so they
    are on one scale across classes and a global removal budget ranks them directly; a
    fixed threshold such as ``-0.05`` (mean entropy under 0.05) flagged 0.26% of an
    unpoisoned MNIST set and 96-100% of BadNets poisons in our benchmark. ``entropy_``
    keeps each sample's own mean entropy.
    """

    name = "strip"

    def __init__(self, *, model: Any, n_overlays: int = 10, k: int = 5, mode: str = "add",
                 alpha: float = 0.5, seed: int = 0) -> None:
        if model is None or not callable(getattr(model, "predict_proba", None)):
            raise ModelError("the strip detector needs the model trained on the data "
                             "(anything with predict_proba)",
                             hint="give --model; without a model use confident-learning or knn")
        if int(k) < 1:
            raise BastionError(f"k must be at least 1, got {k}")
        self.model = model
        self.n_overlays = int(n_overlays)
        self.k = int(k)
        self.mode = mode
        self.alpha = float(alpha)
        self.seed = int(seed)

    def _strip(self) -> Any:
        from bastion.detect.backdoor import StripDetector

        return StripDetector(model=self.model, n_overlays=self.n_overlays, mode=self.mode,
                             alpha=self.alpha, seed=self.seed)

    def _smooth(self, own: np.ndarray, f: np.ndarray | None, y: np.ndarray,
                ref_f: np.ndarray | None, ref_y: np.ndarray, ref_s: np.ndarray,
                self_included: bool) -> np.ndarray:
        if f is None or ref_f is None or self.k <= 1:
            return own
        from sklearn.neighbors import NearestNeighbors

        out = own.copy()
        for c in np.unique(y):
            m = np.flatnonzero(y == c)
            r = np.flatnonzero(ref_y == c)
            kk = min(self.k - (0 if self_included else 1), len(r))
            if kk < 1:
                continue
            nb = NearestNeighbors(n_neighbors=kk).fit(ref_f[r]).kneighbors(f[m])[1]
            neigh = ref_s[r][nb].sum(1)
            mean = neigh / kk if self_included else (neigh + own[m]) / (kk + 1)
            out[m] = np.maximum(own[m], mean)
        return out

    def _features_or_none(self, x: np.ndarray) -> np.ndarray | None:
        if self.k <= 1 or not callable(getattr(self.model, "features", None)):
            return None
        return extract_features(self.model, x, what=self.name)

    def fit(self, x: np.ndarray, y: np.ndarray) -> StripPoisonDetector:
        x, y = _check_xy(x, y)
        if len(x) < 2:
            raise DataError("STRIP needs at least two training samples to overlay")
        self.strip_ = self._strip().fit(np.asarray(x, dtype=np.float32))
        self.entropy_ = self.strip_.entropy(x)
        own = -self.entropy_
        f = self._features_or_none(x)
        self.ref_f_, self.ref_y_, self.ref_s_ = f, y.copy(), own
        self.scores_ = self._smooth(own, f, y, f, y, own, self_included=True)
        return self

    def score(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = _check_xy(x, y)
        if not hasattr(self, "strip_"):
            raise BastionError("strip: call fit(x, y) before score()")
        own = self.strip_.score(x)
        f = self._features_or_none(x) if self.ref_f_ is not None else None
        return self._smooth(own, f, y, self.ref_f_, self.ref_y_, self.ref_s_,
                            self_included=False)


DETECTORS: dict[str, type[_LabelledDetector]] = {
    "spectral": SpectralSignatureDetector,
    "activation-clustering": ActivationClusteringDetector,
    "confident-learning": ConfidentLearningDetector,
    "knn": KnnLabelDetector,
    "strip": StripPoisonDetector,
}
WHITE_BOX_DETECTORS = ("spectral", "activation-clustering")
BLACK_BOX_DETECTORS = ("confident-learning", "knn")
MODEL_OUTPUT_DETECTORS = ("strip",)  # need the trained model's outputs, not its features
