"""What every text attack shares: words, constraints, the query budget, results.

A text is cut into words (Unicode letters and digits, inner apostrophes) and the separators
between them; an attack edits words only and glues the parts back, so spacing and
punctuation stay as they were.

:class:`TextConstraints` keeps the meaning: every candidate text must stay at cosine
similarity >= ``min_similarity`` to the original under the shipped MiniLM sentence
encoder (all 6 layers, mean pooling: ``bastion.llm.embed``, a leaf module that imports
nothing above ``errors``), change at most ``max_word_share`` of the words (at least one),
and by default leave stop words (scikit-learn's English list) and named entities alone.
Without a named-entity model installed, an entity is recognised by its form: a word with
a digit, a capitalised word not at the start of a sentence, or an all-capitals word.

Each attack gets ``max_queries`` model queries per text (every text sent to
``predict_proba`` counts one; a gradient counts one); it stops when they are spent.
Similarity checks are not model queries: they run on Bastion's own encoder.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bastion.errors import BastionError

_WORD = re.compile(r"([^\W_]+(?:'[^\W_]+)?)")


def split_words(text: str) -> list[str]:
    """``[sep, word, sep, word, ..., sep]``: words at odd indices."""
    return _WORD.split(text)


def join(parts: list[str]) -> str:
    return "".join(parts)


def deletions(parts: list[str], positions: list[int]) -> list[str]:
    """The text with each of the words at ``positions`` deleted in turn."""
    out = []
    for i in positions:
        out += substitutions(parts, i, [""])
    return out


def substitutions(parts: list[str], i: int, words: list[str]) -> list[str]:
    """The text with word ``i`` replaced by each of ``words`` in turn."""
    out = []
    for w in words:
        q = list(parts)
        q[i] = w
        out.append(join(q))
    return out


def deletion_drop(p: np.ndarray, p0: np.ndarray, label: int) -> np.ndarray:
    """How much each deletion (answers ``p``) lowers the true class from ``p0``, plus the
    winning class's lead where a deletion alone flips the label."""
    return p0[label] - p[:, label] + (p.argmax(1) != label) * (p.max(1) - p[:, label])


def stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


@dataclass
class TextConstraints:
    """Limits every candidate text obeys (see the module docs)."""

    min_similarity: float = 0.80
    max_word_share: float = 0.25
    protect_stopwords: bool = True
    protect_entities: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_similarity <= 1.0:
            raise BastionError(f"min_similarity must be in [0, 1], got {self.min_similarity}")
        if not 0.0 < self.max_word_share <= 1.0:
            raise BastionError(f"max_word_share must be in (0, 1], got {self.max_word_share}")

    def max_changes(self, n_words: int) -> int:
        return max(1, int(np.floor(self.max_word_share * n_words)))

    def editable(self, parts: list[str]) -> list[int]:
        """Indices (into ``parts``) of the words an attack may change."""
        stops = stop_words() if self.protect_stopwords else frozenset()
        out = []
        first = True
        for i in range(1, len(parts), 2):
            w = parts[i]
            sentence_start = first or bool(re.search(r"[.!?]\s*$", parts[i - 1]))
            first = False
            if w.lower() in stops:
                continue
            if self.protect_entities and (
                    any(c.isdigit() for c in w) or (w[:1].isupper() and not sentence_start)
                    or (len(w) > 1 and w.isupper())):
                continue
            out.append(i)
        return out


