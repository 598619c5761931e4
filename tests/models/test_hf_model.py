"""hf:PATH: a tiny BERT built in the test from a config (no download), its predictions,
id2label, embedding gradients, and bad folders refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from bastion.errors import BastionError, ModelError  # noqa: E402
from bastion.models import is_white_box, resolve_model  # noqa: E402
from bastion.models.text import HFTextModel, is_text_model, load_hf  # noqa: E402

WORDS = ["book", "a", "flight", "to", "paris", "play", "some", "music", "what", "is", "the",
         "weather", "today", "good", "bad"]


def build_tiny_bert(folder, *, n_labels: int = 3, vocab_extra: int = 0, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [
        f"extra{i}" for i in range(vocab_extra)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"))  # a path (transformers 5)
    torch.manual_seed(seed)
    labels = ["travel", "music", "weather"][:n_labels]
    cfg = BertConfig(vocab_size=len(vocab) - vocab_extra, hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                     num_labels=n_labels, id2label=dict(enumerate(labels)),
                     label2id={v: k for k, v in enumerate(labels)})
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def test_tiny_bert_loads_white_box_with_labels(tmp_path):
    d = build_tiny_bert(tmp_path / "bert")
    model = resolve_model(f"hf:{d}")
    assert isinstance(model, HFTextModel) and is_text_model(model) and not is_white_box(model)
    assert model.n_classes == 3 and model.class_names == ["travel", "music", "weather"]
    texts = ["book a flight to paris", "play some music", "what is the weather today"]
    p = model.predict_proba(texts)
    assert p.shape == (3, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert model.queries == 3
    # one batch or one at a time: the same answer (padding does not leak)
    single = np.concatenate([model.predict_proba([t]) for t in texts])
    np.testing.assert_allclose(p, single, atol=1e-5)
    ids, grad = model.embedding_gradient(texts[0], 0)
    assert grad.shape == (len(ids), 16) and float(grad.abs().sum()) > 0
    # the gradient predicts the loss change of a small step along it (first order)
    emb = model.embedding_layer()(torch.tensor([ids]))
    mask = torch.ones(1, len(ids), dtype=torch.long)

    def loss(e):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(
                model._logits_from_embeds(e, mask), torch.tensor([0])))

    step = 1e-3 * grad / grad.norm()
    assert loss(emb + step) > loss(emb) > loss(emb - step)
    with pytest.raises(ModelError, match="list of strings"):
        model.predict_proba("just one string")


def test_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="no config.json") as ei:
        resolve_model(f"hf:{tmp_path}")
    assert "\n" not in ei.value.message
    with pytest.raises(ModelError, match="not found"):
        load_hf(tmp_path / "missing")


def test_tokenizer_that_does_not_match_the_embeddings(tmp_path):
    d = build_tiny_bert(tmp_path / "bert", vocab_extra=50)  # vocab 50 tokens beyond the model
    with pytest.raises(ModelError, match="do not belong together") as ei:
        load_hf(d)
    assert "\n" not in ei.value.message


def test_missing_files(tmp_path):
    d = build_tiny_bert(tmp_path / "bert")
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        (d / f).unlink(missing_ok=True)
    with pytest.raises(ModelError, match="tokenizer"):
        load_hf(d)
    d2 = build_tiny_bert(tmp_path / "bert2")
    (d2 / "model.safetensors").rename(d2 / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle"):
        load_hf(d2)
    d3 = build_tiny_bert(tmp_path / "bert3")
    (d3 / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json"):
        load_hf(d3)


def test_bare_folder_points_at_hf_prefix(tmp_path):
    d = build_tiny_bert(tmp_path / "bert")
    with pytest.raises(ModelError, match="Hugging Face") as ei:
        resolve_model(str(d))
    assert "hf:" in ei.value.hint


def test_scan_of_an_hf_model_maps_labels_by_id2label(tmp_path):
    import json

    from bastion.evaluate.text_scan import align_labels
    from bastion.jobs import run_scan

    d = build_tiny_bert(tmp_path / "bert")
    model = load_hf(d)
    # the data names its classes in sorted order; the model's id2label order differs
    y = align_labels(["music", "travel", "weather"], model, np.array([0, 1, 2]))
    assert y.tolist() == [1, 0, 2]
    with pytest.raises(BastionError, match="not among the model's classes"):
        align_labels(["sports", "travel"], model, np.array([0, 1]))
    rows = [{"text": t, "label": lab} for t, lab in (
        ("book a flight to paris", "travel"), ("play some music", "music"),
        ("what is the weather today", "weather"))] * 4
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    report, paths, _ = run_scan(model_spec=f"hf:{d}", data_spec=f"jsonl:{data}",
                                out_dir=tmp_path / "scan", limit=3, track=False,
                                attacks=["char"],
                                attack_options={"char": {"max_queries": 20}})
    assert report.kind == "text" and report.n_points == 3
    assert report.model["class_names"] == ["travel", "music", "weather"]
    assert paths["html"].is_file()


@pytest.mark.parametrize("num_labels", ['"three"', "-1", "true", "1e9"])
def test_hostile_num_labels_in_config_is_one_line(tmp_path, num_labels):
    """The metadata a registry or a factsheet reads without loading the weights: a
    config.json whose num_labels is not a sane class count is refused, not a crash."""
    import json

    from bastion.models.text import read_text_folder_meta

    d = build_tiny_bert(tmp_path / "bert")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_labels"] = json.loads(num_labels)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="num_labels must be a whole number") as ei:
        read_text_folder_meta(d)
    assert "\n" not in ei.value.message
    cfg["num_labels"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    assert read_text_folder_meta(d)["n_classes"] == 3
