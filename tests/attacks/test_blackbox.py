"""Black-box attacks: Square (score-based) and HopSkipJump (decision-based)."""

from __future__ import annotations

import numpy as np
import pytest

from bastion.attacks.base import AttackResult
from bastion.attacks.evasion.hopskipjump import HopSkipJump
from bastion.attacks.evasion.square import Square, p_selection
from bastion.errors import BastionError, DataError, QueryBudgetExceeded
from bastion.models.query import QueryBudget


class LinearModel:
    """A 1-D (tabular) softmax-linear model with no ``logits``: black-box only."""

    def __init__(self, d: int = 12, k: int = 3, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.w = rng.normal(size=(d, k))
        self.n_classes = k
        self.input_shape = (d,)
        self.bounds = (0.0, 1.0)
        self.queries = 0

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        self.queries += len(x)
        z = (np.asarray(x, dtype=np.float64) - 0.5) @ self.w * 4.0
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)


class ConstantModel(LinearModel):
    """Predicts class 0 everywhere: no adversarial input exists for label 0."""

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        self.queries += len(x)
        p = np.full((len(x), self.n_classes), 0.1 / (self.n_classes - 1))
        p[:, 0] = 0.9
        return p


def _check_fixed(res: AttackResult, model, x: np.ndarray, y: np.ndarray, max_queries: int,
                 target: np.ndarray | None = None) -> None:
    lo, hi = model.bounds
    assert res.x_adv.shape == (len(res.epsilons), *x.shape)
    assert res.x_adv.min() >= lo and res.x_adv.max() <= hi
    assert np.all(res.norms <= np.asarray(res.epsilons)[:, None] + 1e-5)
    per_eps = np.asarray(res.extra["queries_per_epsilon"])
    assert per_eps.max() <= max_queries
    assert np.array_equal(per_eps.sum(axis=0), res.queries)
    for k in range(len(res.epsilons)):  # every claimed success is real
        pred = model.predict_proba(res.x_adv[k]).argmax(1)
        fooled = pred == target if target is not None else pred != y
        assert np.array_equal(fooled[res.success[k]], np.ones(res.success[k].sum(), bool))


@pytest.fixture(scope="module")
def pts(digits_eval):
    x, y = digits_eval
    return x[:40], y[:40]


# ------------------------------------------------------------------------------ Square


def test_square_linf_drops_accuracy_within_budget(digits_cnn, pts):
    x, y = pts
    counter = QueryBudget(digits_cnn, max_queries=None)
    res = Square(norm="linf", max_queries=300).run(counter, x, y, epsilons=[0.3])
    assert res.attack == "square" and res.kind == "fixed" and res.norm == "linf"
    assert res.robust_accuracy(0.3) < 0.5  # clean accuracy on these points is 100%
    _check_fixed(res, digits_cnn, x, y, 300)
    assert counter.queries == int(res.queries.sum())  # the count is exact
    assert res.queries.min() >= 2  # the clean check plus at least one attack query


def test_square_l2_drops_accuracy(digits_cnn, pts):
    x, y = pts
    res = Square(norm="l2", max_queries=300).run(digits_cnn, x, y, epsilons=[2.0])
    assert res.robust_accuracy(2.0) < 0.5
    _check_fixed(res, digits_cnn, x, y, 300)


@pytest.mark.parametrize("norm,epsilons", [("linf", [0.02, 0.1, 0.3]), ("l2", [0.3, 1.0])])
def test_square_epsilon_list_is_monotone_and_budgeted(digits_cnn, pts, norm, epsilons):
    x, y = pts[0][:20], pts[1][:20]
    budget = QueryBudget(digits_cnn, max_queries=20 * 100 * len(epsilons))  # never exceeded
    res = Square(norm=norm, max_queries=100, loss="ce").run(budget, x, y, epsilons=epsilons)
    accs = [res.robust_accuracy(e) for e in epsilons]
    assert accs == sorted(accs, reverse=True)
    assert accs[0] > accs[-1]
    _check_fixed(res, digits_cnn, x, y, 100)
    assert budget.queries == int(res.queries.sum())


def test_square_is_deterministic_under_seed(digits_cnn, pts):
    x, y = pts[0][:10], pts[1][:10]
    a = Square(norm="linf", max_queries=50, seed=3).run(digits_cnn, x, y, epsilons=[0.1])
    b = Square(norm="linf", max_queries=50, seed=3).run(digits_cnn, x, y, epsilons=[0.1])
    c = Square(norm="linf", max_queries=50, seed=4).run(digits_cnn, x, y, epsilons=[0.1])
    assert np.array_equal(a.x_adv, b.x_adv) and np.array_equal(a.queries, b.queries)
    assert not np.array_equal(a.x_adv, c.x_adv)


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 2.5)])
def test_square_targeted(digits_cnn, pts, norm, eps):
    x, y = pts[0][:20], pts[1][:20]
    target = (y + 1) % 10
    res = Square(norm=norm, max_queries=300).run(digits_cnn, x, y, epsilons=[eps], target=target)
    assert res.targeted
    assert res.success.mean() >= 0.5
    _check_fixed(res, digits_cnn, x, y, 300, target=target)


