"""Adversarial training: PGD-AT, fast AT (with its guard), TRADES; resume; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _defend_helpers import pgd_accuracy

from bastion.defend import AdversarialTrainer, CheckpointError
from bastion.errors import BastionError, DataError, ModelError


def _fit(method, digits_cnn, digits_arrays, **kw):
    x_tr, y_tr, _, _ = digits_arrays
    opts = {"eps": 0.2, "epochs": 3, "steps": 5, "batch_size": 64, "lr": 3e-3, "seed": 0}
    opts.update(kw)
    tr = AdversarialTrainer(method=method, **opts)
    return tr, tr.fit(digits_cnn, (x_tr, y_tr))


@pytest.mark.parametrize("method,kw", [
    ("pgd-at", {}),
    ("fast-at", {"lr_schedule": "constant"}),
    ("fast-at", {"lr_schedule": "constant", "fast_variant": "nfgsm"}),
    ("trades", {"eps": 0.1, "beta": 1.0, "lr": 1e-3, "epochs": 3}),
])
def test_training_raises_pgd_robustness(method, kw, digits_cnn, digits_arrays, digits_eval):
    x, y = digits_eval
    tr, robust = _fit(method, digits_cnn, digits_arrays, **kw)
    # measured at eps 0.15, where the undefended model is weak (about 15% robust): at 0.1
    # it keeps about 70%, and the gain there (+5 to +13 points) swings with the CPU's
    # floating-point kernels (an AVX2 machine failed the old +8 margin); at 0.15 every
    # method gains 33 to 51 points there
    before = pgd_accuracy(digits_cnn, x, y, 0.15)
    after = pgd_accuracy(robust, x, y, 0.15)
    clean = pgd_accuracy(robust, x, y, 0.0)
    assert after > before + 0.2, (method, before, after)
    assert clean > 0.85
    assert len(tr.history_) == tr.epochs
    # the input model is untouched
    assert pgd_accuracy(digits_cnn, x, y, 0.0) == 1.0


def test_guard_catches_injected_collapse(digits_cnn, digits_arrays):
    seen = {}
    scores = {1: 0.40, 2: 0.55, 3: 0.05, 4: 0.60}

    def fake_eval(epoch, model):
        seen[epoch] = {k: v.clone() for k, v in model.module.state_dict().items()}
        return scores[epoch]

    tr, model = _fit("fast-at", digits_cnn, digits_arrays, epochs=4, guard_eval=fake_eval,
                     on_collapse="stop")
    assert tr.stopped_early_
    assert [h.epoch for h in tr.history_] == [1, 2, 3]
    assert tr.history_[-1].collapsed and tr.best_epoch_ == 2
    for k, v in model.module.state_dict().items():  # the best (epoch 2) weights were kept
        assert torch.equal(v, seen[2][k])


def test_guard_does_not_stop_a_healthy_run(digits_cnn, digits_arrays):
    # the real guard (PGD on the held-out batch) on ordinary fast AT: no false alarm.
    # (On 8x8 digits, FGSM without a random start and alpha >> eps did not collapse in
    # our trials - the network never became robust - so the collapse itself is tested
    # with an injected evaluation above.)
    tr, _ = _fit("fast-at", digits_cnn, digits_arrays, epochs=3, lr_schedule="constant")
    assert tr.guard and not tr.stopped_early_
    assert all(0.0 <= h.robust_accuracy <= h.clean_accuracy + 1e-9 for h in tr.history_)


def test_resume_continues_from_checkpoint(digits_cnn, digits_arrays, tmp_path):
    x_tr, y_tr, _, _ = digits_arrays
    kw = dict(method="pgd-at", eps=0.1, steps=3, batch_size=64, lr=3e-3, seed=0)
    first = AdversarialTrainer(epochs=1, checkpoint_dir=tmp_path, **kw)
    first.fit(digits_cnn, (x_tr, y_tr))
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["epoch"] == 1
    resumed = AdversarialTrainer(epochs=2, checkpoint_dir=tmp_path, **kw)
    m_resumed = resumed.fit(digits_cnn, (x_tr, y_tr))
    assert resumed.resumed_from_ == 1
    assert [h.epoch for h in resumed.history_] == [1, 2]
    straight = AdversarialTrainer(epochs=2, **kw).fit(digits_cnn, (x_tr, y_tr))
    for (k, a), b in zip(m_resumed.module.state_dict().items(),
                         straight.module.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k
    # a finished run is not trained again
    again = AdversarialTrainer(epochs=2, checkpoint_dir=tmp_path, **kw)
    again.fit(digits_cnn, (x_tr, y_tr))
    assert again.resumed_from_ == 2 and len(again.history_) == 2


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(digits_cnn, digits_arrays, tmp_path):
    x_tr, y_tr, _, _ = digits_arrays
    kw = dict(method="fast-at", eps=0.1, batch_size=128, lr=1e-3, seed=0)
    AdversarialTrainer(epochs=1, checkpoint_dir=tmp_path, **kw).fit(digits_cnn, (x_tr, y_tr))
    with pytest.raises(CheckpointError, match="other training settings"):
        AdversarialTrainer(epochs=2, checkpoint_dir=tmp_path, **{**kw, "eps": 0.2}).fit(
            digits_cnn, (x_tr, y_tr))
    tfile = next(tmp_path.glob("state-*.safetensors"))
    tfile.write_bytes(tfile.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="corrupt"):
        AdversarialTrainer(epochs=2, checkpoint_dir=tmp_path, **kw).fit(digits_cnn,
                                                                        (x_tr, y_tr))
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        AdversarialTrainer(epochs=2, checkpoint_dir=tmp_path, **kw).fit(digits_cnn,
                                                                        (x_tr, y_tr))


def test_bad_inputs(digits_cnn, digits_arrays):
    x_tr, y_tr, _, _ = digits_arrays
    bad = x_tr.copy()
    bad[3, 0, 2, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        AdversarialTrainer(epochs=1).fit(digits_cnn, (bad, y_tr))
    with pytest.raises(BastionError, match="larger than the data range"):
        AdversarialTrainer(eps=1.5, epochs=1).fit(digits_cnn, (x_tr, y_tr))
    with pytest.raises(BastionError, match="unknown training method"):
        AdversarialTrainer(method="magic")

    from sklearn.linear_model import LogisticRegression

    from bastion.models.sklearn_model import SklearnModel

    est = LogisticRegression(max_iter=200).fit(x_tr.reshape(len(x_tr), -1)[:300], y_tr[:300])
    sk = SklearnModel(est, n_classes=10, input_shape=(64,))
    with pytest.raises(ModelError, match="smooth"):
        AdversarialTrainer(epochs=1).fit(sk, (x_tr.reshape(len(x_tr), -1), y_tr))


def test_mix_warmup_label_smoothing_weight_decay_run(digits_cnn, digits_arrays):
    tr, m = _fit("pgd-at", digits_cnn, digits_arrays, epochs=2, steps=2, adv_fraction=0.5,
                 eps_warmup=2.0, label_smoothing=0.1, weight_decay=1e-4,
                 lr_schedule="cyclic", optimizer="sgd", lr=0.05)
    assert tr.history_[0].eps == pytest.approx(0.1) and tr.history_[1].eps == pytest.approx(0.2)
    assert np.isfinite(tr.history_[-1].loss)


def test_nfgsm_inner_step_is_not_projected_onto_the_ball():
    from bastion.defend import _inner

    torch.manual_seed(0)
    w = torch.randn(64, 10)

    def f(x):
        return x.flatten(1) @ w

    x = torch.rand(32, 1, 8, 8)
    y = torch.randint(0, 10, (32,))
    g = torch.Generator().manual_seed(0)
    rs = _inner.fgsm_rs(f, x, y, eps=0.1, norm="linf", alpha=0.125, bounds=(0.0, 1.0),
                        generator=g)
    nf = _inner.fgsm_rs(f, x, y, eps=0.1, norm="linf", alpha=0.1, bounds=(0.0, 1.0),
                        generator=g, noise=0.2, project_ball=False)
    assert float((rs - x).abs().max()) <= 0.1 + 1e-6
    d = (nf - x).abs()
    assert 0.1 + 1e-3 < float(d.max()) <= 0.3 + 1e-6  # beyond eps, within noise + step
    assert float(nf.min()) >= 0.0 and float(nf.max()) <= 1.0


def test_fast_variant_settings_and_bad_values():
    tr = AdversarialTrainer(method="fast-at", eps=0.2, fast_variant="nfgsm")
    assert tr.alpha == pytest.approx(0.2)
    assert AdversarialTrainer(method="fast-at", eps=0.2).alpha == pytest.approx(0.25)
    with pytest.raises(BastionError, match="unknown fast_variant"):
        AdversarialTrainer(method="fast-at", fast_variant="gradalign")
    with pytest.raises(BastionError, match="noise_mult"):
        AdversarialTrainer(method="fast-at", noise_mult=-1.0)


def test_weight_averaging_returns_the_average_and_resumes_exactly(digits_cnn, digits_arrays,
                                                                 tmp_path):
    """``ema_decay``: the returned weights are the running average (not the last
    step's), a resumed run reproduces a straight one, and bad decays are refused."""
    x_tr, y_tr, _, _ = digits_arrays
    kw = dict(method="pgd-at", eps=0.1, steps=2, batch_size=64, lr=3e-3, seed=0)
    plain = AdversarialTrainer(epochs=2, **kw).fit(digits_cnn, (x_tr, y_tr))
    avg = AdversarialTrainer(epochs=2, ema_decay=0.9, **kw).fit(digits_cnn, (x_tr, y_tr))
    # same training trajectory, so the average differs from the last weights but not by
    # much, and it still classifies
    diffs = [float((a - b).abs().max()) for a, b in zip(
        avg.module.state_dict().values(), plain.module.state_dict().values(), strict=True)]
    assert max(diffs) > 1e-4
    x_te, y_te = digits_arrays[2], digits_arrays[3]
    assert float((avg.predict_proba(x_te).argmax(1) == y_te).mean()) > 0.8
    first = AdversarialTrainer(epochs=1, ema_decay=0.9, checkpoint_dir=tmp_path, **kw)
    first.fit(digits_cnn, (x_tr, y_tr))
    resumed = AdversarialTrainer(epochs=2, ema_decay=0.9, checkpoint_dir=tmp_path, **kw)
    m_resumed = resumed.fit(digits_cnn, (x_tr, y_tr))
    assert resumed.resumed_from_ == 1
    for (k, a), b in zip(m_resumed.module.state_dict().items(),
                         avg.module.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(BastionError, match="ema_decay"):
            AdversarialTrainer(ema_decay=bad)
