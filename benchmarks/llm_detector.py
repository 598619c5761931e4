"""Benchmark 1: prompt-injection detector quality, on sources and languages it never saw.

    .venv/bin/python benchmarks/llm_detector.py --cache FILE [--recipe v2|v1]
        [--loso all|dev|report|none] [--sources A,B] [--folds DIR] [--detector DIR]
        [--train-out DIR] [--blocks char,word] [--counterparts 2000] [--dropout]
        [--doc-windows 200] [--wording-holdout] [--C 16] [--emb-scale 2]
        [--proto-scale 3] [--ship]

Data: ``$BASTION_SHARED/datasets``: ``prompt-injection`` (corpus, harmful requests, canary
cases), ``prompt-injection-agents``, ``benign-multilingual``. The recipe's rows come from
:func:`bastion.llm.training.detector_training_rows` (``v1``: the corpus and harmful
requests, as the detector shipped before issue 17; ``v2``: plus agent data, benign
multilingual text, benign trigger-word counterparts and quiet extraction positives).

Measured (JSON to ``benchmarks/results/llm_detector.json``, or ``--out``):

- **leave-one-source-out** (primary): per held-out repository a detector is retrained on
  the others' train rows and calibrated at 1% FPR on their held-back benign rows; AUROC,
  TPR and benign flagged rate at that threshold per source, macro means. ``dev`` sources
  are the ones model choices were made on, ``report`` the others (their macro is the
  unbiased number). Folds are cached as JSON in ``--folds`` so a run can be split.
- for one detector (``--detector``, default: a recipe detector trained on every train row,
  saved to ``--train-out``; ``--detector shipped`` for the packaged one): the random
  split (corpus test rows), benign flagged rate per language and script, benign
  trigger-word texts flagged, extraction recall, injections in agent documents caught by
  position and length (and benign agent documents flagged by length).
- ``--wording-holdout``: agent-data injections with whole attack wordings held out (two
  folds over the wordings of ``subtype``), recall at the threshold.

Goals (issue 17): LOSO macro AUROC >= 0.97, LOSO TPR >= 90%; at the threshold benign
flagged <= 3% in every language and for trigger-word texts; extraction recall >= 90%;
injections in documents and tool outputs caught >= 90%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BASTION_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "benchmarks" / "results"
SHIP = ROOT / "src" / "bastion" / "llm" / "data" / "detector"
#: the repositories of ../shared/datasets/prompt-injection-agents
AGENT_SOURCES = frozenset({
    "ethz-spylab/agentdojo", "AthaSSiN/CrAIBench", "Zhang-Henry/AIOS_agent",
    "sierra-research/tau2-bench", "tldr-pages/tldr", "ActiveCampaign/postmark-templates",
})
#: the sources model choices were made on (their LOSO folds); the others are report-only
DEV_SOURCES = (
    "JailbreakBench/artifacts", "clinc/oos-eval", "microsoft/BIPIA", "ethz-spylab/agentdojo",
    "tldr-pages/tldr", "facebookresearch/LASER",
)


def _rate(k: int, n: int) -> dict[str, Any]:
    from bastion.llm.metrics import wilson_interval

    return {"n": n, "flagged": k, "rate": k / n if n else None,
            "ci95": list(wilson_interval(k, n))}


def _recipe(args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    from bastion.llm.training import detector_training_rows

    v2 = args.recipe == "v2"
    rows = detector_training_rows(
        SHARED, seed=args.seed, agents=v2, multilingual=v2,
        counterparts=args.counterparts if v2 else 0, extraction=v2, dropout=args.dropout,
    )
    params = {"ngram_blocks": tuple(args.blocks.split(",")), "seed": args.seed,
              "C": args.C, "emb_scale": args.emb_scale, "proto_scale": args.proto_scale,
              # v1: the text statistics as the detector before issue 17 computed them
              "stats_version": 2 if v2 else 1}
    return rows, params


def _variant_name(args: argparse.Namespace) -> str:
    name = f"{args.recipe}-{args.blocks.replace(',', '+')}"
    if args.recipe == "v2":
        name += f"-cp{args.counterparts}" + ("-dropout" if args.dropout else "")
    elif args.dropout:
        name += "-dropout"
    if args.C != 16.0 or args.emb_scale != 2.0:
        name += f"-C{args.C:g}-emb{args.emb_scale:g}"
    if args.proto_scale:
        name += f"-proto{args.proto_scale:g}"
    return name


def run_loso(args: argparse.Namespace, emb: Any) -> dict[str, Any]:
    from bastion.llm.training import (
        evaluate_loso,
        fit_calibrated,
        loso_macro,
        loso_splits,
        recipe_weight,
    )

    rows, params = _recipe(args)
    # every source the v2 recipe holds, so that v1 and v2 are compared on the same folds
    all_rows, _ = _recipe(argparse.Namespace(**{**vars(args), "recipe": "v2"}))
    folds = [f["source"] for f in loso_splits(all_rows)]
    if args.sources:
        folds = [s for s in folds if s in args.sources.split(",")]
    elif args.loso == "dev":
        folds = [s for s in folds if s in DEV_SOURCES]
    elif args.loso == "report":
        folds = [s for s in folds if s not in DEV_SOURCES]
    fold_dir = Path(args.folds) / _variant_name(args)
    fold_dir.mkdir(parents=True, exist_ok=True)
    per: dict[str, Any] = {}
    names = {r.text for r in rows}
    memo: dict[str, Any] = {}  # folds whose training rows are the same share one fit

    def fit(train: list[Any]) -> Any:
        import hashlib

        train = [r for r in train if r.text in names]
        key = hashlib.sha1("\x00".join(sorted(r.text for r in train)).encode()).hexdigest()
        if key not in memo:
            memo[key] = fit_calibrated(train, embedder=emb, weight=recipe_weight, **params)
        return memo[key]

    for g in folds:
        f = fold_dir / (g.replace("/", "__") + ".json")
        if f.exists():
            per[g] = json.loads(f.read_text())
            continue
        t0 = time.time()
        # the held-out source's rows (and a reference class) come from the v2 rows; the
        # training rows from this recipe's rows
        ev_rows = [r for r in all_rows if g in r.groups or r.text in names]
        res = evaluate_loso(ev_rows, fit, sources=[g])["per_source"][g]
        res["seconds"] = round(time.time() - t0, 1)
        f.write_text(json.dumps(res, indent=1))
        per[g] = res
        print(f"{g}: {json.dumps(res)}", flush=True)
        if emb.cache is not None:
            emb.cache.save()
    dev = {k: v for k, v in per.items() if k in DEV_SOURCES}
    rep = {k: v for k, v in per.items() if k not in DEV_SOURCES}
    return {"variant": _variant_name(args), "per_source": per, "macro": loso_macro(per),
            "macro_dev": loso_macro(dev), "macro_report": loso_macro(rep)}


def evaluate_one(det: Any, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from bastion.llm.datasets import load_prompt_jsonl
    from bastion.llm.training import evaluate_on_records, language_table, recipe_eval_sets

    sets = recipe_eval_sets(SHARED, seed=args.seed)
    data = SHARED / "datasets" / "prompt-injection"
    test = load_prompt_jsonl(data / "prompts.jsonl", split="test")
    harmful = [r.text for r in load_prompt_jsonl(data / "harmful_requests.jsonl", split="test",
                                                 default_label="harmful")]
    thr = det.threshold_
    out: dict[str, Any] = {"threshold": thr}
    ev = evaluate_on_records(det, test, harmful=harmful)
    out["random_split"] = {k: ev[k] for k in ("overall", "hard_negatives", "harmful_requests",
                                              "length_slices") if k in ev}
    out["languages"] = language_table(det, sets["english_benign"] + sets["multilingual_benign"])
    # the other side of "no language as evidence": attacks in non-Latin scripts still caught
    from bastion.llm.datasets import script_of

    att = [r for r in test if r.y == 1]
    hit = det.score([r.text for r in att]) >= thr
    sc = [script_of(r.text) for r in att]
    out["attack_recall_by_script"] = {
        k: _rate(int(sum(h for h, x in zip(hit, sc, strict=True) if x == k)), sc.count(k))
        for k in sorted(set(sc))
    }
    import re

    cjk = [bool(re.search(r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]", r.text)) for r in att]
    out["attack_recall_by_script"]["with_cjk_characters"] = _rate(
        int(sum(h for h, c in zip(hit, cjk, strict=True) if c)), sum(cjk))
    trig = sets["trigger_benign"]
    s = det.score([r.text for r in trig])
    fl = s >= thr
    gen = np.array([bool(r.extra.get("generated")) for r in trig])
    by_lang: dict[str, Any] = {}
    for lang in sorted({r.lang or "en" for r in trig if r.extra.get("generated")}):
        m = np.array([bool(r.extra.get("generated")) and (r.lang or "en") == lang for r in trig])
        by_lang[lang] = _rate(int(fl[m].sum()), int(m.sum()))
    out["trigger_benign"] = {
        "all": _rate(int(fl.sum()), len(trig)),
        "real_hard_negatives": _rate(int(fl[~gen].sum()), int((~gen).sum())),
        "counterparts": _rate(int(fl[gen].sum()), int(gen.sum())),
        "counterparts_by_lang": by_lang,
    }
    ex = sets["extraction"]
    s = det.score([r.text for r in ex]) >= thr
    q = np.array([bool(r.extra.get("generated")) for r in ex])
    out["extraction_recall"] = {
        "all": _rate(int(s.sum()), len(ex)),
        "original": _rate(int(s[~q].sum()), int((~q).sum())),
        "quiet_variants": _rate(int(s[q].sum()), int(q.sum())),
        "missed": [r.text for r, hit in zip(ex, s, strict=True) if not hit][:20],
    }
    inj = sets["agent_injections"]
    s = det.score([r.text for r in inj]) >= thr
    pos = [r.subtype.split(":")[-1] if r.subtype.split(":")[-1] in ("start", "middle", "end",
                                                                   "field") else "other"
           for r in inj]
    bins = [(0, 500), (500, 1500), (1500, 3000), (3000, 10**9)]

    def lbin(n: int) -> str:
        for lo, hi in bins:
            if lo <= n < hi:
                return f"{lo}-{hi if hi < 10**9 else 'inf'}"
        return "?"

    doc: dict[str, Any] = {"all": _rate(int(s.sum()), len(inj)), "by_position": {},
                           "by_length": {}}
    for p in sorted(set(pos)):
        m = np.array([x == p for x in pos])
        doc["by_position"][p] = _rate(int(s[m].sum()), int(m.sum()))
    lb = [lbin(len(r.text)) for r in inj]
    for b in dict.fromkeys(lbin(lo) for lo, _ in bins):
        m = np.array([x == b for x in lb])
        if m.any():
            doc["by_length"][b] = _rate(int(s[m].sum()), int(m.sum()))
    ben = sets["agent_benign"]
    sb = det.score([r.text for r in ben]) >= thr
    doc["benign_flagged"] = _rate(int(sb.sum()), len(ben))
    lb = [lbin(len(r.text)) for r in ben]
    doc["benign_flagged_by_length"] = {
        b: _rate(int(sb[np.array([x == b for x in lb])].sum()), lb.count(b))
        for b in dict.fromkeys(lbin(lo) for lo, _ in bins) if b in lb
    }
    out["documents"] = doc
    out["feature_blocks_by_script"] = blocks_by_script(
        det, sets["english_benign"] + sets["multilingual_benign"])
    return out


def blocks_by_script(det: Any, benign: list[Any]) -> dict[str, Any]:
    """Mean logit share of each feature block on benign first chunks, per script: a block
    that keys on script gives non-Latin benign text a higher share than Latin text."""
    import numpy as np

    from bastion.llm.datasets import script_of

    chunks = [det.chunks(r.text)[0] for r in benign]
    parts = det.logit_parts(chunks)
    scripts = np.array([script_of(r.text) for r in benign])
    return {
        sc: {"n": int((scripts == sc).sum()),
             **{k: float(np.mean(v[scripts == sc])) for k, v in parts.items()}}
        for sc in sorted(set(scripts.tolist()))
    }


def wording_holdout(args: argparse.Namespace, emb: Any) -> dict[str, Any]:
    """Two folds over the agent data's attack wordings: train without the agent
    injections of one half of the wordings, test on them (recall at the threshold) and on
    the agent benign test rows."""
    import numpy as np

    from bastion.llm.datasets import attack_wording
    from bastion.llm.training import fit_calibrated, recipe_weight

    rows, params = _recipe(args)
    # the agent data's injections (an attack planted in a document of one of its hosts)
    agent = [r for r in rows if r.y == 1 and r.groups & AGENT_SOURCES
             and attack_wording(r.subtype)]
    words = sorted({attack_wording(r.subtype) for r in agent})
    halves = [words[0::2], words[1::2]]
    out: dict[str, Any] = {"wordings": halves, "folds": []}
    for held in halves:
        train = [r for r in rows if r.split in (None, "train")
                 and not (r.y == 1 and attack_wording(r.subtype) in held)]
        det = fit_calibrated(train, embedder=emb, weight=recipe_weight, **params)
        test = [r for r in agent if attack_wording(r.subtype) in held]
        s = det.score([r.text for r in test]) >= det.threshold_
        by = {}
        for w in held:
            m = np.array([attack_wording(r.subtype) == w for r in test])
            by[w] = _rate(int(s[m].sum()), int(m.sum()))
        out["folds"].append({"held_out": held, "recall": _rate(int(s.sum()), len(test)),
                             "by_wording": by})
        print(json.dumps(out["folds"][-1]["recall"]), flush=True)
    k = sum(f["recall"]["flagged"] for f in out["folds"])
    n = sum(f["recall"]["n"] for f in out["folds"])
    out["recall"] = _rate(k, n)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", choices=["v1", "v2"], default="v2")
    ap.add_argument("--blocks", default="char,word", help="n-gram blocks")
    ap.add_argument("--counterparts", type=int, default=2000)
    ap.add_argument("--dropout", action="store_true", help="trigger-word dropout copies")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--C", type=float, default=16.0, help="the head's inverse L2 strength")
    ap.add_argument("--emb-scale", type=float, default=2.0,
                    help="weight of the embedding beside the n-grams")
    ap.add_argument("--proto-scale", type=float, default=0.0,
                    help="weight of the two intent-prototype features (0: none)")
    ap.add_argument("--loso", choices=["all", "dev", "report", "none"], default="all")
    ap.add_argument("--sources", default=None, help="comma-separated LOSO sources")
    ap.add_argument("--folds", default=str(RESULTS / "llm_detector_folds"))
    ap.add_argument("--detector", default=None, help="'shipped' or a folder (skips training)")
    ap.add_argument("--train-out", default=None, help="save the recipe detector here")
    ap.add_argument("--no-eval", action="store_true", help="LOSO only")
    ap.add_argument("--doc-windows", type=int, default=None,
                    help="sentence windows (chars) for long texts in the evaluated detector")
    ap.add_argument("--ship", action="store_true",
                    help="write the evaluated detector into the package, with the LOSO "
                         "macro numbers in its metadata (needs --loso all)")
    ap.add_argument("--wording-holdout", action="store_true")
    ap.add_argument("--cache", default=None, help="embedding cache .npz")
    ap.add_argument("--out", default=str(RESULTS / "llm_detector.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import functools

    import bastion.llm.detector as _detmod
    from bastion._util import write_json_atomic

    # the normaliser is a pure function and costs ~6 ms a text: every fold re-chunks the
    # same 17k texts, so memoise it for this run (scores are unchanged)
    _detmod.normalize = functools.lru_cache(maxsize=None)(_detmod.normalize)
    from bastion.llm.detector import PromptInjectionDetector
    from bastion.llm.embed import Embedder, EmbeddingCache
    from bastion.llm.training import fit_calibrated, recipe_weight

    cache = EmbeddingCache(args.cache) if args.cache else None
    emb = Embedder(cache=cache)
    t0 = time.time()
    result: dict[str, Any] = {
        "benchmark": "llm_detector",
        "variant": _variant_name(args),
        "params": vars(args),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "dev_sources": list(DEV_SOURCES),
    }
    if args.loso != "none":
        result["loso"] = run_loso(args, emb)
        print(json.dumps(result["loso"]["macro"]), flush=True)
    if args.wording_holdout:
        result["wording_holdout"] = wording_holdout(args, emb)
    if not args.no_eval:
        if args.detector == "shipped":
            det = PromptInjectionDetector.load_default(embedder=emb)
        elif args.detector:
            det = PromptInjectionDetector.load(args.detector, embedder=emb)
        else:
            rows, params = _recipe(args)
            train = [r for r in rows if r.split in (None, "train")]
            det = fit_calibrated(train, embedder=emb, weight=recipe_weight, **params)
            det.meta_.update({"trained_on": f"recipe {_variant_name(args)} (split=train)"})
            if args.train_out:
                det.save(args.train_out)
        if args.doc_windows is not None:
            det.doc_windows = args.doc_windows
        result["detector"] = args.detector or _variant_name(args)
        result["doc_windows"] = det.doc_windows
        result.update(evaluate_one(det, args))
        if args.ship:
            if args.loso != "all" or args.sources:
                raise SystemExit("--ship needs the leave-one-source-out table: --loso all")
            m = result["loso"]["macro"]
            det.meta_.update({
                "recipe": _variant_name(args),
                "trained_on": "shared prompt-injection corpus + agent data + benign "
                              "multilingual (split=train) + generated rows (see NOTICE)",
                "loso_n_sources": m["n_sources"], "loso_macro_auroc": m["auroc"],
                "loso_macro_tpr": m["tpr"],
                "loso_worst_benign_flagged": m["worst_benign_flagged"],
                "test_auroc": result["random_split"]["overall"]["auroc"],
                "test_tpr_at_1pct_fpr": result["random_split"]["overall"]["tpr_at_1pct_fpr"],
            })
            det.save(SHIP)
            print(f"shipped the detector to {SHIP}")
    if cache is not None:
        cache.save()
    result["seconds"] = round(time.time() - t0, 1)
    write_json_atomic(args.out, result)
    brief = {k: result.get(k) for k in ("threshold",)}
    if "loso" in result:
        brief["loso_macro"] = result["loso"]["macro"]
    if "languages" in result:
        brief["worst_language"] = max(result["languages"]["by_lang"].items(),
                                      key=lambda kv: kv[1]["rate"])
        brief["trigger_benign"] = result["trigger_benign"]["all"]
        brief["extraction"] = result["extraction_recall"]["all"]
        brief["documents"] = result["documents"]["all"]
        brief["random_split"] = result["random_split"]["overall"]
    print(json.dumps(brief, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
