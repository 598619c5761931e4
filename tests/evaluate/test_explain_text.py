"""Word attributions for text models (captum): integrated gradients in the embedding space
of a tiny BERT built here from a config and trained on a toy task (class 1 iff the text
holds the word "bad"): completeness, the deciding word on top, determinism, truncation,
blank texts; KernelSHAP through a black-box wrapper with only ``predict_proba``; bad
requests are one clear error."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("captum")

from bastion.errors import BastionError  # noqa: E402
from bastion.evaluate.explain import explain_text, text_method_for  # noqa: E402
from bastion.models.text import HFTextModel, MeanPoolNet, MeanPoolTextModel  # noqa: E402

WORDS = ["book", "a", "flight", "to", "paris", "play", "some", "music", "what", "is", "the",
         "weather", "today", "good", "bad"]
OTHER = [w for w in WORDS if w != "bad"]


def toy_texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Random sentences over the vocabulary; every second one holds "bad" (class 1)."""
    r = random.Random(seed)
    xs, ys = [], []
    for i in range(n):
        ws = [r.choice(OTHER) for _ in range(r.randint(3, 8))]
        if i % 2:
            ws.insert(r.randrange(len(ws) + 1), "bad")
        xs.append(" ".join(ws))
        ys.append(i % 2)
    return xs, ys


def train_toy(net, tok, *, cls: bool, lr: float, epochs: int, label_smoothing: float):
    """Train ``net`` on 400 toy texts (Adam, batches of 32, seeded)."""
    xs, ys = toy_texts(400, seed=0)
    enc = tok(xs, padding=True, return_tensors="pt")
    y = torch.tensor(ys)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 32):
            b = perm[i:i + 32]
            ids, mask = enc["input_ids"][b], enc["attention_mask"][b]
            out = net(input_ids=ids, attention_mask=mask).logits if cls else \
                net(net.encoder.get_input_embeddings()(ids), mask)
            loss = torch.nn.functional.cross_entropy(out, y[b], label_smoothing=label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


def toy_tokenizer(d):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab=str(d / "vocab.txt")), len(vocab)


def tiny_config(vocab_size: int, layers: int, **kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=layers,
                      num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                      **kw)


def check_learned(model) -> None:
    xt, yt = toy_texts(100, seed=1)
    acc = float((model.predict_proba(xt).argmax(1) == np.asarray(yt)).mean())
    assert acc >= 0.98, acc  # it learned the rule
    model.queries = 0


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """The zoo's text model class (:class:`MeanPoolTextModel`: encoder, mean pooling,
    linear head) over a 1-layer BERT (hidden 16, 15-word vocabulary, default dropout)
    built from a config, trained until it keys on "bad" (label smoothing 0.1 keeps its
    logits off saturation); max_length 16."""
    from transformers import BertModel

    tok, n_vocab = toy_tokenizer(tmp_path_factory.mktemp("toy-vocab"))
    torch.manual_seed(0)
    net = MeanPoolNet(BertModel(tiny_config(n_vocab, 1), add_pooling_layer=False), 2)
    train_toy(net, tok, cls=False, lr=3e-3, epochs=6, label_smoothing=0.1)
    net.requires_grad_(False)
    model = MeanPoolTextModel(net, tok, layers=1, fine_tuned=True, n_classes=2,
                              class_names=["fine", "bad"], max_length=16)
    check_learned(model)
    return model


@pytest.fixture(scope="module")
def keyed_cls(tmp_path_factory):
    """A Hugging Face ``BertForSequenceClassification`` (2 layers, [CLS] pooling) trained
    on the same task, as ``HFTextModel``."""
    from transformers import BertForSequenceClassification

    tok, n_vocab = toy_tokenizer(tmp_path_factory.mktemp("toy-vocab-cls"))
    torch.manual_seed(0)
    net = BertForSequenceClassification(tiny_config(n_vocab, 2, num_labels=2))
    train_toy(net, tok, cls=True, lr=1e-2, epochs=4, label_smoothing=0.0)
    model = HFTextModel(net, tok, n_classes=2, class_names=["fine", "bad"], max_length=16)
    check_learned(model)
    return model


