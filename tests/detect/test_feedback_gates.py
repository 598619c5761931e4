"""The backdoor gates' math on constructed inputs (class absorption, the paired
Neural-Cleanse anomaly index, STRIP excess) and the feedback screen's bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from bastion.detect.feedback import class_absorption, paired_trigger_anomaly, strip_excess


def test_class_absorption_flags_the_class_that_takes_answers():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 300)
    champ = y.copy()
    champ[:15] = (y[:15] + 1) % 10          # the champion's own errors
    cand = champ.copy()
    movers = np.flatnonzero((y != 7) & (champ == y))[:12]
    cand[movers] = 7                        # 12 right answers now say 7
    t = class_absorption(y, champ, cand, n_classes=10)
    assert t.flagged == [7]
    row = t.detail["classes"][7]
    assert row["wrong_into"] == 12 and row["out_of"] == 0 and row["p_value"] < 1e-3
    assert row["share_candidate"] > row["share_champion"]


def test_class_absorption_ignores_symmetric_churn_and_fixes():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 10, 300)
    champ = y.copy()
    champ[:40] = (y[:40] + 3) % 10          # the champion was wrong on 40 (a drift)
    cand = y.copy()                          # the candidate fixed them: answers move out
    assert class_absorption(y, champ, cand, n_classes=10).flagged == []
    # random churn between classes: as many answers leave each class as enter it
    cand2 = champ.copy()
    i = rng.choice(300, 30, replace=False)
    cand2[i] = rng.integers(0, 10, 30)
    assert class_absorption(y, champ, cand2, n_classes=10).flagged == []
    # a handful below min_count is not enough
    cand3 = champ.copy()
    cand3[np.flatnonzero((y != 2) & (champ == y))[:3]] = 2
    assert class_absorption(y, champ, cand3, n_classes=10, min_count=4).flagged == []
    with pytest.raises(ValueError):
        class_absorption(y, champ[:10], cand, n_classes=10)


def test_paired_anomaly_compares_with_the_champion():
    champ = np.array([11.0, 12.0, 10.0, 9.0, 10.0, 11.0, 12.0, 3.0, 11.0, 10.0])
    # an honest candidate with the champion's naturally small class 7: nothing flagged,
    # although the candidate's own (unpaired) index flags 7
    honest = champ * np.array([1.02, 0.97, 1.0, 1.05, 0.98, 1.01, 0.99, 1.0, 1.03, 0.96])
    t = paired_trigger_anomaly(honest, champ)
    assert t.flagged == [] and 7 in t.detail["candidate_own_flagged"]
    # a backdoor into class 2: its trigger shrank to a third of the champion's
    bd = honest.copy()
    bd[2] = champ[2] / 3
    t = paired_trigger_anomaly(bd, champ)
    assert t.flagged == [2]
    assert t.detail["ratio"][2] == pytest.approx(1 / 3, abs=1e-3)
    assert t.detail["anomaly_index"][2] > 2.0
    # every class got uniformly easier (e.g. a smoother model): not one class, no flag
    assert paired_trigger_anomaly(champ * 0.5, champ).flagged == []
    # a large index on a small ratio change is MAD noise: max_ratio holds it back
    tiny = champ.copy()
    tiny[4] *= 0.8
    assert paired_trigger_anomaly(tiny, champ).flagged == []
    assert paired_trigger_anomaly(tiny, champ, max_ratio=0.9).flagged == [4]
    # a class that got *harder* is never flagged
    hard = champ.copy()
    hard[5] *= 3
    assert paired_trigger_anomaly(hard, champ).flagged == []
    with pytest.raises(ValueError):
        paired_trigger_anomaly(champ[:5], champ)


def test_strip_excess_per_predicted_class():
    rng = np.random.default_rng(2)
    pred = rng.integers(0, 10, 500)
    flags = rng.random(500) < 0.01          # the calibrated false-positive rate
    assert strip_excess(flags, pred, n_classes=10, fpr=0.01).flagged == []
    flags2 = flags.copy()
    flags2[np.flatnonzero(pred == 7)[:12]] = True
    t = strip_excess(flags2, pred, n_classes=10, fpr=0.01)
    assert t.flagged == [7]
    assert next(r for r in t.detail["classes"] if r["class"] == 7)["low_entropy"] >= 12
