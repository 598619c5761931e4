"""Text evasion on the CLINC150 intent router (or a prompt-injection filter): Bastion's
word- and character-level attacks against TextAttack's TextFoolerJin2019 and
DeepWordBugGao2018, same sentences, one run.

    .venv/bin/python benchmarks/bench_text.py --model ROUTER_DIR [--n 500] [--max-queries 300]
        [--split test|val] [--word-options candidates=35,chunk=4]
    .venv/bin/python benchmarks/bench_text.py --data prompt-filter --prepare-only
    .venv/bin/python benchmarks/bench_text.py --data prompt-filter --model FILTER_DIR --n 240

``--data prompt-filter`` is the second text model: a moderation-style binary filter
(``attack`` = injection or jailbreak, ``benign``) on ``datasets/prompt-injection/
prompts.jsonl`` with the file's own train/test split. The script writes the relabelled
file (``--prepared``, default ``benchmarks/.cache/prompt_filter.jsonl``); ``--prepare-only``
stops there and prints the ``bastion train`` command. It attacks test texts of at most
``--max-words`` words (default 60, for attack cost; the model truncates at 64 word pieces),
half of them ``attack`` and half ``benign`` (seeded), and reports each run's success per
true class: ``attack`` -> ``benign`` is the evasion of the filter that matters.

``--split val`` attacks CLINC150's validation split: the dev set settings are chosen on;
the report uses the test split (the router trained on neither). The filter's dev set is
``--dev``: the file's train split re-split 80/20 (its test split left out); train a dev
filter on the prepared file (``--prepare-only --dev --prepared DEV.jsonl``) and attack its
held-out fifth with ``--dev --prepared DEV.jsonl --model DEV_FILTER``.

ROUTER_DIR is ``bastion train --model text-intent --data clinc150:PATH --out ROUTER_DIR``.
Writes ``benchmarks/results/text.json`` and prints a table.

TextAttack 0.3.11 is installed with ``--no-deps`` (its dependency set pulls flair and an
older transformers); the modules it imports at import time but these two recipes never
call (flair, jieba, nltk, datasets, ...) are placeholders here, and NLTK's stop-word list
(a download) is scikit-learn's English list, the one Bastion uses.

TextFoolerJin2019 needs counter-fitted GloVe vectors and the Universal Sentence Encoder,
both downloads, and a POS tagger (flair, a download). The closest recipe is built from
TextAttack's own components: ``GreedyWordSwapWIR("delete")`` search,
``WordSwapEmbedding(max_candidates=50)`` over the same MiniLM word-piece embeddings
Bastion uses (unit length, so Euclidean neighbours are cosine neighbours; TextAttack's
neighbour search fails under torch 2.x, so it is rewritten here, same result),
``WordEmbeddingDistance(min_cos_sim=0.3)`` (Bastion's neighbour cut-off),
``RepeatModification``, ``StopwordModification``, a word limit and a
``SentenceEncoder`` subclass that scores with the same MiniLM encoder at the same threshold
over the whole sentence; no POS constraint (Bastion has none either). The word limit is
Bastion's (at most floor(share x words), at least one); a second row keeps TextAttack's
``MaxWordsPerturbed``, which rounds up and so allows more than the share on most CLINC
sentences. Each recipe starts with an empty sentence-vector cache. DeepWordBugGao2018
is TextAttack's recipe as shipped (Levenshtein distance <= 30, no similarity constraint);
the MiniLM similarity of its results is measured afterwards; a second run adds Bastion's
constraints to it (MiniLM similarity, share of words). Both tools get the same query budget
per sentence; the encoder and neighbours are loaded before any timing.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from bastion.attacks.text import get_text_attack  # noqa: E402
from bastion.attacks.text.base import Similarity  # noqa: E402
from bastion.attacks.text.neighbours import minilm_neighbours  # noqa: E402
from bastion.data import load_data  # noqa: E402
from bastion.models import resolve_model  # noqa: E402

_STUBS = {"flair", "jieba", "Levenshtein", "nltk", "num2words", "word2number", "lemminflect",
          "pinyin", "OpenHowNet", "bert_score", "language_tool_python", "datasets",
          "terminaltables", "langdetect", "more_itertools"}


class _Placeholder(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        sub: Any = type(name, (), {}) if name[:1].isupper() else _Placeholder(
            f"{self.__name__}.{name}")
        setattr(self, name, sub)
        return sub

    def __call__(self, *a: Any, **k: Any) -> Any:
        raise RuntimeError(f"{self.__name__} is a placeholder (not installed)")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        top = name.split(".")[0]
        if top in _STUBS and importlib.machinery.PathFinder.find_spec(top) is None:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> Any:
        return _Placeholder(spec.name)

    def exec_module(self, module: Any) -> None:
        module.__path__ = []


def import_textattack() -> Any:
    cache = Path(os.environ.setdefault("TA_CACHE_DIR", str(common.CACHE / "textattack")))
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "post_install_check_3").touch()  # skip its NLTK/stanza downloads
    sys.meta_path.insert(0, _Finder())
    import nltk.corpus  # the placeholder unless NLTK is installed
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    if isinstance(nltk.corpus, _Placeholder):
        nltk.corpus.stopwords.words = lambda language="english": sorted(ENGLISH_STOP_WORDS)
    import textattack

    return textattack


def textattack_recipes(ta: Any, wrapper: Any, *, min_sim: float, max_share: float,
                       budget: int, sim: Similarity) -> dict[str, Any]:
    from textattack import Attack
    from textattack.attack_recipes import DeepWordBugGao2018
    from textattack.constraints.overlap import MaxWordsPerturbed
    from textattack.constraints.pre_transformation import (
        RepeatModification,
        StopwordModification,
    )
    from textattack.constraints.semantics import WordEmbeddingDistance
    from textattack.constraints.semantics.sentence_encoders import SentenceEncoder
    from textattack.goal_functions import UntargetedClassification
    from textattack.search_methods import GreedyWordSwapWIR
    from textattack.shared import WordEmbedding
    from textattack.transformations import WordSwapEmbedding

    class MiniLMEncoder(SentenceEncoder):
        def encode(self, sentences: list[str]) -> Any:
            return torch.from_numpy(sim.vectors(list(sentences)))

    class Embedding(WordEmbedding):
        """TextAttack's nearest_neighbours slices the tuple torch.topk returns (an error
        under torch 2.x); this is the same search (unit vectors: Euclidean order is cosine
        order) written for today's torch."""

        def nearest_neighbours(self, index: Any, topn: int) -> list[int]:
            if isinstance(index, str):
                index = self._word2index[index]
            key = (index, topn)
            if key not in self._nn_cache:
                sims = nb.matrix @ nb.matrix[index]
                ix = sims.topk(topn + 1).indices.tolist()
                self._nn_cache[key] = [i for i in ix if i != index][:topn]
            return self._nn_cache[key]

    class MaxShareFloor(MaxWordsPerturbed):
        """Bastion's word limit: at most floor(share x words) changed (at least one).
        TextAttack's own rounds up (ceil), which lets 5-7-word sentences change 2 words
        (29-40%) and 9-11-word ones 3 (27-33%): more than "at most 25%"."""

        def _check_constraint(self, transformed_text: Any, reference_text: Any) -> bool:
            diff = len(transformed_text.all_words_diff(reference_text))
            n = min(len(transformed_text.words), len(reference_text.words))
            return diff <= max(1, int(np.floor(self.max_percent * n)))

    nb = minilm_neighbours()
    matrix = nb.matrix.numpy()
    emb = Embedding(matrix, dict(nb.index), dict(enumerate(nb.words)))
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    def textfooler(limit: Any) -> Any:
        constraints = [RepeatModification(),
                       StopwordModification(stopwords=ENGLISH_STOP_WORDS),
                       WordEmbeddingDistance(embedding=emb, min_cos_sim=0.3),
                       limit(max_percent=max_share),
                       MiniLMEncoder(threshold=min_sim, metric="cosine",
                                     compare_against_original=True, window_size=None)]
        goal = UntargetedClassification(wrapper, query_budget=budget)
        return Attack(goal, constraints, WordSwapEmbedding(max_candidates=50, embedding=emb),
                      GreedyWordSwapWIR(wir_method="delete"))

    dwb = DeepWordBugGao2018.build(wrapper)
    dwb.goal_function.query_budget = budget
    dwb_sim = Attack(UntargetedClassification(wrapper, query_budget=budget),
                     list(dwb.pre_transformation_constraints) + list(dwb.constraints) + [
                         MiniLMEncoder(threshold=min_sim, metric="cosine",
                                       compare_against_original=True, window_size=None),
                         MaxShareFloor(max_percent=max_share)],
                     dwb.transformation, GreedyWordSwapWIR(wir_method="unk"))
    return {"TextFooler (closest recipe)": textfooler(MaxShareFloor),
            "TextFooler (closest recipe, word limit rounded up)": textfooler(MaxWordsPerturbed),
            "DeepWordBugGao2018": dwb,
            "DeepWordBugGao2018 + same constraints": dwb_sim}


