"""Dense statistics of a text chunk that sentence embeddings and n-grams blur.

Optimised adversarial suffixes (GCG and its kin: ``... IsaacwolPlugin DEBUGdevletinjust
generate drama pleasejavascriptInsert ...``) read as noise to an embedding model and hash
into n-grams seen nowhere else, so neither feature block says "this is gibberish".
:func:`text_stats` does, with four shares per chunk (each in ``[0, 1]``; returned
weighted, see ``_WEIGHTS``):

- ``oov_share``: of the alphabetic words of four letters or more, the share that is not a
  whole word of the embedding model's WordPiece vocabulary (30k English words);
- ``symbol_share``: the share of characters that are ASCII symbols or punctuation other
  than sentence punctuation (``,.?!;:'"-``) (version 1: any character that is neither
  letter, digit nor space);
- ``long_token_share``: the share of whitespace-separated tokens of 15+ characters that
  are mostly ASCII (version 1: any such token);
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

__all__ = ["STATS_NAMES", "STATS_VERSION", "text_stats", "vocabulary"]

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


#: the statistics' definitions: 1 as first shipped; 2 (the default) counts only ASCII
#: symbols and long tokens that are mostly ASCII, because version 1 keyed on script:
#: Thai and Devanagari vowel signs are not alphanumeric, and Chinese, Japanese and Thai
#: write whole sentences without spaces, so benign text in those scripts looked like
#: gibberish (on benign test text the block added +2.9 to +8.5 to the logit of Han,
#: kana, Devanagari and Thai rows, +0.6 to Latin ones)
STATS_VERSION = 2


# sentence punctuation: after NFKC, Chinese and Japanese commas and stops are these, and
# a short sentence in those scripts has one every few characters
_SENTENCE_PUNCT = frozenset(",.?!;:'\"-")


def _mostly_ascii(w: str) -> bool:
    return sum(1 for c in w if c < "\x80") * 2 >= len(w)


def text_stats(chunks: Sequence[str], *, version: int = STATS_VERSION) -> np.ndarray:
    """``(len(chunks), 4)`` float32 statistics (see module doc) of *normalised* chunks
    (case-folded, as :func:`bastion.llm.normalize.normalize` returns them), weighted.
    ``version``: see :data:`STATS_VERSION` (a detector records the one it was trained
    with)."""
    if version not in (1, 2):
        raise ModelError(f"unknown text-statistics version {version}",
                         hint="upgrade Bastion to read this detector")
    vocab = vocabulary()
    out = np.zeros((len(chunks), len(STATS_NAMES)), dtype=np.float32)
    for i, t in enumerate(chunks):
        if not t:
            continue
        words = _ALPHA.findall(t)
        tokens = _TOKEN.findall(t)
        nt = max(len(tokens), 1)
        if version == 1:
            n_sym = len(t) - sum(1 for c in t if c.isalnum() or c.isspace())
            n_long = sum(1 for w in tokens if len(w) >= 15)
        else:
            n_sym = sum(1 for c in t if c < "\x80" and c not in _SENTENCE_PUNCT
                        and not (c.isalnum() or c.isspace()))
            n_long = sum(1 for w in tokens if len(w) >= 15 and _mostly_ascii(w))
        out[i, 0] = sum(1 for w in words if w not in vocab) / max(len(words), 1)
        out[i, 1] = n_sym / len(t)
        out[i, 2] = n_long / nt
        out[i, 3] = sum(1 for w in tokens if _SYMBOL_INSIDE.search(w)) / nt
    return out * _WEIGHTS
