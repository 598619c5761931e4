"""Attributions: which parts of an input drove the model's answer (captum, extra ``ops``).

:func:`explain` gives one attribution map per input, in the input's shape, for a target
class (default: the predicted one):

- ``integrated_gradients`` for white-box torch models (``TorchModel``): captum's
  :class:`~captum.attr.IntegratedGradients` on the differentiable logits, from a baseline
  at the lower bound of the input range (a blank image), with its convergence delta
  (how far the attributions' sum is from ``logit(x) - logit(baseline)``);
- ``kernel_shap`` for black-box and tabular models (anything with ``predict_proba``):
  captum's :class:`~captum.attr.KernelShap` on the class probability, features grouped
  into at most ``max_features`` square patches for images (one feature per column for
  tables), the same baseline.

Both are seeded, so one input gives one explanation.

:func:`explain_text` does the same for text models, with **words** as the units (runs of
non-space characters, each with its character span):

- ``integrated_gradients`` for white-box text models (``tokenize``, ``token_offsets``,
  ``embedding_layer`` and ``_logits_from_embeds``: :class:`~bastion.models.text.TextModel`)
  in the input-embedding space, from a baseline where every token but the special ones
  ([CLS], [SEP]) is the pad token's embedding; a word's attribution is the sum over the
  tokens that overlap it. Words the tokenizer cut off (``max_length``) get 0.0 and the
  explanation says where the cut was (``truncated_at``);
- ``kernel_shap`` for any other text model (only ``predict_proba(list[str])``): a word is
  present or left out, the perturbed text being the present words joined by spaces; the
  baseline is the empty text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from bastion.errors import BastionError

Method = Literal["auto", "integrated_gradients", "kernel_shap"]
__all__ = ["Explanation", "TextExplanation", "explain", "explain_text", "method_for",
           "text_method_for"]


@dataclass
class Explanation:
    """One input's attribution: ``attribution`` has the input's shape."""

    method: str
    target: int
    attribution: np.ndarray
    baseline: str
    delta: float | None = None

    def as_dict(self, decimals: int = 5) -> dict[str, Any]:
        return {"method": self.method, "target": int(self.target),
                "attribution": np.round(self.attribution.astype(np.float64),
                                        decimals).tolist(),
                "baseline": self.baseline,
                "convergence_delta": None if self.delta is None else float(self.delta)}


def method_for(model: Any) -> str:
    """``integrated_gradients`` for a model with differentiable ``logits``, else
    ``kernel_shap``."""
    from bastion.models.torch_model import TorchModel

    return "integrated_gradients" if isinstance(model, TorchModel) else "kernel_shap"


def _feature_mask(shape: tuple[int, ...], max_features: int) -> np.ndarray:
    """Group an input of ``shape`` into at most ``max_features`` features: square patches
    of the last two axes for images (shared across channels), else one per value."""
    n = int(np.prod(shape))
    if len(shape) < 2 or n <= max_features:
        return np.arange(n).reshape(shape)
    h, w = shape[-2], shape[-1]
    side = 1
    while math.ceil(h / side) * math.ceil(w / side) > max_features:
        side += 1
    rows = np.arange(h) // side
    cols = np.arange(w) // side
    grid = rows[:, None] * math.ceil(w / side) + cols[None, :]
    return np.broadcast_to(grid, shape).copy()


def explain(model: Any, x: np.ndarray, *, targets: list[int] | np.ndarray | None = None,
            method: Method = "auto", n_steps: int = 32, n_samples: int = 200,
            max_features: int = 64, seed: int = 0) -> list[Explanation]:
    """Attributions of ``model``'s answers on the batch ``x`` (see the module docs).

    Raises:
        BastionError: a method the model cannot support (integrated gradients on a
            black-box model), or targets of the wrong length or range.
    """
    import torch

    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2 or len(x) == 0:
        raise BastionError("explain needs a non-empty batch of inputs")
    m = method_for(model) if method == "auto" else method
    probs = np.asarray(model.predict_proba(x))
    n_classes = probs.shape[1]
    tgt = probs.argmax(1) if targets is None else np.asarray(targets, dtype=np.int64)
    if len(tgt) != len(x) or tgt.min() < 0 or tgt.max() >= n_classes:
        raise BastionError(f"explain targets must be {len(x)} classes in 0..{n_classes - 1}")
    lo = float(getattr(model, "bounds", (0.0, 1.0))[0])
    base_name = f"constant {lo:g} (the lower bound of the input range)"
    torch.manual_seed(seed)
    xt = torch.from_numpy(x)
    base = torch.full_like(xt, lo)
    tt = torch.from_numpy(tgt)
    if m == "integrated_gradients":
        if not hasattr(model, "logits") or not hasattr(model, "module"):
            raise BastionError("integrated gradients needs a white-box torch model",
                               hint="use method kernel_shap for black-box models")
        from captum.attr import IntegratedGradients

        was = model.module.training
        model.module.eval()
        try:
            ig = IntegratedGradients(model.logits)
            attr, delta = ig.attribute(xt, baselines=base, target=tt, n_steps=int(n_steps),
                                       return_convergence_delta=True)
        finally:
            model.module.train(was)
        a = attr.detach().cpu().numpy()
        d = delta.detach().cpu().numpy()
        return [Explanation(m, int(tgt[i]), a[i], base_name, float(d[i]))
                for i in range(len(x))]
    if m != "kernel_shap":
        raise BastionError(f"unknown explanation method {m!r}",
                           hint="use auto, integrated_gradients or kernel_shap")
    from captum.attr import KernelShap

    def forward(t: Any) -> Any:
        return torch.from_numpy(np.asarray(model.predict_proba(
            t.detach().cpu().numpy().astype(np.float32)), dtype=np.float32))

    ks = KernelShap(forward)
    mask = torch.from_numpy(_feature_mask(x.shape[1:], max_features))[None]
    out = []
    for i in range(len(x)):
        torch.manual_seed(seed + i)
        a = ks.attribute(xt[i:i + 1], baselines=base[i:i + 1], target=int(tgt[i]),
                         feature_mask=mask, n_samples=int(n_samples),
                         perturbations_per_eval=int(n_samples))
        out.append(Explanation(m, int(tgt[i]), a[0].detach().cpu().numpy(), base_name))
    return out


# ---------------------------------------------------------------- text

#: the hooks a white-box text model has (:class:`~bastion.models.text.TextModel`)
TEXT_HOOKS = ("tokenize", "token_offsets", "embedding_layer", "_logits_from_embeds")
_WORD = re.compile(r"\S+")


@dataclass
class TextExplanation:
    """One text's attribution: one value per word (``words[i]`` at ``spans[i]``)."""

    method: str
    target: int
    words: list[str]
    spans: list[tuple[int, int]]
    attribution: list[float]
    baseline: str
    delta: float | None = None
    truncated_at: int | None = None

    def as_dict(self, decimals: int = 5) -> dict[str, Any]:
        return {"method": self.method, "target": int(self.target), "unit": "word",
                "words": list(self.words), "spans": [[int(a), int(b)] for a, b in self.spans],
                "attribution": [round(float(v), decimals) for v in self.attribution],
                "baseline": self.baseline,
                "convergence_delta": None if self.delta is None else float(self.delta),
                "truncated_at": self.truncated_at}