def test_square_misclassified_points_cost_one_query(digits_cnn, pts):
    x, y = pts[0][:4], pts[1][:4].copy()
    y[0] = (y[0] + 1) % 10  # the model is "wrong" on point 0 already
    res = Square(max_queries=30).run(digits_cnn, x, y, epsilons=[0.0, 0.3])
    assert res.success[:, 0].all() and res.queries[0] == 1
    assert np.all(res.norms[:, 0] == 0)
    assert not res.success[0, 1:].any()  # eps 0 cannot fool anything else
    assert res.queries.max() <= 2 * 30


def test_square_on_tabular_inputs_and_edge_budgets():
    model = LinearModel()
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(30, 12)).astype(np.float32)
    y = model.predict_proba(x).argmax(1)
    for norm, eps in (("linf", 0.2), ("l2", 0.6)):
        res = Square(norm=norm, max_queries=100).run(model, x, y, epsilons=[eps])
        assert res.robust_accuracy(eps) < 1.0
        _check_fixed(res, model, x, y, 100)
    one = Square(max_queries=1).run(model, x, y, epsilons=[0.3])
    assert np.all(one.queries == 1) and not one.success.any()
    empty = Square().run(model, x[:0], y[:0], epsilons=[0.1])
    assert empty.x_adv.shape == (1, 0, 12)


def test_square_rejects_bad_arguments(digits_cnn, pts):
    x, y = pts
    with pytest.raises(BastionError):
        Square(norm="l1")
    with pytest.raises(BastionError):
        Square(max_queries=0)
    with pytest.raises(BastionError):
        Square(loss="hinge")
    with pytest.raises(DataError):
        Square().run(digits_cnn, x[:, :, :4], y, epsilons=[0.1])
    with pytest.raises(DataError):
        Square().run(digits_cnn, x, y, epsilons=[0.1], target=y[:3])


def test_a_smaller_outer_budget_stops_the_attack_loudly(digits_cnn, pts):
    x, y = pts[0][:5], pts[1][:5]
    with pytest.raises(QueryBudgetExceeded):
        Square(max_queries=100).run(QueryBudget(digits_cnn, max_queries=20), x, y,
                                    epsilons=[0.02])
    with pytest.raises(QueryBudgetExceeded):
        HopSkipJump(max_queries=100).run(QueryBudget(digits_cnn, max_queries=20), x, y)


def test_p_schedule_halves_on_the_papers_steps():
    assert p_selection(0.8, 0, 1000) == 0.8
    assert p_selection(0.8, 3, 1000) == 0.4  # 30 of 10,000
    assert p_selection(0.8, 999, 1000) == 0.8 / 512


# ------------------------------------------------------------------------ HopSkipJump


@pytest.fixture(scope="module")
def hsj_runs(digits_cnn, pts):
    x, y = pts[0][:20], pts[1][:20]
    small = HopSkipJump(norm="l2", max_queries=150, init_evals=30).run(digits_cnn, x, y)
    large = HopSkipJump(norm="l2", max_queries=600, init_evals=30).run(digits_cnn, x, y)
    return x, y, small, large


def test_hsj_finds_adversarials_within_budget(digits_cnn, hsj_runs):
    x, y, small, _ = hsj_runs
    assert small.attack == "hsj" and small.kind == "minimal" and small.epsilons is None
    assert small.success.mean() >= 0.8
    ok = small.success[0]
    assert np.all(np.isfinite(small.norms[0, ok]))
    assert small.queries.max() <= 150
    pred = digits_cnn.predict_proba(small.x_adv[0]).argmax(1)
    assert np.all(pred[ok] != y[ok])
    d = np.sqrt(((small.x_adv[0] - x) ** 2).reshape(len(x), -1).sum(1))
    assert np.allclose(d[ok], small.norms[0, ok], atol=1e-5)
    assert small.x_adv.min() >= 0.0 and small.x_adv.max() <= 1.0


def test_hsj_norms_shrink_with_budget(hsj_runs):
    _, _, small, large = hsj_runs
    both = small.success[0] & large.success[0]
    assert both.sum() >= 16
    assert np.median(large.norms[0, both]) < 0.9 * np.median(small.norms[0, both])
    assert np.mean(large.norms[0, both] < small.norms[0, both]) >= 0.8
    assert large.queries.max() <= 600
    # robust accuracy reads off the norms
    eps = float(np.median(large.norms[0, both]))
    assert large.robust_accuracy(eps) < small.robust_accuracy(eps) + 1e-9