class Similarity:
    """Cosine similarity to one original text under the MiniLM sentence encoder."""

    def __init__(self, embedder: Any = None) -> None:
        if embedder is None:
            from bastion.llm.embed import get_embedder  # a leaf module (errors, _util only)

            embedder = get_embedder(None)
        self.embedder = embedder
        self._cache: dict[str, np.ndarray] = {}

    def vectors(self, texts: list[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if todo:
            for t, v in zip(todo, self.embedder.encode(todo), strict=True):
                self._cache[t] = v
        if len(self._cache) > 50_000:
            self._cache.clear()
            return self.embedder.encode(texts)
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 384))

    def __call__(self, original: str, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        v = self.vectors([original, *texts])
        return v[1:] @ v[0]


class OutOfBudget(Exception):
    """The per-text query budget is spent."""


class Budget:
    """Counts one text's queries and refuses any beyond ``max_queries``."""

    def __init__(self, model: Any, max_queries: int) -> None:
        self.model = model
        self.max_queries = int(max_queries)
        self.used = 0

    def left(self) -> int:
        return self.max_queries - self.used

    def proba(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, int(self.model.n_classes)))
        if self.used + len(texts) > self.max_queries:
            texts = texts[: self.left()]
            if not texts:
                raise OutOfBudget
            p = np.asarray(self.model.predict_proba(texts))
            self.used += len(texts)
            return p
        self.used += len(texts)
        return np.asarray(self.model.predict_proba(texts))

    def gradient(self, text: str, label: int) -> Any:
        if self.used + 1 > self.max_queries:
            raise OutOfBudget
        self.used += 1
        return self.model.embedding_gradient(text, label)


@dataclass
class TextAdversarial:
    """One attacked text."""

    original: str
    adversarial: str
    label: int
    original_pred: int
    adversarial_pred: int
    success: bool
    skipped: bool  # already misclassified: not attacked
    queries: int
    words_changed: int
    n_words: int
    similarity: float


@dataclass
class TextAttackReport:
    """Results of one attack over many texts."""

    attack: str
    results: list[TextAdversarial] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.results)

    @property
    def attacked(self) -> list[TextAdversarial]:
        return [r for r in self.results if not r.skipped]

    @property
    def successes(self) -> list[TextAdversarial]:
        return [r for r in self.results if r.success]

    def summary(self) -> dict[str, Any]:
        att, suc = self.attacked, self.successes
        n = max(self.n, 1)
        return {
            "attack": self.attack,
            "n": self.n,
            "clean_accuracy": len(att) / n,
            "robust_accuracy": (len(att) - len(suc)) / n,
            "success_rate": len(suc) / len(att) if att else 0.0,
            "queries_mean": float(np.mean([r.queries for r in att])) if att else 0.0,
            "queries_per_success": float(np.mean([r.queries for r in suc])) if suc else None,
            "words_changed_share": float(np.mean([r.words_changed / max(r.n_words, 1)
                                                  for r in suc])) if suc else None,
            "words_changed_mean": float(np.mean([r.words_changed for r in suc]))
            if suc else None,
            "similarity_mean": float(np.mean([r.similarity for r in suc])) if suc else None,
            "seconds": round(self.seconds, 3),
            **{f"setting_{k}": v for k, v in self.settings.items()},
        }

    def to_dict(self, examples: int = 10) -> dict[str, Any]:
        return {"summary": self.summary(),
                "examples": [asdict(r) for r in self.successes[:examples]]}