def text_method_for(model: Any) -> str:
    """``integrated_gradients`` for a text model with the white-box hooks
    (:data:`TEXT_HOOKS`), else ``kernel_shap``."""
    return ("integrated_gradients" if all(callable(getattr(model, h, None)) for h in TEXT_HOOKS)
            else "kernel_shap")


def _text_targets(model: Any, texts: list[str], targets: Any) -> np.ndarray:
    """The target class of each text: the predicted one, or ``targets`` checked."""
    if targets is None:
        return np.asarray(model.predict_proba(texts)).argmax(1).astype(np.int64)
    n_classes = getattr(model, "n_classes", None)
    if not isinstance(n_classes, int | np.integer) or n_classes < 1:
        n_classes = int(np.asarray(model.predict_proba(texts[:1])).shape[1])
    n_classes = int(n_classes)
    tgt = list(targets) if isinstance(targets, Sequence | np.ndarray) else None
    ok = (tgt is not None and len(tgt) == len(texts)
          and all(isinstance(t, int | np.integer) and not isinstance(t, bool | np.bool_)
                  and 0 <= int(t) < n_classes for t in tgt))
    if not ok:
        raise BastionError(f"explain targets must be {len(texts)} classes in "
                           f"0..{n_classes - 1}")
    return np.asarray([int(t) for t in tgt], dtype=np.int64)  # type: ignore[union-attr]


def _torch_modules(model: Any) -> list[Any]:
    from torch import nn

    return [m for m in (getattr(model, a, None) for a in ("module", "net"))
            if isinstance(m, nn.Module)]


