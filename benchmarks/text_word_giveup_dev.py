"""Dev-set trace for the word attack's give-up rule: when is a text not worth its swaps?

    .venv/bin/python benchmarks/text_word_giveup_dev.py --data prompt-filter --dev \\
        --prepared DEV.jsonl --model DEV_FILTER --n 240
    .venv/bin/python benchmarks/text_word_giveup_dev.py --model ROUTER --split val --n 200

Runs Bastion's word attack with the give-up off on a dev set (CLINC150's validation split,
or the filter's ``--dev`` set: a filter trained on four fifths of the prompt file's train
split, attacked on the other fifth), recording for every text the margins (log-odds, true
class against the runner-up) the deletion ranking saw, the word limit, the queries and CPU
time spent up to the end of the ranking and in all. A give-up rule decides right after the
ranking, so its outcome on each text is exact from the trace: a text it gives up costs the
ranking's queries and time and is not flipped, any other text is what the full run did.
Two families of rules are simulated over a grid of thresholds ``g``:

- ``min``: give up when every single deletion leaves a margin >= g (the rule until
  2026-12-07, g = 4.0: with one change allowed, the best one change can do is about one
  deletion);
- ``sum``: give up when the original margin minus the sum of the ``limit`` largest margin
  drops (deletions that lower it) is still >= g: the additive estimate of what the word
  limit could reach, which equals ``min`` when one change is allowed (the shipped rule,
  ``reachable_margin``, g = 2.5).

A third family, ``screen`` S (not shipped: on the filter's dev set it sat on the same
trade-off curve or below it), decides a text with more than 2 S rankable words on S
deletions of contiguous groups of words before any single-word ranking, to spare the
ranking's queries on long texts it gives up; the trace asks those group deletions outside
the budget and the simulation adds S queries to every text so screened.

TextFooler's closest recipe (``bench_text.py``) runs on the same texts in the same process
for the reference. Writes ``results/text_word_giveup_dev[_NAME].json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_text  # noqa: E402
import common  # noqa: E402

from bastion.attacks.text.base import (  # noqa: E402
    Similarity,
    TextConstraints,
    join,
)
from bastion.attacks.text.neighbours import minilm_neighbours  # noqa: E402
from bastion.attacks.text.wordlevel import (  # noqa: E402
    WordSubstitution,
    _margin,
    reachable_margin,
)
from bastion.models import resolve_model  # noqa: E402

GRID = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
SCREENS = (4, 6, 8, 12)


class Traced(WordSubstitution):
    """The word attack with the give-up off, recording what a rule would decide on."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(give_up=float("inf"), **kw)
        self.trace: dict[str, Any] = {}

    def attack_text(self, model: Any, text: str, label: int) -> Any:
        self.trace = {"cpu0": time.process_time()}
        self._model = model
        return super().attack_text(model, text, label)

    def _search(self, budget: Any, parts: list[str], order: list[int], label: int,
                p0: np.ndarray, nb: Any) -> Any:
        margins = list(self._seen[1])
        self.trace.update(m0=margins[0], margins=margins[1:],
                          limit=self.constraints.max_changes(len(parts) // 2),
                          ranking_queries=budget.used,
                          ranking_cpu=time.process_time() - self.trace["cpu0"])
        # what a screen of S group deletions would have answered (asked outside the
        # budget: the simulation adds S queries to every long text it screens)
        positions = np.asarray(sorted(order))
        for n in SCREENS:
            if len(positions) > 2 * n:
                texts = [group_deletion(parts, g) for g in np.array_split(positions, n)]
                self.trace[f"screen{n}"] = _margin(self._model.predict_proba(texts), label)
        return super()._search(budget, parts, order, label, p0, nb)


def group_deletion(parts: list[str], group: Any) -> str:
    """The text with every word at the positions in ``group`` deleted at once."""
    q = list(parts)
    for i in group:
        q[int(i)] = ""
    return join(q)


def decide(t: dict[str, Any], rule: str, g: float, screen: int = 0) -> tuple[bool, int]:
    """``(give up?, extra queries)`` for one text; ``screen`` S > 0: a text with more than
    2 S rankable words is decided on S group deletions (S extra queries) instead."""
    if "m0" not in t:
        return False, 0
    n = len(t["margins"])
    if screen and f"screen{screen}" in t:
        per = n / screen
        stop = reachable_margin(t["m0"], t[f"screen{screen}"],
                                int(np.ceil(t["limit"] / per))) >= g
        return stop, screen
    if rule == "min":
        return float(min(t["margins"])) >= g, 0
    return reachable_margin(t["m0"], t["margins"], t["limit"]) >= g, 0


def simulate(rows: list[dict[str, Any]], rule: str, g: float, screen: int = 0
             ) -> dict[str, Any]:
    att = [r for r in rows if not r["skipped"]]
    out: dict[str, Any] = {"rule": rule, "g": g, "screen": screen}
    for name, part in [("all", att), *[(c, [r for r in att if r["label"] == c])
                                       for c in sorted({r["label"] for r in att})]]:
        q, cpu, ok = 0.0, 0.0, 0
        for r in part:
            t = r["trace"]
            stop, extra = decide(t, rule, g, screen)
            # a screened text given up skips the single-word ranking: 1 + S queries and a
            # share S / n of the ranking's time; one attacked pays the S queries on top
            n = max(len(t.get("margins", [])), 1)
            if stop and extra:
                q += 1 + extra
                cpu += t["ranking_cpu"] * extra / n
            elif stop:
                q += t["ranking_queries"]
                cpu += t["ranking_cpu"]
            else:
                q += r["queries"] + extra
                cpu += r["cpu"] + t["ranking_cpu"] * extra / n
                ok += int(r["success"])
        out[name] = {"success": round(ok / max(len(part), 1), 4),
                     "queries_per_text": round(q / max(len(part), 1), 2),
                     "cpu_s": round(cpu, 1)}
    return out


def main() -> None:
    ap = bench_text.parser()
    args = ap.parse_args()
    torch.set_num_threads(common.THREADS)
    spec = None
    if args.data == "prompt-filter":
        if not args.dev:
            ap.error("the filter's dev set is --dev (the report's test texts are not for this)")
        spec = f"jsonl:{bench_text.prepare_filter(bench_text.PROMPTS, args.prepared, True)}" \
               "?split=split"
    elif args.split != "val":
        ap.error("CLINC150's dev set is --split val")
    model = resolve_model(args.model)
    texts, labels, names = bench_text.attacked_texts(args, spec, model)
    sim = Similarity()
    sim("warm up", ["the encoder and the neighbours"])
    minilm_neighbours()
    attack = Traced(max_queries=args.max_queries, similarity=sim,
                    constraints=TextConstraints(min_similarity=args.min_sim,
                                                max_word_share=args.max_share))
    rows = []
    c_all = time.process_time()
    for text, y in zip(texts, labels.tolist(), strict=True):
        r = attack.attack_text(model, text, int(y))
        trace = {k: v for k, v in attack.trace.items() if k != "cpu0"}
        trace.setdefault("ranking_queries", r.queries)
        trace.setdefault("ranking_cpu", time.process_time() - attack.trace["cpu0"])
        rows.append({"label": names[int(y)], "skipped": r.skipped, "success": r.success,
                     "queries": r.queries, "cpu": time.process_time() - attack.trace["cpu0"],
                     "trace": trace})
    cpu_bastion = time.process_time() - c_all
    sims = [simulate(rows, rule, g) for rule in ("min", "sum") for g in GRID]
    sims += [simulate(rows, "sum", g, n) for n in SCREENS for g in GRID]
    for s in sims:
        print(s["rule"], s["g"], s["screen"], s["all"], flush=True)
    reference: dict[str, Any] = {}
    if not args.skip_textattack:
        ta = bench_text.import_textattack()
        from textattack.models.wrappers import ModelWrapper

        class Wrapper(ModelWrapper):
            def __init__(self, m: Any) -> None:
                self.model = m

            def __call__(self, text_list: list[str]) -> Any:
                return self.model.predict_proba(list(text_list))

        recipes = bench_text.textattack_recipes(ta, Wrapper(model), min_sim=args.min_sim,
                                                max_share=args.max_share,
                                                budget=args.max_queries, sim=sim)
        tf = recipes["TextFooler (closest recipe)"]
        reference = bench_text.run_textattack(tf, texts, labels, sim, names)
        reference.pop("examples", None)
        print("TextFooler", {k: v for k, v in reference.items()}, flush=True)
    common.write_result("text_word_giveup_dev" + (f"_{args.name}" if args.name != "text"
                                                   else ""), {
        "settings": {"data": args.data, "dev": args.dev, "split": args.split,
                     "model": args.model, "n": args.n, "max_queries": args.max_queries,
                     "min_similarity": args.min_sim, "max_word_share": args.max_share,
                     "max_words": args.max_words, "torch_threads": torch.get_num_threads()},
        "never_give_up_cpu_s": round(cpu_bastion, 1),
        "rules": sims, "textfooler": reference,
        "texts": [{k: v for k, v in r.items()} for r in rows]})


if __name__ == "__main__":
    main()
