"""Gradient-guided word substitution in the manner of HotFlip (Ebrahimi et al., 2018),
for white-box text models (``embedding_gradient``).

One forward and backward pass gives the loss gradient ``g_t`` at every token's input
embedding; swapping the token ``w`` at position ``t`` for ``v`` raises the loss by about
``(E[v] - E[w]) . g_t`` (first order). Candidates are the word's neighbours in the
model's own input embeddings (single whole-word tokens), so a substitution stays a real
word; the ``top`` best-scored swaps that keep the sentence similar enough are queried, the
first that flips the label wins, else the best is kept and the gradient is taken again.
No importance ranking by deletion is needed, which is where the queries go.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bastion.attacks.text.base import Budget, TextAttack, join
from bastion.attacks.text.neighbours import model_neighbours
from bastion.errors import BastionError


class HotFlip(TextAttack):
    """HotFlip-style gradient-guided word substitution (white-box text models)."""

    name = "hotflip"

    def __init__(self, *, candidates: int = 20, top: int = 8, **kw: Any) -> None:
        super().__init__(**kw)
        self.candidates = int(candidates)
        self.top = int(top)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "candidates": self.candidates, "top": self.top}

    def run(self, model: Any, texts: Any, labels: Any) -> Any:
        if not callable(getattr(model, "embedding_gradient", None)):
            raise BastionError("hotflip needs a white-box text model (gradients through "
                               "its input embeddings)",
                               hint="use the word or char attack on a black-box model")
        return super().run(model, texts, labels)

    def attack_one(self, budget: Budget, parts: list[str], label: int,
                   p0: np.ndarray) -> tuple[list[str], int]:
        model = budget.model
        nb = model_neighbours(model)
        emb = model.embedding_matrix()
        original = join(parts)
        cur = list(parts)
        changed: set[int] = set()
        cur_p = float(p0[label])
        limit = self.constraints.max_changes(len(parts) // 2)
        editable = [i for i in self.constraints.editable(parts) if nb.neighbours(parts[i], 1)]
        self._record(cur, 0, None)
        while len(changed) < limit:
            text = join(cur)
            ids, grad = budget.gradient(text, label)
            offsets = model.token_offsets(text)
            starts, pos = {}, 0
            for k, p in enumerate(cur):
                if k % 2 == 1:
                    starts[(pos, pos + len(p))] = k
                pos += len(p)
            scored: list[tuple[float, int, str]] = []
            for t, span in enumerate(offsets[: len(ids)]):
                i = starts.get(tuple(span))
                if i is None or i in changed or i not in editable:
                    continue
                cands = nb.neighbours(parts[i], self.candidates)
                cand_ids = [nb.token_ids[nb.index[c.lower()]] for c in cands]
                if not cand_ids:
                    continue
                delta = (emb[cand_ids] - emb[ids[t]]) @ grad[t]
                scored += [(float(d), i, c) for d, c in zip(delta.tolist(), cands, strict=True)]
            if not scored:
                break
            scored.sort(key=lambda s: -s[0])
            texts, swaps = [], []
            for _, i, c in scored[: 3 * self.top]:  # similarity only for the best-scored
                q = list(cur)
                q[i] = c
                texts.append(join(q))
                swaps.append((i, c))
            sims = self.similarity(original, texts)
            keep = [j for j in range(len(texts))
                    if sims[j] >= self.constraints.min_similarity][: self.top]
            if not keep:
                break
            p = budget.proba([texts[j] for j in keep])
            keep = keep[: len(p)]
            flips = [k for k in range(len(keep)) if p[k].argmax() != label]
            if flips:
                k = max(flips, key=lambda k: sims[keep[k]])
                i, c = swaps[keep[k]]
                cur[i] = c
                changed.add(i)
                self._record(cur, len(changed), int(p[k].argmax()))
                return cur, len(changed)
            k = int(np.argmin(p[:, label]))
            if p[k, label] >= cur_p:
                break
            i, c = swaps[keep[k]]
            cur[i], cur_p = c, float(p[k, label])
            changed.add(i)
            self._record(cur, len(changed), int(p[k].argmax()))
        return cur, len(changed)


