"""Each sanity warning fires on a crafted case and stays quiet on a normal model."""

from __future__ import annotations

import numpy as np
import pytest
from _evalfakes import FakeFGSM, NullAttack, RoundInputs

from bastion.evaluate import sanity, scan
from bastion.evaluate.sanity import check_large_epsilon, full_range_epsilon
from bastion.models.torch_model import TorchModel


@pytest.fixture(scope="module")
def masked(digits_cnn):
    """digits_cnn behind input rounding: piecewise constant, zero gradient everywhere."""
    return TorchModel(RoundInputs(digits_cnn.module), n_classes=10, input_shape=(1, 8, 8),
                      bounds=(0.0, 1.0), name="masked")


@pytest.fixture(scope="module")
def masked_report(masked, digits_eval):
    x, y = digits_eval
    return scan(masked, x[:40], y[:40], epsilons=[0.1, 0.2], attacks=["pgd", "square"],
                attack_options={"pgd": {"steps": 5}, "square": {"max_queries": 100}})


def test_gradient_masking_is_flagged(masked_report):
    r = masked_report
    assert r.clean_accuracy > 0.5
    pgd, square = r.per_attack
    assert square.points_broken >= 2
    text = " ".join(r.warnings)
    assert "that the gradient stages (pgd) left standing" in text
    assert "stage 2. square broke" in text  # the evidence: which stage, how many
    assert f"broke {square.points_broken} of the {square.points_attacked} point(s)" in text
    assert "gradient of the model's logit margin is zero" in text
    assert r.sanity["zero_grad_fraction"] == 1.0


def test_chance_accuracy_is_flagged(digits_cnn, digits_eval):
    x, y = digits_eval
    wrong = (y[:20] + 1) % 10  # labels that do not match the data
    r = scan(digits_cnn, x[:20], wrong, epsilons=[0.1], attacks=[FakeFGSM()])
    assert r.clean_accuracy < 0.2
    assert any("close to chance" in w for w in r.warnings)


def test_failing_attack_at_large_epsilon_is_flagged(digits_cnn, digits_eval):
    x, y = digits_eval
    info, w = check_large_epsilon(digits_cnn, x[:20], y[:20], norm="linf", attack=NullAttack())
    assert info["large_eps"] == 1.0 and info["large_eps_robust_accuracy"] == 1.0
    assert len(w) == 1 and "reaches every valid input" in w[0]
    info, w = check_large_epsilon(digits_cnn, x[:20], y[:20], norm="linf")
    assert w == [] and info["large_eps_robust_accuracy"] <= 0.2


def test_full_range_epsilon():
    assert full_range_epsilon("linf", (0.0, 1.0), (1, 8, 8)) == 1.0
    assert full_range_epsilon("l2", (-1.0, 1.0), (4,)) == pytest.approx(4.0)


def test_non_monotone_attack_is_flagged(digits_cnn, digits_eval):
    x, y = digits_eval
    r = scan(digits_cnn, x[:30], y[:30], epsilons=[0.1, 0.3],
             attacks=[FakeFGSM(fail_above=0.2)], sanity_checks=True)
    s = r.per_attack[0]
    assert s.non_monotone_points > 0
    assert any("does not fall" in w for w in r.warnings)
    # the worst case still carries the breaks to the larger epsilon
    assert r.robust_accuracy["0.3"] <= r.robust_accuracy["0.1"]


def test_zero_gradient_reported_by_an_attack():
    class S:
        name, white_box, grad_norm_mean = "apgd-ce", True, 0.0

    _, w = sanity.check_gradients(object(), np.zeros((0, 2)), np.zeros(0), [S()])
    assert w and "zero mean input gradient" in w[0]


def test_quiet_on_normal_checks(digits_cnn, digits_eval):
    x, y = digits_eval
    info, w = sanity.check_gradients(digits_cnn, x[:32], y[:32])
    assert w == [] and info["zero_grad_fraction"] == 0.0
    assert sanity.check_clean_accuracy(0.97, 10) == []


def test_randomized_model_is_flagged(digits_cnn, digits_eval):
    x, y = digits_eval

    class Noisy:
        n_classes, input_shape, bounds, queries = 10, (1, 8, 8), (0.0, 1.0), 0

        def __init__(self) -> None:
            self.rng = np.random.default_rng(0)

        def predict_proba(self, xb):
            p = digits_cnn.predict_proba(xb) + self.rng.uniform(0, 0.5, size=(len(xb), 10))
            return p / p.sum(1, keepdims=True)

    info, w = sanity.check_randomized(Noisy(), x[:16])
    assert info["output_change_on_repeat"] > 0.01 and "randomised" in w[0]
    info, w = sanity.check_randomized(digits_cnn, x[:16])
    assert w == [] and info["output_change_on_repeat"] == 0.0


def _stage(stage, name, white, attacked, broken):
    from types import SimpleNamespace

    return SimpleNamespace(stage=stage, name=name, white_box=white, phase="main",
                           points_attacked=attacked, points_broken=broken)


@pytest.mark.parametrize(("survivors", "broken", "fires"), [
    (860, 22, False),  # public PGD-AT model of issue 16: Square-5000 finds 2.6%
    (140, 4, False),   # a few points on a small run: not enough evidence
    (830, 53, True),   # public fast-AT model of issue 16 (6.4%): gradients mask
    (38, 10, True),    # a quantising defence: a quarter of the survivors
    (1000, 1, False),  # one point is never evidence
])
def test_masking_warning_needs_an_interval_above_the_rate(survivors, broken, fires):
    """The warning is count-based: the lower end of the 95% interval of the share of the
    gradient stages' survivors that Square broke must pass BLACK_BOX_RATE."""
    summaries = [_stage(1, "apgd-ce", True, 1000, 1000 - survivors),
                 _stage(2, "square", False, survivors, broken)]
    evidence: dict = {}
    w = sanity.check_black_box_after_white_box(summaries, 1000, evidence=evidence)
    assert bool(w) is fires
    assert evidence["survivors"] == survivors
    lo, hi = evidence["rate_interval_95"]
    assert lo <= broken / survivors <= hi and (lo > sanity.BLACK_BOX_RATE) is fires
    if fires:  # names the evidence: how many points, of how many, which stage
        assert f"broke {broken} of the {survivors} point(s)" in w[0]
        assert f"stage 2. square broke {broken}" in w[0] and "(apgd-ce)" in w[0]
