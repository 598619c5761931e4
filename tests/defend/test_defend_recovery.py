"""Recovery from catastrophic overfitting, several seeds with a spread, and the machine
facts in reports (issue 21)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bastion.defend import AdversarialTrainer, harden
from bastion.defend.seeds import derive_seeds, split_validation, spread
from bastion.envinfo import cpu_info, environment
from bastion.errors import BastionError


def _state(model):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _same(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.module.state_dict().items())


def test_injected_collapse_recovers_and_ends_on_the_best(digits_cnn, digits_arrays):
    x_tr, y_tr, _, _ = digits_arrays
    scores = {0: 0.0, 1: 0.40, 2: 0.55, 3: 0.05, 4: 0.60, 5: 0.45}
    seen = {}

    def fake_eval(epoch, model):
        seen[epoch] = _state(model)
        return scores[epoch]

    tr = AdversarialTrainer(method="fast-at", eps=0.1, epochs=5, batch_size=64, lr=3e-3,
                            lr_schedule="constant", guard_eval=fake_eval, seed=0)
    model = tr.fit(digits_cnn, (x_tr, y_tr))
    assert not tr.stopped_early_ and [h.epoch for h in tr.history_] == [1, 2, 3, 4, 5]
    assert tr.history_[2].collapsed and tr.history_[2].recovered
    (rec,) = tr.recoveries_
    assert rec["epoch"] == 3 and rec["restored_epoch"] == 2
    assert rec["lr_scale"] == 0.5 and rec["step_scale"] == 0.8
    # training went on from epoch 2's weights with half the learning rate
    assert tr.history_[3].lr == pytest.approx(1.5e-3) and tr.history_[1].lr == 3e-3
    # epoch 5 (0.45) is worse than epoch 4 (0.60): the run ends on epoch 4's weights
    assert tr.ended_on_best_ and tr.best_epoch_ == 4
    assert _same(model, seen[4])


def test_collapse_after_the_last_recovery_stops(digits_cnn, digits_arrays):
    x_tr, y_tr, _, _ = digits_arrays
    scores = iter([0.0, 0.5, 0.05, 0.5, 0.05, 0.9])
    tr = AdversarialTrainer(method="fast-at", eps=0.1, epochs=5, batch_size=64, lr=3e-3,
                            max_recoveries=1, guard_eval=lambda e, m: next(scores), seed=0)
    tr.fit(digits_cnn, (x_tr, y_tr))
    assert len(tr.recoveries_) == 1 and tr.stopped_early_
    assert [h.epoch for h in tr.history_] == [1, 2, 3, 4]
    # stop-only is still there
    scores = iter([0.5, 0.05, 0.9])
    st = AdversarialTrainer(method="fast-at", eps=0.1, epochs=3, batch_size=64, lr=3e-3,
                            on_collapse="stop", guard_eval=lambda e, m: next(scores), seed=0)
    st.fit(digits_cnn, (x_tr, y_tr))
    assert st.stopped_early_ and not st.recoveries_ and len(st.history_) == 2


def test_real_collapse_from_a_too_large_step_recovers(zoo_cnn, digits_arrays):
    """No injected scores: the guard runs real PGD (on test points, fixed), the step is a
    learning rate far too large for Adam, and robust accuracy really collapses."""
    from _defend_helpers import pgd_accuracy

    x_tr, y_tr, x_te, y_te = digits_arrays
    xg, yg = x_te[:150], y_te[:150]
    seen: dict[int, tuple[float, dict]] = {}

    def guard(epoch, model):
        acc = pgd_accuracy(model, xg, yg, 0.05, steps=5)
        seen[epoch] = (acc, _state(model))
        return acc

    start = pgd_accuracy(zoo_cnn, xg, yg, 0.05, steps=5)
    tr = AdversarialTrainer(method="fast-at", eps=0.05, epochs=3, batch_size=64, lr=0.1,
                            lr_schedule="constant", recovery_lr_factor=0.05,
                            guard_eval=guard, seed=0)
    model = tr.fit(zoo_cnn, (x_tr, y_tr))
    assert start > 0.5, start  # the clean-trained CNN holds at eps 0.05 ...
    assert tr.history_[0].collapsed and tr.history_[0].robust_accuracy < start - 0.2
    assert tr.recoveries_ and tr.recoveries_[0]["restored_epoch"] == 0
    assert not tr.stopped_early_
    # ... and the run ends no worse than its best checkpoint on the guard's points
    best = max(acc for e, (acc, _) in seen.items()
               if e == 0 or not tr.history_[e - 1].collapsed)
    final = pgd_accuracy(model, xg, yg, 0.05, steps=5)
    assert final >= best - 1e-9, (final, best, [h.robust_accuracy for h in tr.history_])


@pytest.mark.parametrize("kw,msg", [
    ({"on_collapse": "retry"}, "unknown on_collapse"),
    ({"max_recoveries": -1}, "max_recoveries"),
    ({"max_recoveries": 1.5}, "max_recoveries"),
    ({"recovery_lr_factor": 0.0}, "recovery_lr_factor"),
    ({"recovery_step_factor": 2.0}, "recovery_step_factor"),
    ({"recovery_pgd_steps": -2}, "recovery_pgd_steps"),
])
def test_bad_recovery_settings_are_one_clear_error(kw, msg):
    with pytest.raises(BastionError, match=msg):
        AdversarialTrainer(method="fast-at", **kw)


def test_recovery_can_switch_to_few_step_pgd(digits_cnn, digits_arrays):
    x_tr, y_tr, _, _ = digits_arrays
    scores = iter([0.0, 0.5, 0.05, 0.5])
    tr = AdversarialTrainer(method="fast-at", eps=0.1, epochs=3, batch_size=64, lr=3e-3,
                            recovery_pgd_steps=3, guard_eval=lambda e, m: next(scores),
                            seed=0)
    tr.fit(digits_cnn, (x_tr, y_tr))
    assert tr.recoveries_[0]["inner_pgd_steps"] == 3 and tr.inner_steps_ == 3


def test_recovery_state_survives_resume(digits_cnn, digits_arrays, tmp_path):
    x_tr, y_tr, _, _ = digits_arrays
    scores = {0: 0.0, 1: 0.5, 2: 0.05, 3: 0.6, 4: 0.6}
    kw = dict(method="fast-at", eps=0.1, batch_size=64, lr=3e-3, lr_schedule="constant",
              checkpoint_dir=tmp_path, seed=0, guard_eval=lambda e, m: scores[e])
    first = AdversarialTrainer(epochs=3, **kw)
    first.fit(digits_cnn, (x_tr[:400], y_tr[:400]))
    assert len(first.recoveries_) == 1
    again = AdversarialTrainer(epochs=4, **kw)
    again.fit(digits_cnn, (x_tr[:400], y_tr[:400]))
    assert again.resumed_from_ == 3 and again.recoveries_ == first.recoveries_
    assert again.history_[-1].lr == pytest.approx(1.5e-3)


# -- seeds ---------------------------------------------------------------------------------
def test_seed_helpers():
    assert derive_seeds(7, 3) == [7, 1007, 2007] and derive_seeds(7, 1) == [7]
    for bad in (0, -1, 2.5, True, "3", 51):
        with pytest.raises(BastionError, match="seeds must be a whole number"):
            derive_seeds(0, bad)
    x, y = np.arange(100.0)[:, None], np.arange(100) % 10
    xf, yf, xv, yv = split_validation(x, y, seed=0, fraction=0.1)
    assert len(xv) == 10 and len(xf) == 90
    assert not set(xv[:, 0]) & set(xf[:, 0])  # disjoint
    assert np.array_equal(split_validation(x, y, seed=0)[2], xv)  # the same for every seed
    s = spread([0.9, 0.8, 0.85])
    assert s["median"] == 0.85 and s["min"] == 0.8 and s["max"] == 0.9 and s["n"] == 3


def test_harden_with_seeds_reports_each_seed_and_keeps_the_validation_best(
        zoo_cnn, digits_ds, tmp_path):
    out = tmp_path / "seeds"
    res = harden(zoo_cnn, digits_ds, method="fast-at", eps=0.1, epochs=1, seed=3,
                 options={"seeds": 2, "batch_size": 64, "lr": 3e-3}, epsilons=[0.1],
                 attacks=["pgd"], attack_options={"pgd": {"steps": 5}}, limit=40,
                 sanity_checks=False, out=out)
    s = res.report.seeds
    assert s["seeds"] == [3, 1003] and len(s["runs"]) == 2
    best = max(s["runs"], key=lambda r: (r["val_robust_accuracy"], r["val_clean_accuracy"]))
    assert s["kept_seed"] == best["seed"]
    assert "validation" in s["selection"] and "test set played no part" in s["selection"]
    med = s["stats"]["test_robust_accuracy"]
    vals = [r["test"]["robust_accuracy"] for r in s["runs"]]
    assert med["median"] == pytest.approx(float(np.median(vals)))
    assert med["min"] == min(vals) and med["max"] == max(vals)
    rep = json.loads((out / "report.json").read_text())
    assert rep["seeds"]["kept_seed"] == s["kept_seed"]
    assert rep["environment"]["torch_version"] == torch.__version__
    html = (out / "report.html").read_text()
    assert "Seeds" in html and "median" in html and rep["environment"]["cpu_model"] in html
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"seed-3", "seed-1003"}


def test_environment_facts(tmp_path):
    env = environment()
    assert env["torch_threads"] == torch.get_num_threads() and env["cpu_count"]
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse4_2 avx "
                    "avx2 avx512f\n\nprocessor\t: 1\nmodel name\t: Other\nflags\t: fpu\n")
    assert cpu_info(fake) == {"model": "Test CPU 9000",
                              "flags": ["sse4_2", "avx", "avx2", "avx512f"]}
    assert cpu_info(tmp_path / "missing")["flags"] == []
