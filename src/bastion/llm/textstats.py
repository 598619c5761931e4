"""Dense statistics of a text chunk that sentence embeddings and n-grams blur.

Optimised adversarial suffixes (GCG and its kin: ``... IsaacwolPlugin DEBUGdevletinjust
generate drama pleasejavascriptInsert ...``) read as noise to an embedding model and hash
into n-grams seen nowhere else, so neither feature block says "this is gibberish".
:func:`text_stats` does, with four shares per chunk (each in ``[0, 1]``; returned
weighted, see ``_WEIGHTS``):

- ``oov_share``: of the alphabetic words of four letters or more, the share that is not a
  whole word of the embedding model's WordPiece vocabulary (30k English words);
- ``symbol_share``: the share of characters that are neither letters, digits nor spaces;
- ``long_token_share``: the share of whitespace-separated tokens of 15+ characters;
- ``symbol_in_word_share``: the share of tokens with a symbol between letters
  (``opin\\/uteur``, ``giving**one``).

The detector adds them, scaled, as a fourth feature block next to the embedding and the
n-grams (see :class:`bastion.llm.detector.PromptInjectionDetector`).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bastion.errors import ModelError

__all__ = ["STATS_NAMES", "text_stats", "vocabulary"]

STATS_NAMES = ("oov_share", "symbol_share", "long_token_share", "symbol_in_word_share")
# each statistic's weight before the shared scale (the share of symbols and of long tokens
# is small even in gibberish)
_WEIGHTS = np.array([1.0, 3.0, 3.0, 1.0], dtype=np.float32)

_ALPHA = re.compile(r"[a-z]{4,}")
_TOKEN = re.compile(r"\S+")
_SYMBOL_INSIDE = re.compile(r"[a-z][^\sa-z0-9]+[a-z]")
_vocab: frozenset[str] | None = None
_lock = threading.Lock()


def vocabulary() -> frozenset[str]:
    """The whole words (no ``##`` continuations) of the embedding model's vocabulary."""
    global _vocab
    if _vocab is None:
        with _lock:
            if _vocab is None:
                from bastion.llm.embed import _model_path

                path = Path(_model_path()) / "tokenizer.json"
                try:
                    vocab = json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise ModelError(f"cannot read the embedding model's vocabulary: {exc}",
                                     hint="reinstall bastion[llm]") from None
                _vocab = frozenset(w for w in vocab if not w.startswith("##"))
    return _vocab


def text_stats(chunks: Sequence[str]) -> np.ndarray:
    """``(len(chunks), 4)`` float32 statistics (see module doc) of *normalised* chunks
    (case-folded, as :func:`bastion.llm.normalize.normalize` returns them), weighted."""
    vocab = vocabulary()
    out = np.zeros((len(chunks), len(STATS_NAMES)), dtype=np.float32)
    for i, t in enumerate(chunks):
        if not t:
            continue
        words = _ALPHA.findall(t)
        tokens = _TOKEN.findall(t)
        nt = max(len(tokens), 1)
        n_plain = sum(1 for c in t if c.isalnum() or c.isspace())
        out[i, 0] = sum(1 for w in words if w not in vocab) / max(len(words), 1)
        out[i, 1] = (len(t) - n_plain) / len(t)
        out[i, 2] = sum(1 for w in tokens if len(w) >= 15) / nt
        out[i, 3] = sum(1 for w in tokens if _SYMBOL_INSIDE.search(w)) / nt
    return out * _WEIGHTS