def _ig_text(model: Any, text: str, target: int, words: list[tuple[str, tuple[int, int]]],
             n_steps: int) -> TextExplanation:
    import torch
    from captum.attr import IntegratedGradients

    ids, mask = model.tokenize([text])
    offsets = [(int(a), int(b)) for a, b in model.token_offsets(text)]
    if len(offsets) != ids.shape[1]:
        raise BastionError(f"the tokenizer gave {ids.shape[1]} tokens but {len(offsets)} "
                           "character spans for one text")
    layer = model.embedding_layer()
    emb = layer(ids).detach()
    pad_id = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
    if pad_id is not None:
        pad = layer(torch.tensor([[int(pad_id)]])).detach()[0, 0]
        base_name = "the pad token's embedding at every word piece (special tokens kept)"
    else:
        pad = torch.zeros(emb.shape[-1], dtype=emb.dtype)
        base_name = "a zero embedding at every word piece (special tokens kept)"
    special = torch.tensor([a == b for a, b in offsets])
    base = emb.clone()
    base[0, ~special] = pad

    def f(e: Any) -> Any:
        return model._logits_from_embeds(e, mask.expand(e.shape[0], -1))

    with torch.enable_grad():
        attr, delta = IntegratedGradients(f).attribute(
            emb, baselines=base, target=int(target), n_steps=int(n_steps),
            return_convergence_delta=True)
    # n_steps points on the path, plus the input and the baseline for the delta
    model.queries = getattr(model, "queries", 0) + int(n_steps) + 2
    tok = attr[0].sum(-1).detach().double().cpu().numpy()
    out = []
    for _, (ws, we) in words:
        out.append(float(sum(tok[k] for k, (a, b) in enumerate(offsets)
                             if a < b and a < we and b > ws)))
    covered = max((b for a, b in offsets if a < b), default=0)
    max_len = getattr(model, "max_length", None)
    full = max_len is None or len(offsets) >= int(max_len)
    cut = covered if full and text[covered:].strip() else None
    return TextExplanation("integrated_gradients", int(target), [w for w, _ in words],
                           [s for _, s in words], out, base_name,
                           float(delta.detach().reshape(-1)[0]), cut)


def _shap_text(model: Any, target: int, words: list[tuple[str, tuple[int, int]]],
               n_samples: int, seed: int) -> TextExplanation:
    import torch
    from captum.attr import KernelShap

    ws = [w for w, _ in words]

    def forward(present: Any) -> Any:
        batch = [" ".join(w for w, keep in zip(ws, row, strict=True) if keep > 0.5)
                 for row in present.detach().cpu().tolist()]
        return torch.from_numpy(np.asarray(model.predict_proba(batch), dtype=np.float32))

    n = len(ws)
    base_name = "the empty text (every word left out)"
    if n == 1:  # one player: its Shapley value is exact (captum's sampler needs two)
        p = forward(torch.tensor([[1.0], [0.0]]))[:, int(target)]
        return TextExplanation("kernel_shap", int(target), ws, [s for _, s in words],
                               [float(p[0] - p[1])], base_name)
    torch.manual_seed(seed)
    a = KernelShap(forward).attribute(torch.ones(1, n), baselines=torch.zeros(1, n),
                                      target=int(target), n_samples=int(n_samples),
                                      perturbations_per_eval=int(n_samples))
    return TextExplanation("kernel_shap", int(target), ws, [s for _, s in words],
                           [float(v) for v in a[0].detach().double().cpu().tolist()],
                           base_name)


def explain_text(model: Any, texts: Sequence[str], *,
                 targets: list[int] | np.ndarray | None = None, method: Method = "auto",
                 n_steps: int = 32, n_samples: int = 200, seed: int = 0
                 ) -> list[TextExplanation]:
    """Word attributions of a text model's answers on ``texts`` (see the module docs), for
    ``targets`` (default: the predicted classes).

    Integrated gradients runs one text at a time (texts differ in length) and adds
    ``n_steps + 2`` to ``model.queries`` per text: the ``n_steps`` forward passes on the
    path plus the input and the baseline captum runs for the convergence delta. KernelSHAP
    goes through ``predict_proba``, which counts its own queries (``n_samples`` texts per
    text). Predicting the targets, when none are given, is one more query per text.
    A blank text gets an explanation with no words.

    Raises:
        BastionError: texts that are not a list of strings, a method the model cannot
            support (integrated gradients on a black-box model), or targets of the wrong
            length or range.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence | np.ndarray) or \
            not all(isinstance(t, str) for t in texts):
        raise BastionError("explain_text takes a list of strings",
                           hint="pass e.g. ['book a flight to paris']")
    texts = [str(t) for t in texts]
    if not texts:
        raise BastionError("explain_text needs at least one text")
    m = text_method_for(model) if method == "auto" else method
    if m not in ("integrated_gradients", "kernel_shap"):
        raise BastionError(f"unknown explanation method {m!r}",
                           hint="use auto, integrated_gradients or kernel_shap")
    if m == "integrated_gradients" and text_method_for(model) != m:
        raise BastionError("integrated gradients needs a white-box text model "
                           f"({', '.join(TEXT_HOOKS)})",
                           hint="use method kernel_shap for black-box text models")
    tgt = _text_targets(model, texts, targets)
    mods = _torch_modules(model) if m == "integrated_gradients" else []
    was = [mod.training for mod in mods]
    for mod in mods:
        mod.eval()
    out = []
    try:
        for i, text in enumerate(texts):
            words = [(w.group(), w.span()) for w in _WORD.finditer(text)]
            if not words:
                base = ("the pad token's embedding at every word piece"
                        if m == "integrated_gradients" else "the empty text")
                out.append(TextExplanation(m, int(tgt[i]), [], [], [], base))
            elif m == "integrated_gradients":
                out.append(_ig_text(model, text, int(tgt[i]), words, n_steps))
            else:
                out.append(_shap_text(model, int(tgt[i]), words, n_samples, seed + i))
    finally:
        for mod, w in zip(mods, was, strict=True):
            mod.train(w)
    return out