def logit_gap(model, text: str, target: int) -> float:
    """logit(text) - logit(baseline) for ``target``, the baseline built here from the
    token ids: the pad embedding everywhere but [CLS] and [SEP]."""
    tok = model.tokenizer
    enc = tok([text], truncation=True, max_length=model.max_length, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    layer = model.embedding_layer()
    emb = layer(ids)
    keep = (ids == tok.cls_token_id) | (ids == tok.sep_token_id)
    base = torch.where(keep[..., None], emb, layer(torch.full_like(ids, tok.pad_token_id)))
    with torch.no_grad():
        hi = model._logits_from_embeds(emb, mask)[0, target]
        lo = model._logits_from_embeds(base, mask)[0, target]
    return float(hi - lo)


def test_integrated_gradients_words_completeness_and_the_deciding_word(keyed):
    texts = ["play some music bad today", "bad weather to paris", "book a flight to paris",
             "what is   the\tweather bad"]
    assert text_method_for(keyed) == "integrated_gradients"
    q0 = keyed.queries
    out = explain_text(keyed, texts, n_steps=64)
    # one predict for the targets, then n_steps + 2 forward rows per text
    assert keyed.queries - q0 == len(texts) + len(texts) * (64 + 2)
    probs = keyed.predict_proba(texts)
    for text, e, p in zip(texts, out, probs, strict=True):
        assert e.method == "integrated_gradients"
        assert e.target == int(p.argmax())
        assert e.words == text.split()
        assert [text[a:b] for a, b in e.spans] == e.words
        assert len(e.attribution) == len(e.words)
        assert all(math.isfinite(v) for v in e.attribution)
        assert e.truncated_at is None
        # completeness: the words' attributions add up to logit(x) - logit(baseline)
        gap = logit_gap(keyed, text, e.target)
        if "bad" in e.words:
            assert gap > 1.0  # a real gap to explain (the baseline has no "bad")
        tol = 0.05 * max(1.0, abs(gap))
        assert sum(e.attribution) == pytest.approx(gap, abs=tol)
        assert abs(e.delta) < tol
        d = e.as_dict()
        assert d["unit"] == "word" and d["words"] == e.words and len(d["attribution"]) == \
            len(e.words) and d["spans"][0] == list(e.spans[0])
    # the word that decides the class carries the largest attribution for it
    for text, e in zip(texts, out, strict=True):
        if "bad" in text.split():
            assert e.target == 1
            assert e.words[int(np.argmax(e.attribution))] == "bad", (text, e.attribution)
    # and, for the other class, the most negative one
    e = explain_text(keyed, ["play some music bad today"], targets=[0])[0]
    assert e.target == 0 and e.words[int(np.argmin(e.attribution))] == "bad"


@pytest.mark.parametrize(("fixture", "attr"), [("keyed", "net"), ("keyed_cls", "module")])
def test_deterministic_and_modules_left_as_they_were(request, fixture, attr):
    model = request.getfixturevalue(fixture)
    net = getattr(model, attr)
    texts = ["bad weather to paris", "play some music"]
    a = explain_text(model, texts, seed=3)
    b = explain_text(model, texts, seed=3)
    assert [e.attribution for e in a] == [e.attribution for e in b]
    assert [e.delta for e in a] == [e.delta for e in b]
    assert not net.training
    # a module left in train mode (dropout on) is explained in eval mode, then restored
    net.train()
    try:
        c = explain_text(model, texts, seed=3)
        assert net.training
    finally:
        net.eval()
    np.testing.assert_allclose([v for e in c for v in e.attribution],
                               [v for e in a for v in e.attribution], atol=1e-6)


def test_cls_pooled_bert_baseline_and_delta(keyed_cls):
    """A [CLS]-pooled BERT: the baseline is the one documented (the attributions' sum
    minus captum's delta is the logit gap computed here), the deciding word is on top.
    Its logit jumps along the path (attention switching), so 32 steps do not converge:
    the delta says so (printed, not asserted)."""
    texts = ["play some music bad today", "bad weather to paris"]
    for e, text in zip(explain_text(keyed_cls, texts), texts, strict=True):
        gap = logit_gap(keyed_cls, text, e.target)
        assert sum(e.attribution) - e.delta == pytest.approx(gap, abs=1e-3 * max(1, gap))
        assert e.target == 1 and e.words[int(np.argmax(e.attribution))] == "bad"
        print(f"[CLS] BERT, 32 steps: gap {gap:.3f}, convergence delta {e.delta:.3f}")


def test_truncation_blank_texts_and_subwords(keyed):
    # max_length 16: [CLS], 14 word pieces, [SEP]; each vocabulary word is one piece
    words = (OTHER * 2)[:20]
    text = " ".join(words)
    e = explain_text(keyed, [text])[0]
    assert len(e.words) == len(e.attribution) == 20
    cut = e.spans[13][1]  # the 14th word is the last one the model saw
    assert e.truncated_at == cut and text[cut:].strip()
    assert all(v == 0.0 for v in e.attribution[14:])
    assert any(v != 0.0 for v in e.attribution[:14])
    assert sum(e.attribution) == pytest.approx(
        logit_gap(keyed, text, e.target), abs=0.05 * max(1.0, abs(logit_gap(keyed, text,
                                                                               e.target))))
    # exactly 14 words: full but not cut
    assert explain_text(keyed, [" ".join(words[:14])])[0].truncated_at is None
    # blank texts: an explanation with no words, no crash
    blank = explain_text(keyed, ["", "  \t "], targets=[0, 1])
    assert [(x.words, x.attribution, x.target) for x in blank] == [([], [], 0), ([], [], 1)]
    # a word the vocabulary splits or does not know ([UNK]) is still one word
    e = explain_text(keyed, ["bad,weather zzz music"])[0]
    assert e.words == ["bad,weather", "zzz", "music"] and len(e.attribution) == 3
    assert all(math.isfinite(v) for v in e.attribution)


class BlackBox:
    """Only ``predict_proba(list[str])``: no tokenizer, embeddings or gradients."""

    def __init__(self, inner: HFTextModel) -> None:
        self._inner = inner
        self.n_classes = inner.n_classes
        self.calls = 0

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        assert isinstance(texts, list) and all(isinstance(t, str) for t in texts)
        self.calls += 1
        return self._inner.predict_proba(texts)


def test_kernel_shap_through_a_black_box(keyed):
    bb = BlackBox(keyed)
    assert text_method_for(bb) == "kernel_shap"
    text = "play  some bad music today"
    e = explain_text(bb, [text], n_samples=200, seed=1)[0]
    assert e.method == "kernel_shap" and e.delta is None and e.target == 1
    assert e.words == text.split() and len(e.attribution) == 5
    assert e.words[int(np.argmax(e.attribution))] == "bad"
    assert "empty text" in e.baseline
    # efficiency: the attributions add up to p(all words) - p(no word)
    p = bb.predict_proba([" ".join(e.words), ""])[:, 1]
    assert sum(e.attribution) == pytest.approx(float(p[0] - p[1]), abs=0.05)
    # seeded: the same call, the same attribution
    assert explain_text(bb, [text], n_samples=200, seed=1)[0].attribution == e.attribution
    # one predict for the target, one batch of perturbed texts
    calls = bb.calls
    explain_text(bb, [text], n_samples=50, targets=[0])
    assert bb.calls == calls + 1
    # one word: its exact Shapley value, p(word) - p(empty text)
    one = explain_text(bb, ["bad"], targets=[1])[0]
    p1 = bb.predict_proba(["bad", ""])[:, 1]
    assert one.words == ["bad"] and one.attribution == pytest.approx([float(p1[0] - p1[1])])


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"targets": [1, 0]}, "targets must be 1 classes in 0..1"),
    ({"targets": [2]}, "targets must be 1 classes in 0..1"),
    ({"targets": [-1]}, "targets must be 1 classes"),
    ({"targets": [True]}, "targets must be 1 classes"),
    ({"targets": [0.5]}, "targets must be 1 classes"),
    ({"targets": "0"}, "targets must be 1 classes"),
    ({"method": "lime"}, "unknown explanation method"),
])
def test_bad_requests_are_one_line(keyed, kwargs, needle):
    with pytest.raises(BastionError, match=needle) as ei:
        explain_text(keyed, ["book a flight"], **kwargs)
    assert "\n" not in ei.value.message


