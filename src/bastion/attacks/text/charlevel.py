"""Character-level edits in the manner of DeepWordBug (Gao et al., 2018).

Words are ranked by deletion (as the word-level attack); each important word gets a few
edits: swapping two inner letters, deleting, substituting or inserting a letter, and
replacing a Latin letter by a look-alike (a Cyrillic homoglyph), drawn with the attack's
seed. The same constraints apply (sentence similarity, share of words, protected words).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from bastion.attacks.text.base import Budget, TextAttack

HOMOGLYPHS = {"a": "\u0430", "c": "\u0441", "e": "\u0435", "i": "\u0456", "o": "\u043e",
              "p": "\u0440", "s": "\u0455", "x": "\u0445", "y": "\u0443", "j": "\u0458"}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def char_edits(word: str, rng: random.Random, n: int = 6,
               homoglyphs: bool = True) -> list[str]:
    """Up to ``n`` distinct one-edit variants of ``word``."""
    if len(word) < 2:
        return []
    out: list[str] = []
    inner = range(1, len(word) - 1) if len(word) > 3 else range(len(word))
    for _ in range(4 * n):
        op = rng.choice(("swap", "delete", "sub", "insert") + (("glyph",) * homoglyphs))
        i = rng.choice(list(inner))
        if op == "swap" and i + 1 < len(word):
            w = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        elif op == "delete":
            w = word[:i] + word[i + 1:]
        elif op == "sub":
            w = word[:i] + rng.choice(_LETTERS) + word[i + 1:]
        elif op == "insert":
            w = word[:i] + rng.choice(_LETTERS) + word[i:]
        else:
            spots = [j for j, c in enumerate(word) if c.lower() in HOMOGLYPHS]
            if not spots:
                continue
            j = rng.choice(spots)
            w = word[:j] + HOMOGLYPHS[word[j].lower()] + word[j + 1:]
        if w != word and w not in out:
            out.append(w)
        if len(out) >= n:
            break
    return out


class CharEdit(TextAttack):
    """DeepWordBug-style character edits (black-box)."""

    name = "char"

    def __init__(self, *, edits: int = 6, homoglyphs: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        self.edits = int(edits)
        self.homoglyphs = bool(homoglyphs)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "edits": self.edits, "homoglyphs": self.homoglyphs}

    def attack_one(self, budget: Budget, parts: list[str], label: int,
                   p0: np.ndarray) -> tuple[list[str], int]:
        rng = random.Random(f"{self.seed}:{''.join(parts)}")
        positions = [i for i in self.constraints.editable(parts) if len(parts[i]) > 1]
        order = self._importance(budget, parts, positions, label, p0)
        return self._greedy(budget, parts, order, label, p0,
                            lambda cur, i: char_edits(parts[i], rng, self.edits,
                                                      self.homoglyphs))
