"""Attributions (captum): integrated gradients on a white-box CNN satisfy completeness;
KernelSHAP on a black-box tabular model finds the one feature that matters; bad requests
are one clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bastion.errors import BastionError
from bastion.evaluate.explain import _feature_mask, explain, method_for
from bastion.models.sklearn_model import SklearnModel


def test_integrated_gradients_complete_on_the_cnn(digits_cnn, digits_eval):
    x, _ = digits_eval
    out = explain(digits_cnn, x[:4], n_steps=64)
    assert method_for(digits_cnn) == "integrated_gradients"
    logits = digits_cnn.predict_logits(x[:4])
    base = digits_cnn.predict_logits(np.zeros_like(x[:4]))
    for i, e in enumerate(out):
        assert e.method == "integrated_gradients" and e.attribution.shape == x.shape[1:]
        assert e.target == int(logits[i].argmax())
        gap = float(logits[i, e.target] - base[i, e.target])
        assert e.attribution.sum() == pytest.approx(gap, abs=0.05 * max(1.0, abs(gap)))
        assert abs(e.delta) < 0.05 * max(1.0, abs(gap))
    # a chosen target, and a zero attribution where the input equals the baseline
    e = explain(digits_cnn, x[:1], targets=[3])[0]
    assert e.target == 3
    assert np.all(e.attribution[x[0] == 0.0] == 0.0)


def test_kernel_shap_finds_the_feature_that_matters():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(400, 6)).astype(np.float32)
    y = (x[:, 2] > 0.5).astype(int)
    model = SklearnModel(LogisticRegression(C=100).fit(x, y), n_classes=2, input_shape=(6,))
    assert method_for(model) == "kernel_shap"
    xs = np.asarray([[0.1, 0.9, 0.95, 0.2, 0.8, 0.3]], dtype=np.float32)
    e = explain(model, xs, n_samples=300)[0]
    assert e.target == 1 and e.attribution.shape == (6,)
    assert int(np.abs(e.attribution).argmax()) == 2
    # efficiency: the attributions add up to p(x) - p(baseline)
    p = float(model.predict_proba(xs)[0, 1] - model.predict_proba(np.zeros_like(xs))[0, 1])
    assert e.attribution.sum() == pytest.approx(p, abs=0.05)
    # seeded: the same input, the same explanation
    assert np.allclose(explain(model, xs, n_samples=300)[0].attribution, e.attribution)


def test_image_patches_and_bad_requests(digits_cnn, digits_eval):
    m = _feature_mask((1, 28, 28), 64)
    assert m.shape == (1, 28, 28) and len(np.unique(m)) <= 64
    assert len(np.unique(_feature_mask((1, 8, 8), 64))) == 64
    x, _ = digits_eval
    with pytest.raises(BastionError, match="targets must be 1 classes"):
        explain(digits_cnn, x[:1], targets=[10])
    with pytest.raises(BastionError, match="unknown explanation method"):
        explain(digits_cnn, x[:1], method="lime")  # type: ignore[arg-type]
    from sklearn.dummy import DummyClassifier

    bb = SklearnModel(DummyClassifier().fit(np.zeros((4, 3)), [0, 1, 0, 1]), n_classes=2,
                      input_shape=(3,))
    with pytest.raises(BastionError, match="white-box"):
        explain(bb, np.zeros((1, 3), np.float32), method="integrated_gradients")
    # black-box KernelSHAP on the CNN's images works too (patches)
    e = explain(digits_cnn, x[:1], method="kernel_shap", n_samples=100)[0]
    assert e.attribution.shape == x.shape[1:] and np.isfinite(e.attribution).all()
    torch.set_num_threads(1)
