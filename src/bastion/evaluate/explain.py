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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from bastion.errors import BastionError

Method = Literal["auto", "integrated_gradients", "kernel_shap"]
__all__ = ["Explanation", "explain", "method_for"]


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