class TextAttack:
    """Base class: :meth:`run` loops over texts, each under its own :class:`Budget`;
    subclasses implement :meth:`attack_one`."""

    name = "text"
    _last: tuple[list[str], int] | None = None
    _last_text: str | None = None
    _last_pred: int | None = None

    def __init__(self, *, max_queries: int = 500, constraints: TextConstraints | None = None,
                 similarity: Similarity | None = None, seed: int = 0) -> None:
        if int(max_queries) < 2:
            raise BastionError(f"max_queries must be at least 2, got {max_queries}")
        self.max_queries = int(max_queries)
        self.constraints = constraints or TextConstraints()
        self._similarity = similarity
        self.seed = int(seed)

    @property
    def similarity(self) -> Similarity:
        if self._similarity is None:
            self._similarity = Similarity()
        return self._similarity

    def settings(self) -> dict[str, Any]:
        return {"max_queries": self.max_queries, **asdict(self.constraints)}

    def attack_one(self, budget: Budget, parts: list[str], label: int,
                   p0: np.ndarray) -> tuple[list[str], int]:
        """Edit ``parts``; return the best parts found and the number of words changed."""
        raise NotImplementedError

    def run(self, model: Any, texts: Any, labels: Any) -> TextAttackReport:
        if len(texts) != len(labels):
            raise BastionError(f"{len(texts)} texts but {len(labels)} labels")
        report = TextAttackReport(self.name, settings=self.settings())
        t0 = time.perf_counter()
        for text, label in zip(list(texts), np.asarray(labels).tolist(), strict=True):
            report.results.append(self.attack_text(model, str(text), int(label)))
        report.seconds = time.perf_counter() - t0
        return report

    def attack_text(self, model: Any, text: str, label: int) -> TextAdversarial:
        budget = Budget(model, self.max_queries)
        self._last, self._last_text, self._last_pred = None, None, None
        p0 = budget.proba([text])[0]
        pred0 = int(p0.argmax())
        parts = split_words(text)
        n_words = len(parts) // 2
        if pred0 != label:
            return TextAdversarial(text, text, label, pred0, pred0, False, True, budget.used,
                                   0, n_words, 1.0)
        best, changed = parts, 0
        try:
            best, changed = self.attack_one(budget, list(parts), label, p0)
        except OutOfBudget:
            best, changed = self._last or (parts, 0)
        adv = join(best)
        if adv == text:
            return TextAdversarial(text, text, label, pred0, pred0, False, False, budget.used,
                                   0, n_words, 1.0)
        # the final check is the model's answer the attack already saw; re-ask only if the
        # attack did not record it (no extra query when it did)
        pred = self._last_pred
        if pred is None or self._last_text != adv:
            pred = int(np.asarray(model.predict_proba([adv]))[0].argmax())
        sim = float(self.similarity(text, [adv])[0])
        return TextAdversarial(text, adv, label, pred0, int(pred), int(pred) != label, False,
                               budget.used, changed, n_words, sim)

    # helpers for subclasses
    def _record(self, parts: list[str], changed: int, pred: int | None) -> None:
        self._last = (list(parts), changed)
        self._last_text = join(parts)
        self._last_pred = pred

    def _importance(self, budget: Budget, parts: list[str], positions: list[int], label: int,
                    p0: np.ndarray) -> list[int]:
        """Positions ordered by how much deleting the word lowers the true class."""
        if not positions:
            return []
        p = budget.proba(deletions(parts, positions))
        pos = positions[: len(p)]
        order = np.argsort(-deletion_drop(p, p0, label), kind="stable")
        return [pos[j] for j in order]

    def _take_flip(self, cur: list[str], i: int, words: list[str], asked: list[int],
                   p: np.ndarray, sims: np.ndarray, label: int, changed: set[int]) -> bool:
        """If a queried candidate (``words[asked[k]]``, answered ``p[k]``) flips the label,
        put the most similar such at word ``i`` of ``cur``, record it and say so."""
        flips = [k for k in range(len(asked)) if p[k].argmax() != label]
        if not flips:
            return False
        k = max(flips, key=lambda k: sims[asked[k]])
        cur[i] = words[asked[k]]
        changed.add(i)
        self._record(cur, len(changed), int(p[k].argmax()))
        return True

    def _greedy(self, budget: Budget, parts: list[str], order: list[int], label: int,
                p0: np.ndarray, candidates_for: Any) -> tuple[list[str], int]:
        """Greedy substitution along ``order``: at each word, query the candidates that
        pass the constraints; stop at the first that flips the label (the most similar
        such), else keep the one that lowers the true class most."""
        original = join(parts)
        cur, cur_p = list(parts), float(p0[label])
        changed: set[int] = set()
        limit = self.constraints.max_changes(len(parts) // 2)
        self._record(cur, 0, None)
        for i in order:
            if len(changed) >= limit:
                break
            words = [w for w in candidates_for(cur, i) if w and w != parts[i]]
            if not words:
                continue
            texts = substitutions(cur, i, words)
            sims = self.similarity(original, texts)
            keep = [j for j in range(len(texts)) if sims[j] >= self.constraints.min_similarity]
            if not keep:
                continue
            p = budget.proba([texts[j] for j in keep])
            keep = keep[: len(p)]
            if self._take_flip(cur, i, words, keep, p, sims, label, changed):
                return cur, len(changed)
            k = int(np.argmin(p[:, label]))
            if p[k, label] < cur_p:
                cur[i] = words[keep[k]]
                cur_p = float(p[k, label])
                changed.add(i)
                self._record(cur, len(changed), int(p[k].argmax()))
        return cur, len(changed)