def test_bad_inputs_and_black_box_ig(keyed):
    for bad in ("book a flight", [1, 2], ["ok", None]):
        with pytest.raises(BastionError, match="list of strings"):
            explain_text(keyed, bad)  # type: ignore[arg-type]
    with pytest.raises(BastionError, match="at least one text"):
        explain_text(keyed, [])
    with pytest.raises(BastionError, match="white-box text model"):
        explain_text(BlackBox(keyed), ["book a flight"], method="integrated_gradients")


def test_explanations_beside_predictions_in_other_threads(keyed):
    """As in the service: an explanation on a request thread takes token offsets (no
    padding) while another thread predicts (padding) with the same model. A fast tokenizer
    keeps padding and truncation as state, so without the model's tokenizer lock one
    thread got the other's settings ("Unable to create tensor", "Already borrowed")."""
    import sys
    import threading

    long = " ".join(OTHER * 20)  # 280 words: tokenizing takes a while, truncated to 16
    batch = [long, "book a"]
    ids_want, mask_want = keyed.tokenize(batch)
    offsets_want = keyed.token_offsets(long)
    errors: list[str] = []

    def offsets() -> None:
        try:
            for _ in range(400):
                assert keyed.token_offsets(long) == offsets_want
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            errors.append(repr(exc)[:200])

    def predict() -> None:
        try:
            for _ in range(400):
                ids, mask = keyed.tokenize(batch)
                assert torch.equal(ids, ids_want) and torch.equal(mask, mask_want)
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc)[:200])

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads often
    try:
        threads = [threading.Thread(target=f) for f in (offsets, predict, offsets, predict)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors[:3]
    # and whole explanations beside predictions give the serial answers
    texts = ["bad weather to paris", long]
    want = [e.attribution for e in explain_text(keyed, texts, n_steps=8)]
    got: list[list[list[float]]] = []

    def explainer() -> None:
        try:
            for _ in range(5):
                got.append([e.attribution for e in explain_text(keyed, texts, n_steps=8)])
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc)[:200])

    threads = [threading.Thread(target=f) for f in (explainer, predict, explainer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(got) == 10
    for g in got:
        np.testing.assert_allclose([v for a in g for v in a], [v for a in want for v in a],
                                   atol=1e-5)
