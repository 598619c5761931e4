"""Poison and label-noise detection on real (small) poisoned data, and sanitising."""

from __future__ import annotations

import numpy as np
import pytest

from bastion.errors import BastionError, ModelError


def _recall_at(scores: np.ndarray, mask: np.ndarray, budget: float) -> float:
    top = np.argsort(-scores)[: int(budget * len(scores))]
    return float(mask[top].sum() / mask.sum())


def test_spectral_signatures_find_most_badnets_poisons(backdoored):
    from sklearn.metrics import roc_auc_score

    from bastion.detect.poison import SpectralSignatureDetector

    model, _, pr = backdoored
    det = SpectralSignatureDetector(model=model).fit(pr.x, pr.y)
    in_target = pr.y == 3
    # within the target class the top singular direction separates the poisons
    assert roc_auc_score(pr.poison_mask[in_target], det.scores_[in_target]) > 0.9
    # across the whole set, a 10% removal budget (2x the poison rate) catches most
    assert _recall_at(det.scores_, pr.poison_mask, 0.10) > 0.6


def test_activation_clustering_scores_poisons_higher(backdoored):
    from sklearn.metrics import roc_auc_score

    from bastion.detect.poison import ActivationClusteringDetector

    model, _, pr = backdoored
    det = ActivationClusteringDetector(model=model, reduce="pca").fit(pr.x, pr.y)
    assert set(det.silhouette_) == set(range(10))
    assert roc_auc_score(pr.poison_mask, det.scores_) > 0.7


def test_label_noise_filters_find_flipped_labels(digits_arrays):
    from bastion.attacks.poisoning import flip_labels
    from bastion.detect.poison import ConfidentLearningDetector, KnnLabelDetector

    x, y, _, _ = digits_arrays
    fl = flip_labels(x, y, rate=0.1, seed=0)
    cl = ConfidentLearningDetector(n_folds=3).fit(fl.x, fl.y)
    knn = KnnLabelDetector(k=10).fit(fl.x, fl.y)
    assert _recall_at(cl.scores_, fl.poison_mask, 0.10) > 0.7
    assert _recall_at(knn.scores_, fl.poison_mask, 0.10) > 0.8
    # suggested labels restore most of the flipped samples' true labels
    assert (knn.suggested_labels_[fl.poison_mask] == fl.y_original[fl.poison_mask]).mean() > 0.8
    # calibrate/predict: a share near fpr of clean-labelled points is flagged
    thr = knn.calibrate(x[:300], y[:300], fpr=0.05)
    assert np.isfinite(thr) and knn.predict(x[:300], y[:300]).mean() <= 0.1


def test_feature_detectors_refuse_a_black_box(bc_logreg, breast_cancer):
    from bastion.detect.poison import ActivationClusteringDetector, SpectralSignatureDetector
    from bastion.models.query import QueryBudget

    ds = breast_cancer
    black_box = QueryBudget(bc_logreg, max_queries=None)
    for det in (SpectralSignatureDetector(model=black_box),
                ActivationClusteringDetector(model=black_box)):
        with pytest.raises(ModelError, match="confident learning"):
            det.fit(ds.x_train, ds.y_train)


def test_label_flip_filter_recovers_accuracy(breast_cancer):
    from sklearn.linear_model import LogisticRegression

    from bastion.attacks.poisoning import flip_labels
    from bastion.defend.sanitize import sanitize
    from bastion.detect.poison import KnnLabelDetector

    ds = breast_cancer
    fl = flip_labels(ds.x_train, ds.y_train, rate=0.3, n_classes=2, seed=0)
    poisoned = fl.dataset(ds)

    def acc(d):
        clf = LogisticRegression(max_iter=5000).fit(d.x_train, d.y_train)
        return float((clf.predict(ds.x_test) == ds.y_test).mean())

    clean_acc, poisoned_acc = acc(ds), acc(poisoned)
    det = KnnLabelDetector(k=10).fit(poisoned.x_train, poisoned.y_train)
    relabelled = sanitize(poisoned, det.scores_, budget=0.35, mode="relabel",
                          new_labels=det.suggested_labels_, detector="knn").dataset
    removed = sanitize(poisoned, det.scores_, budget=0.35, mode="remove").dataset
    assert poisoned_acc < clean_acc - 0.02
    assert acc(relabelled) > poisoned_acc + 0.02
    assert acc(removed) > poisoned_acc + 0.02


def test_sanitize_budget_threshold_and_log(breast_cancer):
    from bastion.defend.sanitize import sanitize

    ds = breast_cancer
    s = np.arange(len(ds.y_train), dtype=float)
    res = sanitize(ds, s, budget=0.1, detector="test")
    n = int(0.1 * len(s))
    assert len(res.log) == n and len(res.dataset.y_train) == len(s) - n
    assert {e.index for e in res.log} == set(range(len(s) - n, len(s)))
    assert all(e.detector == "test" and e.reason for e in res.log)
    assert len(ds.y_train) == len(s)  # the input dataset is untouched
    res2 = sanitize(ds, s, threshold=len(s) - 3.5)
    assert len(res2.log) == 3
    with pytest.raises(BastionError, match="budget"):
        sanitize(ds, s, budget=1.5)
    with pytest.raises(BastionError, match="new_labels"):
        sanitize(ds, s, mode="relabel")
    with pytest.raises(BastionError, match="scores"):
        sanitize(ds, s[:-1])


