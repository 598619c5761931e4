"""Checks for a retrain on client feedback: poison screening of the feedback set, and the
trigger-agnostic backdoor tests a candidate must pass before it may replace the champion.

Feedback can be a campaign: one client (or many keys of one actor) sends inputs stamped
with a trigger, all labelled with a target class, hoping the retrain learns the trigger.
Nothing here knows the trigger.

Screening (:func:`screen_feedback`), every score from the detectors Bastion already has
(:mod:`bastion.detect.poison`, :mod:`bastion.detect.backdoor`):

- **champion agreement**: does the label agree with the trusted champion's answer?
  A disagreeing label is not poison by itself (under a real drift the champion is wrong,
  which is why we retrain), so it is a *precondition* for removal, never a reason alone;
- **kNN agreement** among the trusted reference and the feedback
  (:class:`~bastion.detect.poison.KnnLabelDetector`; random label flips) and among the
  trusted reference alone;
- **STRIP** (:class:`~bastion.detect.backdoor.StripDetector`) with a *provisional*
  model fine-tuned on the feedback: an input carrying a trigger the provisional model
  learned keeps its class whatever is superimposed (threshold: the ``strip_fpr``
  quantile of trusted reference inputs under the same model);
- **spectral signatures** and **activation clustering** on the provisional model's
  features, per labelled class, over the trusted reference and the feedback together.

A row is removed when the kNN sanitiser flags it, or when its label disagrees with the
champion and STRIP flags it, or when it disagrees and ``min_votes`` of the four
detectors flag it, or when it is a *confident contradiction*: the champion is sure of
another class (probability at least ``confident``) and at least 90% of the input's
nearest trusted reference neighbours vote as the champion does (an in-distribution input
with a wrong label: a targeted flip; a drifted input is neither).
Per target class: a class where at least ``class_min_count`` rows
(and ``class_min_share`` of its rows) were removed that way is a *suspected target*,
and every row labelled with it that the champion disagrees with is removed too (the
campaign's rows that happened to escape the per-row tests).

Gates (pure functions on numbers, tested on constructed inputs):

- :func:`class_absorption`: candidate against champion on the trusted holdout, class by
  class: of the inputs whose answer changed, how many moved *into* class ``t`` against
  how many moved out; a one-sided binomial test (Bonferroni over classes) and a minimum
  count flag a class that suddenly absorbs predictions;
- :func:`paired_trigger_anomaly`: Neural-Cleanse minimal trigger norms of the candidate
  *divided by the champion's* for the same class (same seed, same inputs): an honest
  model may have a naturally small class, a backdoor makes one class much easier to
  reach than it was; MAD anomaly index of the log ratios on the small side above
  ``threshold`` (2, as the paper) and a ratio below ``max_ratio``;
- :func:`strip_excess`: STRIP of the candidate on the feedback it trained on,
  calibrated on the trusted holdout at ``fpr``: per predicted class, more low-entropy
  (trigger-like) inputs than ``fpr`` explains (binomial test, Bonferroni).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bastion.detect.backdoor import mad_anomaly_index


# ---------------------------------------------------------------------------- gates
@dataclass
class ClassTest:
    """Per-class outcome of a gate test (JSON-ready via :meth:`as_dict`)."""

    flagged: list[int]
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"flagged": self.flagged, **self.detail}


def _binom_sf(k: int, n: int, p: float) -> float:
    """P[X >= k] for X ~ Binomial(n, p)."""
    from scipy.stats import binom

    if n <= 0 or k <= 0:
        return 1.0
    return float(binom.sf(k - 1, n, p))


def class_absorption(y_true: np.ndarray, pred_champion: np.ndarray,
                     pred_candidate: np.ndarray, *, n_classes: int, alpha: float = 0.01,
                     min_count: int = 4) -> ClassTest:
    """Does one class absorb predictions it did not get from the champion?

    For each class ``t``: ``into`` = inputs the candidate puts in ``t`` and the champion
    did not, of them ``wrong_into`` with a true class other than ``t``; ``out_of`` = the
    reverse. Under no systematic shift a changed answer is as likely to leave ``t`` as
    to enter it: ``t`` is flagged when ``wrong_into - out_of >= min_count`` and the
    one-sided binomial test of ``wrong_into`` among ``wrong_into + out_of`` changes
    (p = 1/2) is below ``alpha / n_classes``. Also reports each class's share of the
    candidate's and the champion's answers (the confusion-matrix shift).
    """
    y = np.asarray(y_true).astype(np.int64)
    a = np.asarray(pred_champion).astype(np.int64)
    b = np.asarray(pred_candidate).astype(np.int64)
    if not (len(y) == len(a) == len(b)):
        raise ValueError("y_true, pred_champion and pred_candidate need one entry per input")
    flagged: list[int] = []
    rows = []
    for t in range(int(n_classes)):
        into = (b == t) & (a != t)
        wrong_into = int((into & (y != t)).sum())
        out_of = int(((a == t) & (b != t)).sum())
        p = _binom_sf(wrong_into, wrong_into + out_of, 0.5)
        hit = wrong_into - out_of >= min_count and p < alpha / n_classes
        if hit:
            flagged.append(t)
        rows.append({"class": t, "wrong_into": wrong_into, "out_of": out_of,
                     "p_value": p, "share_candidate": float((b == t).mean()) if len(b) else 0.0,
                     "share_champion": float((a == t).mean()) if len(a) else 0.0})
    return ClassTest(flagged, {"classes": rows, "alpha": alpha, "min_count": min_count,
                               "n": len(y)})


def paired_trigger_anomaly(l1_candidate: np.ndarray, l1_champion: np.ndarray, *,
                           threshold: float = 2.0, max_ratio: float = 0.75) -> ClassTest:
    """Classes whose minimal trigger became abnormally easier than the champion's.

    ``ratio_t = L1_candidate[t] / L1_champion[t]``; the MAD anomaly index of
    ``log(ratio)`` across classes (small side only). Flagged: index above ``threshold``
    *and* ratio below ``max_ratio`` (a real shrink, not MAD noise when every class moved
    the same way). Also reports the candidate's own (unpaired) anomaly index, the
    paper's test, for the record.
    """
    c = np.asarray(l1_candidate, dtype=np.float64)
    h = np.asarray(l1_champion, dtype=np.float64)
    if c.shape != h.shape or c.ndim != 1 or len(c) < 3:
        raise ValueError("need one trigger norm per class (at least 3) for both models")
    ratio = c / np.maximum(h, 1e-12)
    lr = np.log(np.maximum(ratio, 1e-12))
    idx = mad_anomaly_index(lr)
    med = float(np.median(lr))
    own = mad_anomaly_index(c)
    own_med = float(np.median(c))
    flagged = [int(t) for t in range(len(c))
               if lr[t] < med and idx[t] > threshold and ratio[t] < max_ratio]
    own_flag = [int(t) for t in range(len(c)) if c[t] < own_med and own[t] > threshold]
    return ClassTest(flagged, {
        "ratio": [round(float(v), 4) for v in ratio],
        "anomaly_index": [round(float(v), 3) for v in idx],
        "candidate_own_index": [round(float(v), 3) for v in own],
        "candidate_own_flagged": own_flag, "threshold": threshold, "max_ratio": max_ratio})


def strip_excess(flagged_mask: np.ndarray, pred_classes: np.ndarray, *, n_classes: int,
                 fpr: float, alpha: float = 0.001, min_count: int = 5) -> ClassTest:
    """Per predicted class, more STRIP-flagged inputs than a false-positive rate ``fpr``
    explains: flagged when the count is at least ``min_count`` and the one-sided
    binomial p-value (``n`` = inputs predicted as that class) is below
    ``alpha / n_classes``."""
    f = np.asarray(flagged_mask, dtype=bool)
    pc = np.asarray(pred_classes).astype(np.int64)
    flagged: list[int] = []
    rows = []
    for t in range(int(n_classes)):
        n = int((pc == t).sum())
        k = int((f & (pc == t)).sum())
        p = _binom_sf(k, n, fpr)
        if k >= min_count and p < alpha / n_classes:
            flagged.append(t)
        if n:
            rows.append({"class": t, "n": n, "low_entropy": k, "p_value": p})
    return ClassTest(flagged, {"classes": rows, "fpr": fpr, "alpha": alpha,
                               "min_count": min_count})


# ------------------------------------------------------------------------ screening
@dataclass
class ScreenReport:
    """What :func:`screen_feedback` removed, and why."""

    remove: np.ndarray
    reasons: list[list[str]]
    suspected_targets: list[int]
    per_class: list[dict[str, Any]]
    flags: dict[str, int]
    params: dict[str, Any] = field(default_factory=dict)

    def summary(self, *, ids: list[Any] | None = None, limit: int = 200) -> dict[str, Any]:
        """JSON-ready: counts, per class table, the first ``limit`` removed rows with
        their reasons (by ``ids`` when given, else by index)."""
        rm = np.flatnonzero(self.remove)
        rows = [{"row": (ids[i] if ids is not None else int(i)), "reasons": self.reasons[i]}
                for i in rm[:limit]]
        return {"n": len(self.remove), "n_removed": int(len(rm)),
                "suspected_targets": self.suspected_targets, "flags": self.flags,
                "per_class": self.per_class, "removed": rows, "params": self.params}


def _safe(fn: Any, default: np.ndarray) -> tuple[np.ndarray, str | None]:
    try:
        return fn(), None
    except Exception as exc:  # a detector that cannot run is reported, not fatal
        return default, f"{type(exc).__name__}: {exc}"


def screen_feedback(champion: Any, x: np.ndarray, y: np.ndarray, *, x_ref: np.ndarray,
                    y_ref: np.ndarray, provisional: Any = None, knn_k: int = 10,
                    max_disagreement: float = 0.5, strip_fpr: float = 0.01,
                    strip_overlays: int = 16, spectral_z: float = 3.0, min_votes: int = 3,
                    class_min_count: int = 5, class_min_share: float = 0.1,
                    confident: float = 0.95, seed: int = 0) -> ScreenReport:
    """Screen labelled feedback ``(x, y)``; see the module docs.

    Args:
        champion: the trusted model now serving (``predict_proba``).
        x_ref / y_ref: trusted reference data (a few hundred rows per class suffice).
        provisional: the champion fine-tuned on the reference plus this feedback (STRIP,
            spectral signatures and activation clustering run on it; ``None``: only the
            label checks run).
        knn_k / max_disagreement: the kNN sanitiser (reference + feedback).
        strip_fpr: STRIP's threshold, as a false-positive rate on the reference.
        spectral_z: robust z-score above which a spectral projection flags a row.
        min_votes: detectors of four (strip, spectral, activation, kNN vs reference)
            that must flag a disagreeing row to remove it without STRIP.
        class_min_count / class_min_share: when a target class is suspected.
    """
    from bastion.detect.backdoor import StripDetector
    from bastion.detect.poison import (
        ActivationClusteringDetector,
        KnnLabelDetector,
        SpectralSignatureDetector,
    )

    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(np.int64)
    n = len(y)
    xr = np.asarray(x_ref, dtype=np.float32)
    yr = np.asarray(y_ref).astype(np.int64)
    zeros = np.zeros(n, dtype=bool)
    errors: dict[str, str] = {}
    if n == 0:
        return ScreenReport(zeros, [], [], [], {}, {})
    pc = np.asarray(champion.predict_proba(x))
    champ_label = pc.argmax(1)
    disagree = champ_label != y
    # a confident contradiction: an in-distribution input (the champion is sure, and the
    # trusted reference's nearest neighbours vote as it does) with another label: what a
    # targeted label flip looks like; a drifted input is neither sure nor near the reference
    from sklearn.neighbors import NearestNeighbors

    kk = min(knn_k, len(yr))
    nb = NearestNeighbors(n_neighbors=kk).fit(xr.reshape(len(xr), -1)).kneighbors(
        x.reshape(n, -1), return_distance=False)
    ref_agree_champ = (yr[nb] == champ_label[:, None]).mean(1)
    contradicted = disagree & (pc.max(1) >= confident) & (ref_agree_champ >= 0.9)
    # kNN sanitiser: the reference and the feedback together (random flips)
    xa, ya = np.concatenate([xr, x]), np.concatenate([yr, y])
    knn = KnnLabelDetector(k=knn_k).fit(xa, ya).scores_[len(yr):] > max_disagreement
    # kNN against the trusted reference only
    knn_ref, err = _safe(lambda: KnnLabelDetector(k=knn_k).fit(xr, yr).score(x, y) > 0.5,
                         zeros)
    if err:
        errors["knn_ref"] = err
    strip = spectral = activation = zeros
    if provisional is not None:
        def _strip() -> np.ndarray:
            det = StripDetector(model=provisional, n_overlays=strip_overlays, seed=seed)
            det.fit(xr)
            rng = np.random.default_rng(seed)
            cal = xr[rng.permutation(len(xr))[: min(len(xr), 500)]]
            det.calibrate(cal, fpr=strip_fpr)
            return det.predict(x)

        def _spectral() -> np.ndarray:
            det = SpectralSignatureDetector(model=provisional).fit(xa, ya)
            return det.scores_[len(yr):] > spectral_z ** 2

        def _activation() -> np.ndarray:
            det = ActivationClusteringDetector(model=provisional, seed=seed).fit(xa, ya)
            return det.scores_[len(yr):] > 1.0  # members of a flagged small cluster

        strip, err = _safe(_strip, zeros)
        if err:
            errors["strip"] = err
        spectral, err = _safe(_spectral, zeros)
        if err:
            errors["spectral"] = err
        activation, err = _safe(_activation, zeros)
        if err:
            errors["activation"] = err
    votes = (strip.astype(int) + spectral.astype(int) + activation.astype(int)
             + knn_ref.astype(int))
    row_hit = disagree & (strip | (votes >= min_votes)) | contradicted
    remove = knn | row_hit
    suspected: list[int] = []
    per_class = []
    for t in np.unique(y):
        m = y == t
        k = int((row_hit & m).sum())
        nt = int(m.sum())
        sus = k >= class_min_count and k >= class_min_share * nt
        if sus:
            suspected.append(int(t))
        per_class.append({"label": int(t), "n": nt, "disagree_champion": int((disagree & m).sum()),
                          "strip": int((strip & m).sum()), "spectral": int((spectral & m).sum()),
                          "activation": int((activation & m).sum()),
                          "knn": int((knn & m).sum()), "knn_reference": int((knn_ref & m).sum()),
                          "confident_contradiction": int((contradicted & m).sum()),
                          "removed_by_rows": int((remove & m).sum()), "suspected_target": sus})
    class_rm = np.isin(y, suspected) & disagree
    remove = remove | class_rm
    for row in per_class:
        row["removed"] = int((remove & (y == row["label"])).sum())
    reasons: list[list[str]] = []
    for i in range(n):
        r = []
        if knn[i]:
            r.append("knn: most neighbours carry another label")
        if row_hit[i]:
            r.append("disagrees with the champion; flagged by " + "+".join(
                nm for nm, f in (("strip", strip), ("spectral", spectral),
                                 ("activation", activation), ("knn_reference", knn_ref),
                                 ("confident_contradiction", contradicted))
                if f[i]))
        if class_rm[i] and not (knn[i] or row_hit[i]):
            r.append(f"label {int(y[i])} is a suspected target class and disagrees with "
                     "the champion")
        reasons.append(r)
    flags = {"disagree_champion": int(disagree.sum()), "knn": int(knn.sum()),
             "confident_contradiction": int(contradicted.sum()),
             "knn_reference": int(knn_ref.sum()), "strip": int(strip.sum()),
             "spectral": int(spectral.sum()), "activation": int(activation.sum())}
    return ScreenReport(remove, reasons, suspected, per_class, flags, {
        "knn_k": knn_k, "max_disagreement": max_disagreement, "strip_fpr": strip_fpr,
        "spectral_z": spectral_z, "min_votes": min_votes,
        "class_min_count": class_min_count, "class_min_share": class_min_share,
        "confident": confident, "provisional_model": provisional is not None,
        **({"errors": errors} if errors else {})})