def test_hsj_linf_and_exact_counting(digits_cnn, pts):
    x, y = pts[0][:10], pts[1][:10]
    counter = QueryBudget(digits_cnn, max_queries=10 * 200)  # the per-point sum; never hit
    res = HopSkipJump(norm="linf", max_queries=200, init_evals=30, seed=1).run(counter, x, y)
    assert res.norm == "linf"
    assert res.success.mean() >= 0.8
    assert res.queries.max() <= 200
    assert counter.queries == int(res.queries.sum())
    ok = res.success[0]
    d = np.abs(res.x_adv[0] - x).reshape(len(x), -1).max(1)
    assert np.allclose(d[ok], res.norms[0, ok], atol=1e-6)
    again = HopSkipJump(norm="linf", max_queries=200, init_evals=30, seed=1).run(digits_cnn, x, y)
    assert np.array_equal(again.x_adv, res.x_adv)


def test_hsj_targeted_with_target_inputs(digits_cnn, digits_eval):
    xe, ye = digits_eval
    x, y = xe[:10], ye[:10]
    target = (y + 3) % 10
    # start from a clean example of each target class
    starts = np.stack([xe[np.flatnonzero(ye == t)[0]] for t in target])
    res = HopSkipJump(max_queries=200, init_evals=30).run(
        digits_cnn, x, y, target=target, target_inputs=starts
    )
    assert res.targeted and res.success.mean() >= 0.8
    pred = digits_cnn.predict_proba(res.x_adv[0]).argmax(1)
    ok = res.success[0]
    assert np.all(pred[ok] == target[ok])
    start_d = np.sqrt(((starts - x) ** 2).reshape(len(x), -1).sum(1))
    assert np.all(res.norms[0, ok] < start_d[ok])  # it moved towards the clean inputs
    with pytest.raises(DataError):
        HopSkipJump().run(digits_cnn, x, y, target=target, target_inputs=starts[:2])


def test_hsj_without_start_reports_inf():
    model = ConstantModel()
    x = np.random.default_rng(0).uniform(0, 1, size=(3, 12)).astype(np.float32)
    y = np.zeros(3, dtype=np.int64)
    res = HopSkipJump(max_queries=50, init_tries=5).run(model, x, y)
    assert not res.success.any() and np.all(np.isinf(res.norms))
    assert np.array_equal(res.x_adv[0], x)
    assert np.all(res.queries == 1 + 5)
    assert res.robust_accuracy(10.0) == 1.0


def test_hsj_misclassified_and_tabular():
    model = LinearModel()
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, size=(8, 12)).astype(np.float32)
    y = model.predict_proba(x).argmax(1)
    y_wrong = y.copy()
    y_wrong[0] = (y[0] + 1) % 3
    res = HopSkipJump(max_queries=120, init_evals=20).run(model, x, y_wrong)
    assert res.success[0, 0] and res.norms[0, 0] == 0 and res.queries[0] == 1
    assert res.success.mean() >= 0.8 and res.queries.max() <= 120


def test_hsj_targeted_by_random_search_on_tabular():
    model = LinearModel()
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, size=(6, 12)).astype(np.float32)
    y = model.predict_proba(x).argmax(1)
    target = (y + 1) % 3
    res = HopSkipJump(max_queries=150, init_evals=20, norm="linf").run(model, x, y, target=target)
    ok = res.success[0]
    assert ok.mean() >= 0.5 and res.queries.max() <= 150
    assert np.all(model.predict_proba(res.x_adv[0]).argmax(1)[ok] == target[ok])
    assert np.all(np.isinf(res.norms[0, ~ok]))


class _ScoresOnly:
    """A black box: the digits CNN seen only through ``predict_proba`` (no logits)."""

    def __init__(self, model):
        self.model, self.calls = model, 0
        self.n_classes, self.input_shape = model.n_classes, model.input_shape
        self.bounds, self.name = model.bounds, "scores-only"

    def predict_proba(self, x):
        self.calls += len(x)
        return self.model.predict_proba(x)


def test_square_logits_fast_path_matches_the_scores_only_search(digits_cnn, pts):
    """A plain TorchModel is scored from its logits (the margin of the log-probabilities
    equals that of the logits); a black box only through predict_proba. Same seed, same
    search: the same points fall, every query is counted, and the black box's own count
    agrees with the attack's."""
    x, y = pts
    box = _ScoresOnly(digits_cnn)
    fast = Square(norm="linf", max_queries=60, p_init=0.8, seed=3).run(
        digits_cnn, x, y, epsilons=[0.2])
    slow = Square(norm="linf", max_queries=60, p_init=0.8, seed=3).run(
        box, x, y, epsilons=[0.2])
    assert fast.success.mean() > 0.2
    assert abs(int(fast.success.sum()) - int(slow.success.sum())) <= 1
    assert np.array_equal(fast.queries, slow.queries) or (
        abs(int(fast.queries.sum()) - int(slow.queries.sum())) <= 60)
    assert slow.queries.max() <= 60 and box.calls == int(slow.queries.sum())
    assert np.all(np.abs(fast.x_adv - x[None]) <= 0.2 + 1e-6)
    assert fast.x_adv.min() >= 0.0 and fast.x_adv.max() <= 1.0
