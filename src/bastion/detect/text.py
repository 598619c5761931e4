"""Outlier detection on text: a numeric detector run on sentence embeddings.

:class:`TextEmbeddingDetector` turns a list of strings into vectors with an embedder and
hands them to any numeric detector with ``fit``/``score``/``calibrate`` (the service's
k-NN, or PyOD's isolation forest / ECOD through
:class:`~bastion.detect.outlier.OutlierDetector`), so the guard can screen a text model's
requests as it screens pixels or table rows.

Two embedders (:func:`text_embedder`):

- ``minilm`` (the default): the shipped all-MiniLM-L6-v2, all 6 layers, mean-pooled, unit
  length (:mod:`bastion.llm.embed`). It is independent of the guarded model, so an input
  crafted against the model's own features (HotFlip follows the model's gradients) is not
  crafted against the detector, and it works as well for a user's tiny or badly trained
  Hugging Face model as for a good one. Measured on a 10-intent CLINC150 router (1,000
  reference texts, k-NN, calibrated to 1% false positives): held-out in-scope questions
  flagged 0.7%, random characters, Cyrillic and CJK gibberish 100%, CLINC's out-of-scope
  questions 88%, questions of the 140 other intents 80%; the router's own pooled features
  reached 66% and 50% on the last two at 1.3% false positives, at a higher cost per text
  (7.5 ms against 4.6 ms on one CPU thread); ``benchmarks/text_guard_embedder.py``.
- ``model``: the guarded model's own pooled features (``model.features``), for a
  deployment without the ``llm`` extra.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bastion.errors import BastionError, DataError

TEXT_EMBEDDERS: tuple[str, ...] = ("minilm", "model")


def text_embedder(kind: str = "minilm", model: Any = None
                  ) -> Callable[[Sequence[str]], np.ndarray]:
    """``texts -> (n, dim)`` float32 vectors: ``minilm`` or ``model`` (see the module
    docs; ``model`` needs a text model with ``features``)."""
    if kind == "minilm":
        from bastion.llm.embed import get_embedder

        enc = get_embedder(None)  # all 6 layers: measured best here (module docs)

        def embed(texts: Sequence[str]) -> np.ndarray:
            return np.asarray(enc.encode([str(t) for t in texts]), dtype=np.float32)

        return embed
    if kind == "model":
        if model is None or not callable(getattr(model, "features", None)):
            raise BastionError("the model embedder needs a text model with features()",
                               hint="use text_embedder: minilm")

        def embed_model(texts: Sequence[str]) -> np.ndarray:
            return np.asarray(model.features([str(t) for t in texts]), dtype=np.float32)

        return embed_model
    raise BastionError(f"unknown text embedder {kind!r}",
                       hint=f"use one of {', '.join(TEXT_EMBEDDERS)}")


class TextEmbeddingDetector:
    """A numeric detector (``inner``) on the embeddings of texts; the detector contract
    (``fit``, ``score``, ``calibrate``, ``threshold_``, ``predict``) over strings.

    Args:
        inner: a numeric detector (``fit(x)``, ``score(x)``, ``calibrate(x, fpr=)``
            setting ``threshold_``).
        embed: ``texts -> vectors`` (:func:`text_embedder`).
        embedder: the embedder's name, for reports.
    """

    def __init__(self, inner: Any, embed: Callable[[Sequence[str]], np.ndarray], *,
                 embedder: str = "minilm") -> None:
        self.inner, self.embed, self.embedder = inner, embed, str(embedder)
        self.name = f"{getattr(inner, 'name', 'outlier')}-on-{self.embedder}"
        self.threshold_: float | None = None
        self._last: tuple[tuple[str, ...], np.ndarray] | None = None

    def _vectors(self, texts: Any) -> np.ndarray:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise DataError("a text detector takes a list of strings")
        if len(texts) == 0:
            raise DataError("no texts")
        last = self._last
        if last is not None and len(last[0]) == len(texts) and last[0] == tuple(texts):
            return last[1]  # the calibration texts again (the service records their scores)
        return self.embed(list(texts))

    def fit(self, texts: Sequence[str]) -> TextEmbeddingDetector:
        self.inner.fit(self._vectors(texts))
        return self

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """The inner detector's scores of the texts' embeddings (higher = stranger)."""
        return np.asarray(self.inner.score(self._vectors(texts)), dtype=np.float64)

    def calibrate(self, texts: Sequence[str], *, fpr: float = 0.01) -> TextEmbeddingDetector:
        """Calibrate the inner detector on clean texts it was not fitted on."""
        v = self._vectors(texts)
        self.inner.calibrate(v, fpr=fpr)
        self.threshold_ = float(self.inner.threshold_)
        self.fpr_ = getattr(self.inner, "fpr_", float(fpr))
        self.cal_scores_ = getattr(self.inner, "cal_scores_", None)
        self._last = (tuple(texts), v)
        return self

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        if self.threshold_ is None:
            raise BastionError(f"{self.name}: calibrate the detector first")
        return self.score(texts) > self.threshold_


__all__ = ["TEXT_EMBEDDERS", "TextEmbeddingDetector", "text_embedder"]
