"""Per-point random numbers: a point's draws do not depend on the batch it is in.

An attack that draws its random starts or proposals from one generator for the whole
batch gives a point different numbers when the batch changes (another batch size, or the
points split over workers). :class:`PointRandom` instead makes every draw a pure function
of ``(seed, point id, tag, element)``: a counter-based generator (SplitMix64's mixer over
64-bit keys, vectorised in NumPy). The scan passes each point's index in the evaluation
set as its id, so a local run and a run sharded over any number of workers draw the same
numbers for every point, and merged results are identical.

Tags name the draw (restart, target class, iteration, purpose); two draws with different
tags are independent, the same tag gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = (np.uint64(s) for s in (30, 27, 31, 11))


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on a uint64 array (wrapping arithmetic)."""
    z = z ^ (z >> _S30)
    z = z * _M1
    z = z ^ (z >> _S27)
    z = z * _M2
    return z ^ (z >> _S31)


def _mix_int(v: int) -> int:
    """The same mixer on one Python integer."""
    z = v & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _tag_word(tag: Sequence[int]) -> int:
    h = 0x243F6A8885A308D3  # any odd constant: the empty tag
    for t in tag:
        h = _mix_int(h ^ ((int(t) * _GOLDEN + 0x7F4A7C15) & _MASK))
    return h


class PointRandom:
    """Random draws keyed by point: ``uniform(shape, *tag)`` returns ``(n, *shape)``
    numbers whose row ``i`` depends only on the seed, point ``i``'s id and the tag.

    Args:
        seed: the attack's seed.
        ids: one integer id per point (the point's index in the evaluation set);
            ``None`` gives ``0..n-1``.
        n: the number of points when ``ids`` is None.
    """

    def __init__(self, seed: int, ids: Any = None, *, n: int | None = None,
                 _keys: np.ndarray | None = None) -> None:
        if _keys is not None:
            self.keys = _keys
            return
        if ids is None:
            ids = np.arange(int(n or 0))
        ids_u = np.asarray(ids, dtype=np.int64).reshape(-1).astype(np.uint64)
        base = np.uint64(_mix_int(_mix_int(int(seed)) ^ 0x5851F42D4C957F2D))
        self.keys = _mix(ids_u * np.uint64(_GOLDEN) + base)

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, sel: Any) -> PointRandom:
        """The generator of a subset of the points (indices or a boolean mask)."""
        if hasattr(sel, "numpy"):
            sel = sel.detach().cpu().numpy()
        return PointRandom(0, _keys=self.keys[np.asarray(sel)])

    def fold(self, *tag: int) -> PointRandom:
        """A generator for the same points whose every draw also depends on ``tag``."""
        return PointRandom(0, _keys=_mix(self.keys ^ np.uint64(_tag_word(tag))))

    def _bits(self, size: int, tag: Sequence[int]) -> np.ndarray:
        k = _mix(self.keys ^ np.uint64(_tag_word(tag)))
        ctr = (np.arange(1, size + 1, dtype=np.uint64) * np.uint64(_GOLDEN))
        return _mix(k[:, None] + ctr[None, :])

    def uniform(self, shape: Sequence[int] | int = (), *tag: int) -> np.ndarray:
        """Uniform numbers in ``[0, 1)``, shape ``(n, *shape)`` (float64)."""
        shape = (int(shape),) if isinstance(shape, int | np.integer) else tuple(shape)
        size = int(np.prod(shape)) if shape else 1
        u = (self._bits(size, tag) >> _S11).astype(np.float64) * (2.0 ** -53)
        return u.reshape((len(self.keys), *shape))

    def normal(self, shape: Sequence[int] | int = (), *tag: int) -> np.ndarray:
        """Standard normal numbers (Box-Muller), shape ``(n, *shape)``."""
        shape = (int(shape),) if isinstance(shape, int | np.integer) else tuple(shape)
        u = self.uniform((*shape, 2), *tag)
        r = np.sqrt(-2.0 * np.log1p(-u[..., 0]))  # 1 - u is in (0, 1]
        return r * np.cos(2.0 * np.pi * u[..., 1])

    def integers(self, high: int, *tag: int) -> np.ndarray:
        """One integer in ``[0, high)`` per point, shape ``(n,)``."""
        u = self.uniform((), *tag)
        return np.minimum((u * int(high)).astype(np.int64), int(high) - 1)

    def signs(self, shape: Sequence[int] | int = (), *tag: int) -> np.ndarray:
        """``-1.0`` or ``+1.0`` with equal odds, shape ``(n, *shape)``."""
        return np.where(self.uniform(shape, *tag) < 0.5, -1.0, 1.0)

    def torch_uniform(self, shape: Sequence[int], *tag: int) -> Any:
        import torch

        return torch.from_numpy(self.uniform(shape, *tag).astype(np.float32))

    def torch_normal(self, shape: Sequence[int], *tag: int) -> Any:
        import torch

        return torch.from_numpy(self.normal(shape, *tag).astype(np.float32))
