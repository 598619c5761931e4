"""FAB (Croce & Hein 2020): targeted (FAB-T, as in AutoAttack) and untargeted, L-inf and L2.

FAB must beat an undefended model, keep every perturbation inside its budget and the
bounds, report only real successes, and spend no more queries than its iterations allow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bastion.attacks import get_attack
from bastion.attacks.evasion.fab import FAB, project_hyperplane_box
from bastion.errors import BastionError


def _norms(x_adv: np.ndarray, x: np.ndarray, norm: str) -> np.ndarray:
    d = (x_adv - x).reshape(len(x), -1)
    return np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)


@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 1.0)])
def test_fab_t_beats_the_undefended_cnn_within_budget(digits_cnn, digits_eval, norm, eps):
    x, y = digits_eval[0][:40], digits_eval[1][:40]
    steps, n_t = 20, 3
    atk = get_attack("fab-t", norm=norm, steps=steps, n_target_classes=n_t)
    r = atk.run(digits_cnn, x, y, epsilons=[0.0, eps])
    clean_ok = digits_cnn.predict_proba(x).argmax(1) == y
    assert r.robust_accuracy(eps) < 0.5 * clean_ok.mean()  # it really breaks the model
    real = _norms(r.x_adv[1], x, norm)
    assert real.max() <= eps + 1e-5
    assert r.x_adv.min() >= 0.0 and r.x_adv.max() <= 1.0
    pred = digits_cnn.predict_proba(r.x_adv[1]).argmax(1)
    np.testing.assert_array_equal(r.success[1], pred != y)  # every claim is real
    # the budget: one clean pass, then two queries per iteration and target class
    assert r.queries.max() <= 1 + 2 * steps * n_t
    assert r.queries[~clean_ok].max(initial=1) == 1  # misclassified points cost one query


def test_fab_t_is_stronger_with_more_steps_and_beats_fgsm(digits_cnn, digits_eval):
    x, y = digits_eval[0][:40], digits_eval[1][:40]
    eps = 0.1
    short = FAB(norm="linf", steps=3, n_target_classes=2).run(digits_cnn, x, y, epsilons=[eps])
    long = FAB(norm="linf", steps=30, n_target_classes=2).run(digits_cnn, x, y, epsilons=[eps])
    fgsm = get_attack("fgsm").run(digits_cnn, x, y, epsilons=[eps])
    assert long.robust_accuracy(eps) <= short.robust_accuracy(eps)
    assert long.robust_accuracy(eps) <= fgsm.robust_accuracy(eps)


def test_untargeted_fab_and_given_targets(digits_cnn, digits_eval):
    x, y = digits_eval[0][:20], digits_eval[1][:20]
    r = get_attack("fab", norm="l2", steps=15).run(digits_cnn, x, y, epsilons=[1.5])
    assert r.robust_accuracy(1.5) < 0.5
    assert r.queries.max() <= 1 + 15 * (10 + 1)
    target = (y + 1) % 10
    t = FAB(norm="linf", steps=20).run(digits_cnn, x, y, epsilons=[0.3], target=target)
    pred = digits_cnn.predict_proba(t.x_adv[0]).argmax(1)
    assert t.success.any()
    np.testing.assert_array_equal(t.success[0], pred == target)


def test_box_projection_reaches_the_plane_inside_the_box():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(50, 30, generator=g)
    w = torch.randn(50, 30, generator=g)
    b = (w * torch.rand(50, 30, generator=g)).sum(1)  # a plane that meets the box
    for norm in ("linf", "l2"):
        d = project_hyperplane_box(t, w, b, norm, (0.0, 1.0))
        z = t + d
        assert z.min() >= -1e-6 and z.max() <= 1 + 1e-6
        torch.testing.assert_close((w * z).sum(1), b, atol=1e-3, rtol=1e-3)
    # unconstrained by the box, the L2 step is the textbook one: c w / |w|^2
    t2, w2 = torch.full((1, 4), 0.5), torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    b2 = (w2 * t2).sum(1) + 0.1
    d2 = project_hyperplane_box(t2, w2, b2, "l2", (0.0, 1.0))
    torch.testing.assert_close(d2, 0.1 * w2 / (w2 * w2).sum(), atol=1e-6, rtol=1e-4)


def test_fab_rejects_bad_settings_and_black_box_models():
    with pytest.raises(BastionError):
        FAB(steps=0)
    with pytest.raises(BastionError):
        FAB(beta=0.0)
    with pytest.raises(BastionError):
        FAB(norm="l1")

    class Scores:
        n_classes, input_shape, bounds = 10, (4,), (0.0, 1.0)

        def predict_proba(self, x):
            return np.full((len(x), 10), 0.1)

    with pytest.raises(BastionError, match="gradients"):
        FAB().run(Scores(), np.zeros((2, 4), np.float32), np.zeros(2, int), epsilons=[0.1])
