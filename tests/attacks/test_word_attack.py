"""The word attack's search on a model whose every answer is known: a toy intent scorer
(a weight a word), a toy sentence encoder (mean of word vectors) and a small neighbour
space. Nothing is downloaded; each test runs in milliseconds.

The attacker's view: the budget counts every text the victim model sees, the constraints
hold for whatever the attack returns, no query is spent on a candidate the (free)
similarity check rules out, and the last change a text allows is never spent on a swap
that does not flip the label."""

from __future__ import annotations

import numpy as np
import pytest

from bastion.attacks.text import get_text_attack
from bastion.attacks.text.base import Similarity, TextConstraints, split_words
from bastion.attacks.text.neighbours import WordNeighbours
from bastion.attacks.text.wordlevel import WordSubstitution, reachable_margin
from bastion.errors import BastionError

# class 0 ("travel") logit: sum of the weights minus BIAS; class 1 logit: 0
WEIGHTS = {"book": 3.0, "reserve": 2.0, "order": 1.5, "cheap": 0.2, "flight": 2.0,
           "trip": 1.5, "cruise": -1.0, "xylophone": -5.0, "tickets": 0.5, "bargain": 0.4}
BIAS = 3.0
GROUPS = {"book": 0, "reserve": 0, "order": 0, "flight": 1, "trip": 1, "cruise": 1,
          "xylophone": 1, "cheap": 2, "bargain": 2, "tickets": 3}


def _word_vectors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 32))
    vec = {}
    for w, g in GROUPS.items():
        v = base[g] + 0.05 * rng.normal(size=32)
        if w == "xylophone":  # a neighbour of "flight", but far from it
            v = 0.5 * base[g] + rng.normal(size=32)
        vec[w] = v / np.linalg.norm(v)
    return vec


VEC = _word_vectors()


class ToyEncoder:
    """Sentence vector: the normalised mean of its words' vectors."""

    def encode(self, texts: list[str]) -> np.ndarray:
        out = []
        for t in texts:
            ws = [VEC[w.lower()] for w in split_words(t)[1::2] if w.lower() in VEC]
            v = np.mean(ws, axis=0) if ws else np.ones(32)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out)


class ToyModel:
    n_classes = 2

    def __init__(self, bias: float = BIAS) -> None:
        self.bias = bias
        self.seen: list[str] = []

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        self.seen += list(texts)
        z = np.array([sum(WEIGHTS.get(w.lower(), 0.0) for w in split_words(t)[1::2])
                      - self.bias for t in texts])
        p0 = 1 / (1 + np.exp(-z))
        return np.stack([p0, 1 - p0], axis=1)


def _attack(**kw):
    words = list(VEC)
    nb = WordNeighbours(np.stack([VEC[w] for w in words]), words, min_cos=0.3)
    kw.setdefault("max_queries", 100)
    kw.setdefault("constraints", TextConstraints(min_similarity=0.95, max_word_share=0.25))
    return WordSubstitution(neighbours=nb, similarity=Similarity(ToyEncoder()), **kw)


TEXT = "book cheap flight tickets"  # 4 words: one change allowed


def test_premises_of_the_toy():
    sim = Similarity(ToyEncoder())
    assert sim(TEXT, ["book cheap xylophone tickets"])[0] < 0.95  # ruled out for free
    assert sim(TEXT, ["book cheap cruise tickets"])[0] >= 0.95
    m = ToyModel()
    assert m.predict_proba([TEXT])[0].argmax() == 0
    # the most important word by deletion ("book") has no flipping swap, "flight" has one
    assert (m.predict_proba(["reserve cheap flight tickets",
                             "order cheap flight tickets"]).argmax(1) == 0).all()
    assert m.predict_proba(["book cheap cruise tickets"])[0].argmax() == 1


def test_last_change_is_not_spent_on_a_swap_that_does_not_flip():
    model = ToyModel()
    r = _attack().attack_text(model, TEXT, 0)
    # TextFooler's greedy search keeps the best swap of "book" (no flip) and, one change
    # allowed, stops there; this search tries "flight" next from the original text
    assert r.success and r.adversarial == "book cheap cruise tickets"
    assert r.words_changed == 1 and r.similarity >= 0.95
    # every text the model saw is counted, and none failed the similarity check
    assert r.queries == len(model.seen)
    assert not any("xylophone" in t for t in model.seen)
    # 1 (original) + 4 deletions + the swaps of "book" that pass the similarity check
    # (at most its 3 neighbours) + those of "flight" up to the flip (at most 2)
    assert r.queries <= 1 + 4 + 3 + 2


