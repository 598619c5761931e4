"""Presets, the measured stage order, escalation when the gradients lie, the 95% interval,
and the thorough preset's BPDA / EOT / transfer hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion.errors import BastionError
from bastion.evaluate import scan
from bastion.evaluate.presets import ESCALATION_SHARE, MAX_ROUNDS, wilson_interval
from bastion.models.torch_model import TorchModel

#: the standard preset's stages, shrunk for a test (same stages, same order rules)
SMALL = {
    "apgd-ce": {"steps": 10},
    "apgd-t": {"steps": 10, "n_target_classes": 2},
    "fab-t": {"steps": 10, "n_target_classes": 2},
    "square": {"max_queries": 150},
}


class HardThreshold(nn.Module):
    """Binarises the input first (x > 0.5): a gradient of zero almost everywhere, the
    gradient masking of a quantising defence."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x > 0.5).float())


@pytest.fixture(scope="module")
def pts(digits_eval):
    x, y = digits_eval
    return x[:40], y[:40]


@pytest.fixture(scope="module")
def masked(digits_cnn):
    return TorchModel(HardThreshold(digits_cnn.module), n_classes=10, input_shape=(1, 8, 8),
                      bounds=(0.0, 1.0), name="threshold")


@pytest.fixture(scope="module")
def masked_report(masked, pts):
    x, y = pts
    return scan(masked, x, y, epsilons=[0.3], attack_options=SMALL, seed=0)


@pytest.fixture(scope="module")
def clean_report(digits_cnn, pts):
    x, y = pts
    return scan(digits_cnn, x, y, epsilons=[0.1], attack_options=SMALL, seed=0)


def test_standard_is_the_default_and_runs_autoattacks_stages(clean_report):
    r = clean_report
    assert r.preset == "standard" and not r.lower_bound
    assert sorted(r.attacks) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert r.attacks[-1] == "square"  # the gradient-free guard runs after the gradient stages
    # the order was measured on a pilot, and the measurement is in the report
    assert r.stage_order["measured"] and r.stage_order["order"] == r.attacks
    assert {row["stage"] for row in r.stage_order["stages"]} == set(r.attacks)
    rows = {row["stage"]: row for row in r.stage_order["stages"]}
    for name in ("apgd-ce", "apgd-t", "fab-t"):  # the gradient stages were measured
        assert rows[name]["points"] == r.stage_order["pilot_points"] and rows[name]["gradient"]
    assert rows["square"]["points"] == 0  # the gradient-free guard is not piloted
    pilot = [s for s in r.per_attack if s.phase == "pilot"]
    assert [s.name for s in pilot] == ["apgd-ce", "apgd-t", "fab-t"]
    assert all(s.time_s >= 0 for s in r.per_attack)
    # every break is accounted for by exactly one stage, pilot or main
    broken = sum(s.points_broken for s in r.per_attack)
    n_correct = round(r.clean_accuracy * r.n_points)
    assert broken == n_correct - round(r.robust_accuracy["0.1"] * r.n_points)


def test_no_escalation_on_a_clean_cnn(clean_report):
    r = clean_report
    assert r.escalations == []
    assert not r.masking_evidence["escalated"]
    assert not any("Gradient masking" in w for w in r.warnings), r.warnings
    assert all(s.phase != "escalation" for s in r.per_attack)


def test_escalation_on_a_hard_threshold_model(masked_report):
    r = masked_report
    ev = r.masking_evidence
    assert ev["escalated"] and r.escalations
    # the trigger: a gradient-free stage broke points the gradient stages left standing,
    # and the input gradient is zero
    assert ev["points"] >= 2 and ev["zero_grad_fraction"] == 1.0
    rounds = [e["round"] for e in r.escalations]
    assert rounds == list(range(1, len(rounds) + 1))
    # each round restarts Square with the preset's budget on the closest fifth of the
    # survivors; it stops when a round removes nothing, after MAX_ROUNDS, or when the next
    # round would overspend the stated budget (queries per point standing at the start)
    last = r.escalations[-1]
    spent = last["queries_per_point_spent"]
    assert 0 < spent <= last["budget_queries_per_point"]
    assert last["removed"] == 0 or len(rounds) == MAX_ROUNDS["standard"] or (
        spent + SMALL["square"]["max_queries"] * ESCALATION_SHARE["standard"]
        > last["budget_queries_per_point"] - 1)
    for e in r.escalations:
        assert e["max_queries"] == SMALL["square"]["max_queries"]
        assert e["share_of_survivors"] <= ESCALATION_SHARE["standard"] + 0.1
        assert e["margin_cutoff"] is None or -1.0 <= e["margin_cutoff"] <= 1.0
    esc = [s for s in r.per_attack if s.phase == "escalation"]
    assert [s.round for s in esc] == rounds
    assert [s.points_broken for s in esc] == [e["removed"] for e in r.escalations]
    text = " ".join(r.warnings)
    stage = next(k for k in ev["by_stage"])
    assert f"stage {stage} broke {ev['by_stage'][stage]}" in text  # names the evidence
    assert "escalated on the survivors: round 1" in text


