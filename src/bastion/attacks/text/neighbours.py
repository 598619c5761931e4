"""Word neighbours in an embedding space: TextFooler's candidate words.

TextFooler draws candidates from counter-fitted word vectors, which cannot be installed
here; Bastion uses an input embedding matrix instead: by default the shipped MiniLM's
word-piece embeddings (whole-word, alphabetic pieces only, about 21,700 words), or a
white-box model's own input embeddings. Neighbours are by cosine similarity; they include
related words that are not synonyms (``today``: ``tomorrow``), which the sentence-
similarity constraint then has to filter.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

_LOCK = threading.Lock()
_DEFAULT: WordNeighbours | None = None


class WordNeighbours:
    """``neighbours(word, k)``: the ``k`` nearest whole words to ``word`` (cosine at least
    ``min_cos``), most similar first; ``[]`` for a word outside the vocabulary."""

    def __init__(self, matrix: torch.Tensor | np.ndarray, vocab: list[str], *,
                 min_cos: float = 0.3) -> None:
        keep = [i for i, t in enumerate(vocab[: len(matrix)])
                if t.isascii() and t.isalpha() and len(t) > 1]
        self.words = [vocab[i] for i in keep]
        self.index = {w: j for j, w in enumerate(self.words)}
        m = torch.as_tensor(np.asarray(matrix, dtype=np.float32)[keep])
        self.matrix = torch.nn.functional.normalize(m, dim=1)
        self.token_ids = keep
        self.min_cos = float(min_cos)
        self._cache: dict[tuple[str, int], list[str]] = {}

    def neighbours(self, word: str, k: int = 20) -> list[str]:
        key = (word.lower(), k)
        if key in self._cache:
            return self._cache[key]
        j = self.index.get(word.lower())
        if j is None:
            return []
        sims = self.matrix @ self.matrix[j]
        s, ix = sims.topk(min(k + 1, len(self.words)))
        out = [self.words[i] for c, i in zip(s.tolist(), ix.tolist(), strict=True)
               if i != j and c >= self.min_cos][:k]
        if word[:1].isupper():
            out = [w.capitalize() for w in out]
        if len(self._cache) < 100_000:
            self._cache[key] = out
        return out


def minilm_neighbours() -> WordNeighbours:
    """Neighbours in the shipped MiniLM's input embedding space (loaded once)."""
    global _DEFAULT
    with _LOCK:
        if _DEFAULT is None:
            from bastion.llm.embed import get_embedder  # a leaf module (errors, _util only)

            enc = get_embedder(None).model
            vocab = enc.tok.get_vocab()
            inv = [""] * (max(vocab.values()) + 1)
            for t, i in vocab.items():
                inv[i] = t
            _DEFAULT = WordNeighbours(enc.word.float(), inv)
        return _DEFAULT


def model_neighbours(model: Any) -> WordNeighbours:
    """Neighbours in a white-box text model's own input embeddings (cached on it)."""
    cached = getattr(model, "_bastion_neighbours", None)
    if cached is None:
        cached = WordNeighbours(model.embedding_matrix(), model.vocab())
        model._bastion_neighbours = cached
    return cached