@pytest.mark.parametrize("budget", [2, 3, 5, 6, 7])
def test_budget_is_exact(budget):
    model = ToyModel()
    r = _attack(max_queries=budget).attack_text(model, TEXT, 0)
    assert r.queries <= budget
    assert len(model.seen) <= budget + 1  # at most one final check beyond the budget
    if r.success:
        assert ToyModel().predict_proba([r.adversarial])[0].argmax() == 1
        assert r.similarity >= 0.95 and r.words_changed == 1


def test_robust_text_is_given_up_after_the_ranking():
    model = ToyModel(bias=-10.0)  # every deletion still leaves a margin of about 8
    r = _attack(give_up=4.0).attack_text(model, TEXT, 0)
    assert not r.success and r.adversarial == TEXT
    assert r.queries == len(model.seen) == 1 + 4
    model = ToyModel(bias=-10.0)
    r = _attack(give_up=float("inf")).attack_text(model, TEXT, 0)
    assert r.queries > 1 + 4  # never giving up: the swaps are tried


def test_reachable_margin_adds_the_limit_largest_drops():
    # drops from m0 = 5: 1, 2, none (a deletion that raises the margin), none
    assert reachable_margin(5.0, [4.0, 3.0, 6.0, 5.0], 1) == 3.0  # = the smallest margin
    assert reachable_margin(5.0, [4.0, 3.0, 6.0, 5.0], 2) == 2.0
    assert reachable_margin(5.0, [4.0, 3.0, 6.0, 5.0], 10) == 2.0  # rises never count
    assert reachable_margin(5.0, [4.0], 0) == 4.0  # at least one change


def test_give_up_weighs_what_the_word_limit_allows():
    # every single deletion leaves a margin >= 3 (z = 6.0 - 3 for "book"), so a text that
    # allows one change is given up; a text that allows two changes ("book" and "flight"
    # together: 6.0 - 5 = 1.0 < 2.5) is attacked
    short = ToyModel(bias=-0.3)
    r = _attack(give_up=2.5).attack_text(short, TEXT, 0)
    assert r.queries == len(short.seen) == 1 + 4 and not r.success
    long_text = "please book cheap flight tickets now for me"  # 8 words: two changes
    assert TextConstraints().max_changes(8) == 2
    model = ToyModel(bias=-0.3)
    att = _attack(give_up=2.5)
    editable = len(att.constraints.editable(split_words(long_text)))
    r = att.attack_text(model, long_text, 0)
    assert r.queries > 1 + editable  # swaps were tried after the ranking
    assert r.queries == len(model.seen)


def test_stop_words_and_share_of_words_hold_over_many_texts():
    texts = ["please book cheap flight tickets now", "book the cheap flight",
             "order a trip", "book cheap bargain flight tickets for me please"]
    model = ToyModel()
    rep = _attack(constraints=TextConstraints(min_similarity=0.9, max_word_share=0.34)
                  ).run(model, texts, [0] * len(texts))
    cons = TextConstraints(min_similarity=0.9, max_word_share=0.34)
    assert rep.successes
    for r in rep.results:
        if not r.success:
            continue
        a, b = split_words(r.original), split_words(r.adversarial)
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        assert len(diff) == r.words_changed <= cons.max_changes(r.n_words)
        assert all(a[i].lower() not in {"please", "now", "the", "a", "for", "me"}
                   for i in diff)
        assert r.similarity >= 0.9


def test_similarity_order_and_bad_options():
    r = _attack(order="similarity").attack_text(ToyModel(), TEXT, 0)
    assert r.success
    with pytest.raises(BastionError, match="order"):
        get_text_attack("word", order="random")
    with pytest.raises(BastionError, match="give_up"):
        get_text_attack("word", give_up=0)
    with pytest.raises(BastionError, match="at least 1"):
        get_text_attack("word", chunk=0)
    # what `--set word.give_up=abc` passes: one clear line, not a ValueError
    with pytest.raises(BastionError, match="must be numbers"):
        get_text_attack("word", give_up="abc")
    with pytest.raises(BastionError, match="must be numbers"):
        get_text_attack("word", candidates=[1])