def test_quick_is_a_labelled_lower_bound_without_escalation(masked, pts):
    x, y = pts
    r = scan(masked, x[:20], y[:20], epsilons=[0.3], preset="quick", seed=0,
             attack_options={"apgd-ce": {"steps": 5}, "apgd-t": {"steps": 5,
                             "n_target_classes": 2}, "square": {"max_queries": 50}})
    assert r.preset == "quick" and r.lower_bound
    assert r.attacks == ["apgd-ce", "apgd-t", "square"]
    assert r.escalations == [] and not r.stage_order["measured"]
    assert any("No escalation ran" in w for w in r.warnings)


def test_interval_and_report_round_trip(clean_report, tmp_path):
    from bastion.evaluate import ScanReport, write_scan_report

    r = clean_report
    lo, hi = r.robust_interval["0.1"]
    assert lo <= r.robust_accuracy["0.1"] <= hi and hi - lo > 0
    paths = write_scan_report(r, tmp_path)
    back = ScanReport.from_json(paths["json"].read_text())
    assert back.robust_interval == r.robust_interval and back.preset == "standard"
    page = paths["html"].read_text()
    assert "95% interval" in page and "Stage order" in page and "preset standard" in page


def test_wilson_interval_matches_known_values():
    lo, hi = wilson_interval(80, 100)
    assert lo == pytest.approx(0.7112, abs=1e-3) and hi == pytest.approx(0.8666, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_bad_preset_is_one_clear_error(digits_cnn, pts):
    x, y = pts
    with pytest.raises(BastionError, match="unknown preset 'fast'"):
        scan(digits_cnn, x, y, epsilons=[0.1], preset="fast")


def test_thorough_bpda_sees_through_the_threshold(masked, digits_cnn, pts):
    x, y = pts[0][:16], pts[1][:16]
    opts = {"apgd-ce": {"steps": 10, "restarts": 1}, "apgd-t": {"steps": 5,
            "n_target_classes": 1, "restarts": 1}, "fab-t": {"steps": 5, "n_target_classes": 1,
            "restarts": 1}, "square": {"max_queries": 20}}
    net = digits_cnn.module
    r = scan(masked, x, y, epsilons=[0.3], preset="thorough", attack_options=opts,
             bpda=lambda t: net(t), escalate=False, sanity_checks=False, seed=0)
    grad = [s for s in r.per_attack if s.white_box]
    # with BPDA the gradient stages are no longer blind: they break points themselves
    assert sum(s.points_broken for s in grad) >= 4
    assert r.preset == "thorough"


def test_transfer_from_a_surrogate_is_verified_on_the_model(digits_cnn, masked, pts):
    x, y = pts[0][:16], pts[1][:16]
    r = scan(masked, x, y, epsilons=[0.3], attacks=["apgd-ce"], surrogate=digits_cnn,
             attack_options={"apgd-ce": {"steps": 5}}, sanity_checks=False, seed=0)
    assert r.attacks == ["apgd-ce", "transfer"]
    tr = r.per_attack[-1]
    assert tr.points_broken >= 2 and tr.rejected >= 0
    with pytest.raises(BastionError, match="surrogate must be a white-box"):
        scan(masked, x, y, epsilons=[0.3], attacks=["apgd-ce"], surrogate=object())


class Noisy(nn.Module):
    """The digits CNN with Gaussian input noise: a randomised model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + 0.05 * torch.randn_like(x))


def test_thorough_attacks_a_randomised_model_through_eot(digits_cnn, pts):
    x, y = pts[0][:8], pts[1][:8]
    noisy = TorchModel(Noisy(digits_cnn.module), n_classes=10, input_shape=(1, 8, 8),
                       bounds=(0.0, 1.0), name="noisy")
    opts = {"apgd-ce": {"steps": 5, "restarts": 1}, "apgd-t": {"steps": 3,
            "n_target_classes": 1, "restarts": 1}, "fab-t": {"steps": 3, "n_target_classes": 1,
            "restarts": 1}, "square": {"max_queries": 10}}
    r = scan(noisy, x, y, epsilons=[0.2], preset="thorough", attack_options=opts,
             eot_samples=4, escalate=False, sanity_checks=False, seed=0)
    assert any("average of 4 draws (EOT)" in w for w in r.warnings)
    assert r.robust_accuracy["0.2"] < r.clean_accuracy


def test_square_also_attacks_the_pilot_points(clean_report):
    r = clean_report
    n_pilot = r.stage_order["pilot_points"]
    square = next(s for s in r.per_attack if s.name == "square" and s.phase == "main")
    apgd = next(s for s in r.per_attack if s.name == "apgd-ce" and s.phase == "main")
    # gradient stages skip the pilot points (they ran there already); Square does not
    standing = round(r.robust_accuracy["0.1"] * r.n_points) + square.points_broken
    assert square.points_attacked == standing
    assert apgd.points_attacked <= r.n_points - n_pilot


def test_pilot_orders_stages_by_counted_queries_not_time():
    """The stage order comes from counted queries per removal (deterministic), never from
    wall time: a stage that is slow but cheap in queries still goes first."""
    from bastion.evaluate.scan import _order_stages

    stages = [("apgd-t", object()), ("fab-t", object()), ("square", object())]
    own = [
        {"stage": "apgd-t", "gradient": True, "s_per_removal": 0.1, "queries_per_removal": 90.0},
        {"stage": "fab-t", "gradient": True, "s_per_removal": 9.0, "queries_per_removal": 30.0},
        {"stage": "square", "gradient": False, "s_per_removal": None,
         "queries_per_removal": None},
    ]
    assert [n for n, _ in _order_stages(stages, own)] == ["fab-t", "apgd-t", "square"]
    own[1]["queries_per_removal"] = None  # removed nothing in the pilot: last of the gradients
    assert [n for n, _ in _order_stages(stages, own)] == ["apgd-t", "fab-t", "square"]


def test_escalation_restarts_the_survivors_closest_to_falling(digits_cnn, pts):
    """The margins a gradient-free stage leaves are the probability margins at its best
    inputs, and an escalation round attacks only the closest share of the survivors."""
    import numpy as np

    from bastion.evaluate.scan import _margins

    x, y = pts
    p = np.asarray(digits_cnn.predict_proba(x))
    done = np.zeros(len(y), dtype=bool)
    done[:3] = True
    m = _margins(digits_cnn, x, y, x, done, batch_size=7)
    assert np.isnan(m[:3]).all()
    rows = np.arange(3, len(y))
    other = p[rows].copy()
    other[np.arange(len(rows)), y[rows]] = -1
    assert np.allclose(m[3:], p[rows, y[rows]] - other.max(1))
    # an escalation round attacks the closest fifth of the survivors, by those margins
    from bastion.attacks import get_attack
    from bastion.evaluate.scan import _Cascade, _escalate

    correct = p.argmax(1) == y
    run = _Cascade(digits_cnn, None, x, y, correct[None].copy(), [0.05], "linf", 64, 0)
    rng = np.random.default_rng(0)
    run.margin = np.where(correct, rng.uniform(0.1, 0.9, len(y)), np.nan)[None]
    seen: list[np.ndarray] = []
    stage = run.stage

    def spy(*a, **kw):
        seen.append(kw["mask"].copy())
        return stage(*a, **kw)

    run.stage = spy
    standing = np.flatnonzero(correct)
    k = int(np.ceil(ESCALATION_SHARE["standard"] * len(standing)))
    closest = standing[np.argsort(run.margin[0, standing])[:k]]
    cutoff = float(run.margin[0, closest].max())
    sq = get_attack("square", norm="linf", seed=0, max_queries=30)
    rounds = _escalate(run, "standard", "linf", 0, 1, [("square", sq)])
    assert rounds and len(seen) == len(rounds)
    assert set(np.flatnonzero(seen[0])) == set(closest.tolist())
    assert rounds[0]["points_attacked"] == k
    assert rounds[0]["margin_cutoff"] == pytest.approx(cutoff)
