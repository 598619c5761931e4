"""Adapter for a PyTorch ``nn.Module`` (white-box)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from bastion.errors import ModelError


class TorchModel:
    """A white-box model around an ``nn.Module`` that maps normalised inputs to logits.

    Input-space tensors (values in ``bounds``) are normalised here, once, as
    ``(x - mean) / std`` (per channel for images, per feature for tables) before the
    module sees them, so attacks always perturb raw inputs.

    Args:
        module: the network; it is put in ``eval()`` mode.
        n_classes: number of output classes.
        input_shape: shape of one input, without the batch dimension.
        bounds: ``(low, high)`` of valid input values.
        mean, std: optional normalisation; a scalar or one value per channel/feature.
        batch_size: batch size for ``predict_proba``.
        name: a label for reports.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        n_classes: int,
        input_shape: Sequence[int],
        bounds: tuple[float, float] = (0.0, 1.0),
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        batch_size: int = 512,
        name: str = "torch",
    ) -> None:
        if n_classes < 2:
            raise ModelError(f"n_classes must be at least 2, got {n_classes}")
        lo, hi = float(bounds[0]), float(bounds[1])
        if not lo < hi:
            raise ModelError(f"bounds must satisfy low < high, got {bounds}")
        self.module = module.eval()
        self.n_classes = int(n_classes)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.bounds = (lo, hi)
        self.batch_size = int(batch_size)
        self.name = name
        self.queries = 0
        self.mean = None if mean is None else _as_list(mean)
        self.std = None if std is None else _as_list(std)
        self._mean_t = self._broadcast(self.mean) if self.mean is not None else None
        self._std_t = self._broadcast(self.std) if self.std is not None else None
        if self._std_t is not None and bool((self._std_t <= 0).any()):
            raise ModelError("std must be positive")

    def _broadcast(self, values: list[float]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.float32)
        if t.numel() == 1:
            return t.reshape(())
        # one value per channel (images: first axis) or per feature (tables)
        shape = [t.numel()] + [1] * (len(self.input_shape) - 1)
        return t.reshape(shape)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Map input-space ``x`` to what the module expects."""
        if self._mean_t is not None:
            x = x - self._mean_t
        if self._std_t is not None:
            x = x / self._std_t
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable logits of input-space ``x`` of shape ``(n, *input_shape)``."""
        return self.module(self.normalise(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features when the module defines ``features``; else logits."""
        fn = getattr(self.module, "features", None)
        if callable(fn):
            return fn(self.normalise(x))
        return self.logits(x)

    @torch.no_grad()
    def predict_logits(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Logits for a batch, computed in chunks of ``batch_size``."""
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(
            x, torch.Tensor
        ) else x.float()
        if tuple(xt.shape[1:]) != self.input_shape:
            raise ModelError(
                f"input shape {tuple(xt.shape[1:])} does not match the model's "
                f"{self.input_shape}"
            )
        self.queries += int(xt.shape[0])
        if 0 < len(xt) <= NATIVE_CONV_MAX_ROWS:
            with native_conv():
                return self.logits(xt).numpy()
        out = [self.logits(xt[i : i + self.batch_size]) for i in range(0, len(xt), self.batch_size)]
        if not out:
            return np.zeros((0, self.n_classes), dtype=np.float32)
        return torch.cat(out).numpy()

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities for a batch of input-space ``x``."""
        z = torch.from_numpy(self.predict_logits(x))
        return torch.softmax(z, dim=1).numpy()

    def __repr__(self) -> str:
        return (
            f"TorchModel(name={self.name!r}, input_shape={self.input_shape}, "
            f"n_classes={self.n_classes}, bounds={self.bounds})"
        )


# A forward pass of a few rows (a guarded single request and its squeezed copies) runs
# PyTorch's native convolution instead of oneDNN's: for batches of 2-4 small images oneDNN
# costs 1.5-2.5x more per call (measured on the zoo CNNs; PyTorch itself picks the native
# kernel for a single unstrided image). Larger batches keep oneDNN.
NATIVE_CONV_MAX_ROWS = 4
_native_lock = threading.Lock()
_native_users = 0
_native_saved = True


@contextmanager
def native_conv() -> Iterator[None]:
    """Run the enclosed CPU convolutions with PyTorch's native kernels (oneDNN off).

    The switch is process-wide (``torch.backends.mkldnn.enabled``); nested and concurrent
    users are counted and the previous setting comes back when the last one leaves.
    Other threads computing meanwhile get the native kernels too: same results, at
    native speed, only for the length of a small forward pass.
    """
    global _native_users, _native_saved
    with _native_lock:
        if _native_users == 0:
            _native_saved = bool(torch.backends.mkldnn.enabled)
            torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
        _native_users += 1
    try:
        yield
    finally:
        with _native_lock:
            _native_users -= 1
            if _native_users == 0:
                torch.backends.mkldnn.enabled = _native_saved  # type: ignore[assignment]


def _as_list(v: float | Sequence[float]) -> list[float]:
    if isinstance(v, int | float):
        return [float(v)]
    return [float(a) for a in v]
