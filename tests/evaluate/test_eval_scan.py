"""The worst-case evaluator: cascade logic, validation, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from _evalfakes import BlackBox, FakeFGSM, FakeMinimal, LiarAttack

from bastion.errors import BastionError, DataError, ModelError
from bastion.evaluate import ScanReport, eps_key, scan

EPS = [0.0, 0.05, 0.1, 0.2]
FAST = {"pgd": {"steps": 8}, "square": {"max_queries": 60}}


@pytest.fixture(scope="module")
def small(digits_eval):
    x, y = digits_eval
    return x[:48], y[:48]


DEFAULT_FAST = {
    "apgd-ce": {"steps": 10},
    "apgd-t": {"steps": 10, "n_target_classes": 3},
    "square": {"max_queries": 60},
}


@pytest.fixture(scope="module")
def default_cascade(digits_cnn, small):
    x, y = small
    return scan(digits_cnn, x, y, epsilons=EPS, attack_options=DEFAULT_FAST, seed=0,
                preset="quick")


def test_default_white_box_cascade(digits_cnn, small, default_cascade):
    r = default_cascade
    assert r.attacks == ["apgd-ce", "apgd-t", "square"]
    assert [s.white_box for s in r.per_attack] == [True, True, False]
    curve = _curve(r)
    assert curve == sorted(curve, reverse=True) and curve[-1] < curve[0]
    assert r.warnings == [], r.warnings
    x, y = small
    for name in r.attacks:
        alone = scan(digits_cnn, x, y, epsilons=EPS, attacks=[name], seed=0,
                     attack_options={name: DEFAULT_FAST[name]}, sanity_checks=False)
        for e in EPS:
            assert r.robust_accuracy[eps_key(e)] <= alone.robust_accuracy[eps_key(e)] + 1e-12


def test_default_black_box_cascade(digits_cnn, small):
    x, y = small
    r = scan(BlackBox(digits_cnn), x[:8], y[:8], epsilons=[0.2], progress=True,
             attack_options={"square": {"max_queries": 40}, "hsj": {"max_queries": 60}})
    assert r.attacks == ["square", "hsj"]
    assert [s.kind for s in r.per_attack] == ["fixed", "minimal"]
    assert r.robust_accuracy["0.2"] <= r.clean_accuracy


@pytest.fixture(scope="module")
def cascade(digits_cnn, small):
    x, y = small
    return scan(digits_cnn, x, y, epsilons=EPS, attacks=["pgd", "square"],
                attack_options=FAST, seed=0)


def _curve(report: ScanReport) -> list[float]:
    return [report.robust_accuracy[eps_key(e)] for e in report.epsilons]


def test_cascade_is_worst_case_and_monotone(digits_cnn, small, cascade):
    x, y = small
    curve = _curve(cascade)
    assert curve == sorted(curve, reverse=True)
    assert curve[0] == pytest.approx(cascade.clean_accuracy)
    assert curve[-1] < curve[0]  # the undefended model falls
    for name in ("pgd", "square"):
        alone = scan(digits_cnn, x, y, epsilons=EPS, attacks=[name],
                     attack_options={name: FAST[name]}, seed=0, sanity_checks=False)
        for e in EPS:
            assert cascade.robust_accuracy[eps_key(e)] <= alone.robust_accuracy[eps_key(e)] + 1e-12
    # the stages add up: each one's robust accuracy after is non-increasing down the cascade
    after = [[s.robust_accuracy_after[eps_key(e)] for e in EPS] for s in cascade.per_attack]
    assert all(b <= a for a, b in zip(after[0], after[1], strict=True))
    assert after[-1] == curve


def test_per_attack_bookkeeping(cascade):
    pgd, square = cascade.per_attack
    assert (pgd.name, pgd.kind, pgd.white_box, pgd.stage) == ("pgd", "fixed", True, 1)
    assert (square.name, square.white_box, square.stage) == ("square", False, 2)
    k = eps_key(0.05)
    n = cascade.n_points
    # square only attacks what pgd left standing at each epsilon
    assert square.points_attacked_per_eps[k] == round(pgd.robust_accuracy_after[k] * n)
    assert pgd.points_attacked_per_eps[eps_key(0.0)] == 0
    assert pgd.queries_total > 0 and pgd.queries_mean > 0
    assert pgd.grad_norm_mean is None or pgd.grad_norm_mean > 0
    broken_total = sum(s.newly_broken[k] for s in cascade.per_attack)
    assert broken_total == round((cascade.clean_accuracy - cascade.robust_accuracy[k]) * n)
    assert cascade.examples and all(ex.adv_pred != ex.true_label for ex in cascade.examples)
    ex = cascade.examples[0]
    assert np.asarray(ex.x_adv).shape == (1, 8, 8)
    assert ex.perturbation_norm <= ex.epsilon + 1e-5
    assert ex.attack in ("pgd", "square")
    # per point: who broke it first, and at which budget
    by, at = cascade.first_broken_by, cascade.first_broken_eps
    assert len(by) == len(at) == n
    last = eps_key(cascade.epsilons[-1])
    assert sum(b is None for b in by) == round(cascade.robust_accuracy[last] * n)
    assert all((b is None) == (a is None) for b, a in zip(by, at, strict=True))
    assert {b for b in by if b} <= {"clean", "pgd", "square"}
    for e in cascade.epsilons:
        fell = sum(a is not None and a <= e for a in at)
        assert fell == round((1 - cascade.robust_accuracy[eps_key(e)]) * n)


def test_no_warnings_on_a_normal_model(cascade):
    assert cascade.warnings == [], cascade.warnings
    assert cascade.sanity["large_eps_robust_accuracy"] is not None
    assert cascade.sanity["zero_grad_fraction"] == 0.0


def test_deterministic(digits_cnn, small):
    x, y = small
    kw = dict(epsilons=[0.1], attacks=["pgd", "square"], attack_options=FAST, seed=3,
              sanity_checks=False)
    a = scan(digits_cnn, x[:24], y[:24], **kw)
    b = scan(digits_cnn, x[:24], y[:24], **kw)
    assert a.robust_accuracy == b.robust_accuracy
    assert [s.newly_broken for s in a.per_attack] == [s.newly_broken for s in b.per_attack]
    assert [e.model_dump() for e in a.examples] == [e.model_dump() for e in b.examples]


def test_minimal_attack_counts_at_every_epsilon(digits_cnn, small):
    x, y = small
    r = scan(digits_cnn, x[:30], y[:30], epsilons=[0.02, 0.1, 0.3],
             attacks=[FakeMinimal(max_eps=0.3)], sanity_checks=False)
    s = r.per_attack[0]
    assert s.kind == "minimal" and s.points_attacked == 30
    curve = _curve(r)
    assert curve == sorted(curve, reverse=True) and curve[-1] < curve[0]


def test_fake_fixed_then_minimal(digits_cnn, small):
    x, y = small
    r = scan(digits_cnn, x[:30], y[:30], epsilons=[0.05, 0.2],
             attacks=[FakeFGSM(), FakeMinimal(max_eps=0.2)], sanity_checks=False)
    fg, mi = r.per_attack
    assert mi.points_attacked_per_eps[eps_key(0.2)] == round(fg.robust_accuracy_after["0.2"] * 30)
    assert r.robust_accuracy["0.2"] <= fg.robust_accuracy_after["0.2"]


def test_liar_attack_is_not_believed(digits_cnn, small):
    x, y = small
    r = scan(digits_cnn, x[:20], y[:20], epsilons=[0.1], attacks=[LiarAttack()])
    assert r.robust_accuracy["0.1"] == r.clean_accuracy
    assert r.per_attack[0].rejected == 20
    assert any("did not verify" in w for w in r.warnings)


def test_limit_and_data_info(digits_cnn, small):
    x, y = small
    r = scan(digits_cnn, x, y, epsilons=[0.05], attacks=[FakeFGSM()], limit=10,
             n_examples=2, sanity_checks=False)
    assert r.n_points == 10 and r.data["n_given"] == 48 and r.data["limit"] == 10
    assert len(r.examples) <= 2
    assert r.model["white_box"] is True and r.model["input_shape"] == [1, 8, 8]


def test_black_box_model(digits_cnn, small):
    x, y = small
    bb = BlackBox(digits_cnn)
    r = scan(bb, x[:16], y[:16], epsilons=[0.2], attacks=["square"],
             attack_options={"square": {"max_queries": 50}})
    assert r.model["white_box"] is False
    assert r.robust_accuracy["0.2"] <= r.clean_accuracy
    with pytest.raises(ModelError, match="needs gradients"):
        scan(bb, x[:4], y[:4], epsilons=[0.1], attacks=["pgd"])


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "mutate, err, match",
    [
        (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), y),
         DataError, "NaN"),
        (lambda x, y: (x.reshape(len(x), -1), y), DataError, "shape"),
        (lambda x, y: (x[0], y), DataError, "one input"),
        (lambda x, y: (x * 255, y), DataError, "bounds"),
        (lambda x, y: (x[:0], y[:0]), DataError, "empty"),
        (lambda x, y: (x, y + 10), DataError, "outside"),
        (lambda x, y: (x, y[:-1]), DataError, "labels"),
        (lambda x, y: (x, np.eye(10)[y]), DataError, "one-hot"),
    ],
)
def test_bad_data(digits_cnn, small, mutate, err, match):
    x, y = mutate(*small)
    with pytest.raises(err, match=match):
        scan(digits_cnn, x, y, epsilons=[0.1], attacks=[FakeFGSM()])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"epsilons": [-0.1]}, ">= 0"),
        ({"epsilons": []}, "empty"),
        ({"epsilons": [float("nan")]}, "finite"),
        ({"limit": 0}, "limit"),
        ({"batch_size": 0}, "batch_size"),
        ({"attacks": []}, "empty"),
        ({"attacks": ["nope"]}, "valid names"),
        ({"attacks": ["pgd"], "attack_options": {"pdg": {"steps": 1}}}, "pdg"),
        ({"norm": "l3"}, "norm"),
    ],
)
def test_bad_arguments(digits_cnn, small, kw, match):
    x, y = small
    args = {"epsilons": [0.1], "attacks": [FakeFGSM()], **kw}
    with pytest.raises(BastionError, match=match):
        scan(digits_cnn, x, y, **args)


def test_not_a_model(small):
    x, y = small
    with pytest.raises(ModelError, match="not a Bastion model"):
        scan(object(), x, y, epsilons=[0.1])