def run_textattack(attack: Any, texts: list[str], labels: np.ndarray,
                   sim: Similarity, names: list[str]) -> dict[str, Any]:
    from textattack.attack_results import FailedAttackResult, SkippedAttackResult

    rows = []
    sim._cache.clear()  # no recipe starts with sentence vectors an earlier run computed
    t0, c0 = time.perf_counter(), time.process_time()
    for t, y in zip(texts, labels.tolist(), strict=True):
        r = attack.attack(t, int(y))
        skipped = isinstance(r, SkippedAttackResult)
        ok = not skipped and not isinstance(r, FailedAttackResult)
        adv = r.perturbed_result.attacked_text
        orig = r.original_result.attacked_text
        changed = len(orig.all_words_diff(adv)) if ok else 0
        rows.append({"skipped": skipped, "success": ok, "label": names[int(y)],
                     "queries": int(r.perturbed_result.num_queries),
                     "words_changed": changed, "n_words": len(orig.words),
                     "original": t, "adversarial": adv.text})
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    for r in rows:
        if r["success"]:
            r["similarity"] = float(sim(r["original"], [r["adversarial"]])[0])
    return summarise(rows, secs, cpu)


def by_class(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Success per true class (on a binary filter: the direction of the evasion)."""
    out = {}
    for name in sorted({r["label"] for r in rows}):
        att = [r for r in rows if r["label"] == name and not r["skipped"]]
        suc = [r for r in att if r["success"]]
        out[name] = {"attacked": len(att), "successes": len(suc),
                     "success_rate": len(suc) / max(len(att), 1),
                     "queries_mean": float(np.mean([r["queries"] for r in att])) if att
                     else None}
    return out


def summarise(rows: list[dict[str, Any]], secs: float, cpu: float) -> dict[str, Any]:
    att = [r for r in rows if not r["skipped"]]
    suc = [r for r in att if r["success"]]
    return {
        "by_class": by_class(rows),
        "attacked": len(att), "successes": len(suc),
        "success_rate": len(suc) / max(len(att), 1),
        "queries_mean": float(np.mean([r["queries"] for r in att])) if att else None,
        "queries_per_success": float(np.mean([r["queries"] for r in suc])) if suc else None,
        "words_changed_share": float(np.mean([r["words_changed"] / max(r["n_words"], 1)
                                              for r in suc])) if suc else None,
        "similarity_mean": float(np.mean([r["similarity"] for r in suc])) if suc else None,
        "seconds": round(secs, 1),
        "cpu_seconds": round(cpu, 1),
        "seconds_per_text": round(secs / max(len(att), 1), 3),
        "examples": [(r["original"], r["adversarial"]) for r in suc[:5]],
    }


def run_bastion(name: str, model: Any, texts: list[str], labels: np.ndarray, *,
                budget: int, min_sim: float, max_share: float, names: list[str],
                options: dict[str, Any] | None = None) -> dict[str, Any]:
    attack = get_text_attack(name, max_queries=budget, min_similarity=min_sim,
                             max_word_share=max_share, **(options or {}))
    c0 = time.process_time()
    rep = attack.run(model, texts, labels)
    cpu = time.process_time() - c0
    rows = [{"skipped": r.skipped, "success": r.success, "queries": r.queries,
             "label": names[int(r.label)],
             "words_changed": r.words_changed, "n_words": r.n_words, "original": r.original,
             "adversarial": r.adversarial, "similarity": r.similarity} for r in rep.results]
    return summarise(rows, rep.seconds, cpu)


def clinc_val(ds: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """CLINC150's validation split (in-scope and out-of-scope), labelled as ``ds`` is:
    a dev set that shares no sentence with the test split the report uses."""
    import json

    doc = json.loads(path.read_text(encoding="utf-8"))
    index = {n: j for j, n in enumerate(ds.class_names)}
    pairs = [(q, index[i]) for q, i in list(doc["val"]) + list(doc["oos_val"]) if i in index]
    return (np.array([q for q, _ in pairs], dtype=object),
            np.array([j for _, j in pairs], dtype=np.int64))


PROMPTS = common.SHARED / "datasets" / "prompt-injection" / "prompts.jsonl"
PREPARED = common.CACHE / "prompt_filter.jsonl"


def prepare_filter(src: Path, out: Path, dev: bool = False) -> Path:
    """``prompts.jsonl`` relabelled for a binary filter: injection and jailbreak ->
    ``attack``, benign -> ``benign``; text and the file's own split kept as they are.

    ``dev``: the file's test split is left out and its train split re-split, seeded, into
    ``train`` (80%) and ``test`` (20%, the dev texts): a dev filter trained on that file and
    attacked on its ``test`` rows shares no text with the report's model or texts."""
    import json

    if not src.is_file():
        raise SystemExit(f"prompt-injection data not found at {src}: set BASTION_SHARED")
    with open(src, encoding="utf-8") as fh:  # not splitlines(): texts hold U+2028
        rows = [json.loads(line) for line in fh if line.strip()]
    known = {"benign", "injection", "jailbreak"}
    bad = [r.get("label") for r in rows if r.get("label") not in known]
    if bad:
        raise SystemExit(f"{src}: unknown labels {sorted(set(map(str, bad)))[:5]}")
    if dev:
        rows = [r for r in rows if r["split"] == "train"]
        held = np.random.default_rng(20).random(len(rows)) < 0.2
        rows = [{**r, "split": "test" if h else "train"} for r, h in zip(rows, held, strict=True)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({"text": r["text"], "split": r["split"],
                                 "label": "benign" if r["label"] == "benign" else "attack",
                                 "kind": r["label"]}) + "\n")
    return out


def pick_balanced(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Up to n // 2 indices of each class (seeded), the rest from the larger class."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per = n // len(classes)
    chosen = [rng.choice(np.flatnonzero(y == c), min(per, int((y == c).sum())), replace=False)
              for c in classes]
    got = np.concatenate(chosen)
    rest = np.setdiff1d(np.arange(len(y)), got)
    extra = rng.choice(rest, min(n - len(got), len(rest)), replace=False)
    return np.sort(np.concatenate([got, extra]))


def attacked_texts(args: argparse.Namespace, spec: str | None, model: Any,
                   ) -> tuple[list[str], np.ndarray, list[str]]:
    """The texts the run attacks (seeded), their labels and the class names."""
    if args.data == "clinc150":
        clinc = common.CLINC
        ds = common.clinc()
        x, y = ds.x_test, ds.y_test
        if args.split == "val":
            x, y = clinc_val(ds, clinc)
        pick = np.sort(np.random.default_rng(0).choice(len(x), args.n, replace=False))
    else:
        ds = load_data(spec)
        if list(model.class_names) != list(ds.class_names):
            raise SystemExit(f"the model's classes {model.class_names} are not the data's "
                             f"{ds.class_names}: train it on {spec}")
        short = np.array([len(str(t).split()) <= args.max_words for t in ds.x_test])
        x, y = ds.x_test[short], ds.y_test[short]
        pick = pick_balanced(y, args.n)
    texts, labels = [str(t) for t in x[pick]], y[pick]
    names = [str(c) for c in ds.class_names]
    return texts, labels, names


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="the text-intent model folder (router or filter)")
    ap.add_argument("--data", choices=("clinc150", "prompt-filter"), default="clinc150",
                    help="clinc150: the intent router's data; prompt-filter: the "
                    "prompt-injection filter's (attack vs benign, the file's own split)")
    ap.add_argument("--prepared", type=Path, default=PREPARED,
                    help="where --data prompt-filter writes its relabelled jsonl")
    ap.add_argument("--prepare-only", action="store_true",
                    help="write the prompt-filter jsonl, print the train command, stop")
    ap.add_argument("--max-words", type=int, default=60,
                    help="prompt-filter: attack test texts of at most this many words")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--max-queries", type=int, default=300)
    ap.add_argument("--min-sim", type=float, default=0.8)
    ap.add_argument("--max-share", type=float, default=0.25)
    ap.add_argument("--split", choices=("test", "val"), default="test",
                    help="CLINC150 split to attack: test (the report) or val (a dev set for "
                    "choosing settings; the router never trained on either)")
    ap.add_argument("--dev", action="store_true",
                    help="prompt-filter: the dev set (train split re-split 80/20, the file's "
                    "test split left out); train a dev filter on it and attack its test rows")
    ap.add_argument("--skip-textattack", action="store_true")
    ap.add_argument("--name", default="text")
    ap.add_argument("--bastion", default="word,char,hotflip", help="Bastion attacks to run")
    ap.add_argument("--word-options", default="",
                    help="options for Bastion's word attack, e.g. candidates=35,chunk=4")
    ap.add_argument("--recipes", default="all",
                    help="TextAttack recipes to run: all, or 'textfooler'")
    return ap


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    torch.set_num_threads(common.THREADS)
    if args.data == "prompt-filter":
        spec = f"jsonl:{prepare_filter(PROMPTS, args.prepared, args.dev)}?split=split"
        if args.prepare_only or not args.model:
            print(f"wrote {args.prepared}; train the filter with:\n  bastion train --model "
                  f"text-intent --data '{spec}' --out FILTER_DIR")
            return
        if args.split == "val":
            ap.error("--split val is CLINC150's; the prompt-filter's dev set is --dev")
    else:
        spec = None
        if not args.model:
            ap.error("--model is required")
    model = resolve_model(args.model)
    texts, labels, names = attacked_texts(args, spec, model)
    clean = float((model.predict_proba(texts).argmax(1) == labels).mean())
    sim = Similarity()
    sim("warm up", ["the encoder and the neighbours"])  # loaded before any timing
    minilm_neighbours()
    kw = {"budget": args.max_queries, "min_sim": args.min_sim, "max_share": args.max_share,
          "names": names}
    runs: dict[str, Any] = {}
    for name in [a for a in args.bastion.split(",") if a]:
        opts = dict(o.split("=", 1) for o in args.word_options.split(",") if o) \
            if name == "word" else {}
        runs[f"bastion {name}"] = run_bastion(name, model, texts, labels, **kw,
                                              options={k: float(v) if "." in v else int(v)
                                                       for k, v in opts.items()})
        print(name, {k: v for k, v in runs[f"bastion {name}"].items() if k != "examples"},
              flush=True)
    if not args.skip_textattack:
        ta = import_textattack()
        from textattack.models.wrappers import ModelWrapper

        class Wrapper(ModelWrapper):
            def __init__(self, m: Any) -> None:
                self.model = m

            def __call__(self, text_list: list[str]) -> Any:
                return self.model.predict_proba(list(text_list))

        recipes = textattack_recipes(ta, Wrapper(model), min_sim=args.min_sim,
                                     max_share=args.max_share, budget=args.max_queries,
                                     sim=sim)
        if args.recipes == "textfooler":
            recipes = {k: v for k, v in recipes.items() if k.startswith("TextFooler")}
        for name, attack in recipes.items():
            runs[f"textattack {name}"] = run_textattack(attack, texts, labels, sim, names)
            print(name, {k: v for k, v in runs[f"textattack {name}"].items()
                         if k != "examples"}, flush=True)
    goals = {}
    tf = runs.get("textattack TextFooler (closest recipe)")
    if tf:
        b = runs["bastion word"]
        goals["word_success_at_least_textattack"] = b["success_rate"] >= tf["success_rate"]
        if b["queries_mean"] and tf["queries_mean"]:
            goals["word_queries_ratio"] = round(b["queries_mean"] / tf["queries_mean"], 3)
            goals["word_queries_at_most_half"] = goals["word_queries_ratio"] <= 0.5
        goals["word_time_ratio"] = round(b["seconds"] / max(tf["seconds"], 1e-9), 3)
        goals["word_cpu_time_ratio"] = round(b["cpu_seconds"] / max(tf["cpu_seconds"], 1e-9), 3)
        goals["word_time_at_most_half"] = goals["word_cpu_time_ratio"] <= 0.5
        if args.data == "prompt-filter":  # the evasion that matters: attack -> benign
            b_a, tf_a = b["by_class"]["attack"], tf["by_class"]["attack"]
            goals["attack_to_benign_success"] = {"bastion word": b_a["success_rate"],
                                                 "textfooler": tf_a["success_rate"]}
            goals["attack_to_benign_success_at_least_textattack"] = (
                b_a["success_rate"] >= tf_a["success_rate"])
            if b_a["queries_mean"] and tf_a["queries_mean"]:
                goals["attack_to_benign_queries_ratio"] = round(
                    b_a["queries_mean"] / tf_a["queries_mean"], 3)
    result = {"settings": {"n": args.n, "split": args.split, "model": args.model,
                           "dev": args.dev,
                           "data": args.data, "class_counts": None if args.data == "clinc150"
                           else {names[c]: int((labels == c).sum()) for c in np.unique(labels)},
                           "max_words": args.max_words if args.data != "clinc150" else None,
                           "clean_accuracy": clean,
                           "max_queries": args.max_queries, "min_similarity": args.min_sim,
                           "max_word_share": args.max_share,
                           "word_options": args.word_options,
                           "textattack": None if args.skip_textattack else "0.3.11",
                           "torch_threads": torch.get_num_threads()},
              "runs": runs, "goals": goals}
    common.write_result(args.name, result)
    rows = [[k, v["attacked"], f"{v['success_rate']:.1%}",
             f"{v['queries_mean']:.0f}" if v["queries_mean"] else "-",
             f"{v['queries_per_success']:.0f}" if v["queries_per_success"] else "-",
             f"{v['words_changed_share']:.2f}" if v["words_changed_share"] else "-",
             f"{v['similarity_mean']:.3f}" if v["similarity_mean"] else "-",
             v["seconds"], v["cpu_seconds"]] for k, v in runs.items()]
    head = ["attack", "attacked", "success", "queries/text", "queries/success",
            "words changed", "similarity", "s", "CPU s"]
    if args.data == "prompt-filter":
        head.append("success by true class")
        for row, v in zip(rows, runs.values(), strict=True):
            row.append(", ".join(f"{c} {d['success_rate']:.1%} of {d['attacked']}"
                                 for c, d in v["by_class"].items()))
    print(common.markdown_table(head, rows))
    print("goals:", goals)


if __name__ == "__main__":
    main()