def test_sanitiser_never_modifies_the_input_file(tmp_path, file_hash):
    from sklearn.datasets import load_breast_cancer

    from bastion.audit import audit_data
    from bastion.data import load_data
    from bastion.defend.sanitize import write_sanitized

    d = load_breast_cancer()
    src = tmp_path / "data.csv"
    rows = [",".join([*(f"f{i}" for i in range(d.data.shape[1])), "label"])]
    rows += [",".join([*(f"{v:.6g}" for v in r), str(t)])
             for r, t in zip(d.data, d.target, strict=True)]
    src.write_text("\n".join(rows) + "\n")
    before = file_hash(src)
    ds = load_data(f"csv:{src}")
    out = tmp_path / "out"
    report, html, res = audit_data(ds, None, budget=0.05, out_dir=out, source_path=src)
    assert file_hash(src) == before
    n = len(ds.y_train)
    cleaned = np.load(out / "cleaned.npz")
    assert len(cleaned["y_train"]) == n - int(0.05 * n)
    assert (out / "removed.csv").read_text().startswith("index,score,detector,reason")
    assert report.n_removed == int(0.05 * n)
    assert "<table" in html
    # a target that would overwrite the original is refused, and the original survives
    with pytest.raises(BastionError, match="overwrite the original"):
        write_sanitized(res, tmp_path, source_path=src, name="data.csv")
    assert file_hash(src) == before


def test_data_audit_with_a_white_box_model(backdoored, digits_arrays, tmp_path):
    from bastion.audit import audit_data
    from bastion.data.dataset import Dataset

    model, _, pr = backdoored
    _, _, xt, yt = digits_arrays
    ds = Dataset("digits-poisoned", pr.x, pr.y, xt, yt, n_classes=10)
    report, html, res = audit_data(ds, model, budget=0.1, out_dir=tmp_path,
                                   poison_mask=pr.poison_mask,
                                   detectors=["spectral", "activation-clustering", "knn"])
    assert report.combined_detector == "activation-clustering"  # auto with features
    by = {d.detector: d for d in report.detectors}
    assert by["sanitiser (activation-clustering)"].recall > 0.5
    assert all(by[d].recall is not None for d in ("spectral", "activation-clustering", "knn"))
    assert report.n_removed == int(0.1 * len(pr.y)) and not report.skipped
    assert (tmp_path / "removed.json").exists() and "<img" in html


def test_strip_poison_detector_finds_badnets_and_spares_clean_data(backdoored, digits_cnn,
                                                                     digits_arrays):
    from bastion.detect.poison import StripPoisonDetector

    model, _, pr = backdoored
    det = StripPoisonDetector(model=model, seed=0).fit(pr.x, pr.y)
    assert det.scores_.shape == (len(pr.y),) and np.isfinite(det.scores_).all()
    # the 5% poisons are ranked first: most fall within a 5% removal budget
    assert _recall_at(det.scores_, pr.poison_mask, 0.05) > 0.7
    # feature smoothing only raises scores
    assert (det.scores_ >= -det.entropy_ - 1e-12).all()
    # at a fixed threshold it flags many poisons but few samples of an unpoisoned set
    assert (det.scores_[pr.poison_mask] > -0.05).mean() > 0.5
    x_tr, y_tr, _, _ = digits_arrays
    clean = StripPoisonDetector(model=digits_cnn, seed=0).fit_score(x_tr, y_tr)
    assert (clean > -0.05).mean() < 0.03
    # scoring new samples works and rejects misuse
    assert det.score(pr.x[:20], pr.y[:20]).shape == (20,)
    with pytest.raises(BastionError):
        StripPoisonDetector(model=model).score(pr.x[:5], pr.y[:5])
    with pytest.raises(ModelError):
        StripPoisonDetector(model=None)


def test_data_audit_defaults_to_strip_with_a_model(backdoored, digits_arrays):
    from bastion.audit import audit_data
    from bastion.data.dataset import Dataset

    model, _, pr = backdoored
    _, _, xt, yt = digits_arrays
    ds = Dataset("digits-poisoned", pr.x, pr.y, xt, yt, n_classes=10)
    report, _, res = audit_data(ds, model, budget=0.05, poison_mask=pr.poison_mask,
                                detectors=["strip", "knn"])
    assert report.combined_detector == "strip"
    by = {d.detector: d for d in report.detectors}
    assert by["sanitiser (strip)"].recall > 0.7
    assert res.n_flagged == int(0.05 * len(pr.y))
    with pytest.raises(ModelError):
        audit_data(ds, None, detectors=["strip"])
