"""Word-level substitution in the manner of TextFooler (Jin et al., 2020), tuned for queries.

Words are ranked by how much deleting each lowers the true class (one query per word);
then, most important first, each word's embedding neighbours (:mod:`.neighbours`) are
tried. Differences from the paper: MiniLM's word-piece embeddings replace counter-fitted
vectors, MiniLM sentence similarity replaces the Universal Sentence Encoder, and there is
no part-of-speech filter.

Where TextFooler queries every candidate of a word at once, this search spends queries
where a flip is likely (measured on CLINC150's validation split, ``benchmarks/README.md``):

- the constraints are free (Bastion's own encoder, not the victim), so candidates that
  fail them are dropped before any query;
- the survivors are queried in batches of ``chunk`` (at most ``per_word`` a word), in the
  order a linear surrogate predicts: a ridge regression of the margins the model returned
  so far (original, deletions, earlier swaps) on the sentence vectors the similarity check
  computed anyway, refitted after every batch, lowest predicted margin first (least
  similar first, the plain alternative, already puts the first flip at median rank 1
  against 3 in neighbour order); the first batch with a flip ends the attack (its most
  similar flip);
- the last change the word limit allows must flip the label, so it is never spent on a
  mere improvement: each remaining word is tried from the current text instead (TextFooler
  spends it on the first word tried and stops, which with one change allowed (half of the
  CLINC sentences) means it only ever tries one word);
- a text is left alone after the ranking when the word limit looks unable to flip it: when
  the original log-odds margin (true class against the runner-up) minus the ``limit``
  largest drops that single deletions caused is still ``give_up`` or more (an additive
  estimate of what ``limit`` changes can reach; with one change allowed, the margin the
  most damaging deletion leaves). A swap for a near neighbour rarely moves a model that
  losing the whole word does not (of 64 CLINC dev sentences whose deletions all left
  p >= 0.9, one had any flipping swap). The rule and ``give_up`` = 2.5 were chosen on two
  dev sets (CLINC150's validation split and a prompt-injection filter trained and attacked
  on the prompt file's train split, ``benchmarks/text_word_giveup_dev.py``): the earlier
  rule (every single deletion leaves >= 4.0) gave up on long texts that several changes
  could flip;
- 35 neighbours a word, not TextFooler's 50: on the dev set the same successes with fewer
  queries and similarity checks (flipping swaps beyond the 35th neighbour are rare).

``order="similarity"`` queries least similar first instead of the surrogate's order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bastion.attacks.text.base import (
    Budget,
    TextAttack,
    deletion_drop,
    deletions,
    join,
    substitutions,
)
from bastion.attacks.text.neighbours import WordNeighbours, minilm_neighbours
from bastion.errors import BastionError


class WordSubstitution(TextAttack):
    """TextFooler-style word substitution (black-box)."""

    name = "word"

    def __init__(self, *, candidates: int = 35, per_word: int = 50, chunk: int = 4,
                 give_up: float = 2.5, order: str = "surrogate",
                 neighbours: WordNeighbours | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        try:
            self.candidates = int(candidates)
            self.per_word = int(per_word)
            self.chunk = int(chunk)
            self.give_up = float(give_up)
        except (TypeError, ValueError):
            raise BastionError(
                f"word attack options must be numbers: candidates={candidates!r}, "
                f"per_word={per_word!r}, chunk={chunk!r}, give_up={give_up!r}",
                hint="e.g. --set word.candidates=35 --set word.give_up=2.5") from None
        if self.candidates < 1 or self.per_word < 1 or self.chunk < 1:
            raise BastionError("candidates, per_word and chunk must be at least 1",
                               hint="e.g. candidates=50, per_word=8, chunk=4")
        if not self.give_up > 0.0:
            raise BastionError(f"give_up must be a positive margin, got {self.give_up}",
                               hint="2.5 is the default; float('inf') never gives up")
        if order not in ("surrogate", "similarity"):
            raise BastionError(f"order must be surrogate or similarity, got {order!r}",
                               hint="surrogate (the default) or similarity")
        self.order = order
        self._neighbours = neighbours

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "candidates": self.candidates,
                "per_word": self.per_word, "chunk": self.chunk, "give_up": self.give_up}

    def attack_one(self, budget: Budget, parts: list[str], label: int,
                   p0: np.ndarray) -> tuple[list[str], int]:
        nb = self._neighbours or minilm_neighbours()
        positions = [i for i in self.constraints.editable(parts)
                     if nb.neighbours(parts[i], self.candidates)]  # the search's cache key
        self._record(parts, 0, None)
        if not positions:
            return parts, 0
        deleted = deletions(parts, positions)
        p = budget.proba(deleted)
        if len(p) < len(positions):
            return parts, 0
        margins = _margin(p, label)
        m0 = _margin(p0, label)
        if reachable_margin(m0, margins, self.constraints.max_changes(len(parts) // 2)) \
                >= self.give_up:
            return parts, 0
        drop = deletion_drop(p, p0, label)
        order = [positions[j] for j in np.argsort(-drop, kind="stable")]
        self._seen = ([join(parts), *deleted], [m0, *margins])
        return self._search(budget, parts, order, label, p0, nb)

    def _rank(self, texts: list[str], valid: list[int], sims: np.ndarray) -> list[int]:
        """``valid`` in the order to query: least similar first, or by the margin a
        linear surrogate (ridge regression of the observed margins on the sentence vectors
        the similarity check computed anyway) predicts, lowest first."""
        if self.order == "similarity" or not valid:
            return sorted(valid, key=lambda j: sims[j])
        seen_t, seen_m = self._seen
        v = self.similarity.vectors(seen_t)
        x = v[1:] - v[0]
        y = np.asarray(seen_m[1:]) - seen_m[0]
        if len(y) == 0:
            return sorted(valid, key=lambda j: sims[j])
        gram = x @ x.T + 1e-2 * np.eye(len(y))
        w = x.T @ np.linalg.solve(gram, y)
        c = self.similarity.vectors([texts[j] for j in valid]) - v[0]
        pred = c @ w
        return [valid[k] for k in np.argsort(pred, kind="stable")]

    def _search(self, budget: Budget, parts: list[str], order: list[int], label: int,
                p0: np.ndarray, nb: WordNeighbours) -> tuple[list[str], int]:
        original = join(parts)
        min_sim = self.constraints.min_similarity
        cur, cur_p = list(parts), float(p0[label])
        changed: set[int] = set()
        limit = self.constraints.max_changes(len(parts) // 2)
        for i in order:
            if len(changed) >= limit:
                break
            last = len(changed) == limit - 1
            words = [w for w in nb.neighbours(parts[i], self.candidates) if w != parts[i]]
            texts = substitutions(cur, i, words)
            sims = self.similarity(original, texts)
            todo = [j for j in range(len(texts)) if sims[j] >= min_sim]
            best: tuple[float, int, int] | None = None
            asked = 0
            while todo and asked < self.per_word:
                todo = self._rank(texts, todo, sims)  # re-ranked after every answer
                batch = todo[: min(self.chunk, self.per_word - asked)]
                todo = todo[len(batch):]
                asked += len(batch)
                p = budget.proba([texts[j] for j in batch])
                batch = batch[: len(p)]
                self._seen[0].extend(texts[j] for j in batch)
                self._seen[1].extend(_margin(p, label))
                if self._take_flip(cur, i, words, batch, p, sims, label, changed):
                    return cur, len(changed)
                k = int(np.argmin(p[:, label]))
                if best is None or p[k, label] < best[0]:
                    best = (float(p[k, label]), batch[k], int(p[k].argmax()))
            if not last and best is not None and best[0] < cur_p:
                cur_p = best[0]
                cur[i] = words[best[1]]
                changed.add(i)
                self._record(cur, len(changed), best[2])
        return cur, len(changed)


def _margin(p: np.ndarray, label: int) -> Any:
    """log p(label) - log of the best other class (negative: misclassified)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1.0)
    other = np.delete(p, label, axis=-1).max(-1)
    return (np.log(p[..., label]) - np.log(other)).tolist()


def reachable_margin(m0: float, margins: list[float], limit: int) -> float:
    """The margin ``limit`` changes are estimated to reach: ``m0`` minus the ``limit``
    largest drops single deletions (leaving ``margins``) caused; drops add up."""
    drops = sorted((max(m0 - m, 0.0) for m in margins), reverse=True)
    return float(m0 - sum(drops[: max(int(limit), 1)]))
