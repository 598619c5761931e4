"""Benchmark 2: adversarial training of the detector, before and after.

    .venv/bin/python benchmarks/llm_harden.py [--rounds 3] [--variants 300] \
        [--eval-variants 300] [--cache FILE] [--ship]

Trains the detector on the ``split=train`` rows of the shared corpus (a fifth of the benign
rows held back for threshold calibration at 1% FPR; injections weighted
``--injection-weight``; the ``split=train`` plain harmful requests added as negatives with
weight ``--harmful-weight``, their ``split=test`` rows only evaluated), then runs the
hardening loop: fresh obfuscated/mutated variants of the *held-out* attacks measure
evasion each round, evading variants of the *training* attacks are added and the detector
retrained. Evasion is the share of fresh variants missed among those made from held-out
attacks the detector catches in plain form; the share of all variants missed is written
beside it. Writes ``benchmarks/results/llm_harden.json`` with per-round evasion, TPR and
hard-negative FPR, and the full held-out evaluation before and after. ``--ship`` writes
the final detector into the package (``bastion/llm/data/detector``; note: since issue 17
the shipped detector comes from ``llm_detector.py --recipe v2 ... --ship``, which this
script's recipe, the corpus alone, does not reproduce). Goal (issue 6):
evasion under 5% after, with the hard-negative FPR no worse than before.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BASTION_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "datasets" / "prompt-injection"
RESULTS = ROOT / "benchmarks" / "results"
SHIP = ROOT / "src" / "bastion" / "llm" / "data" / "detector"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", type=int, default=300)
    ap.add_argument("--eval-variants", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="embedding cache .npz")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "llm_harden_rounds"))
    ap.add_argument("--ship", action="store_true")
    ap.add_argument(
        "--injection-weight", type=float, default=4.0, help="sample weight of injection rows"
    )
    ap.add_argument(
        "--harmful-weight",
        type=float,
        default=0.3,
        help="sample weight of the plain harmful requests (split=train) added as negatives",
    )
    ap.add_argument(
        "--benign-counterparts",
        action="store_true",
        help="add a benign counterpart (same operations on benign text) per evading variant",
    )
    ap.add_argument("--out", default=str(RESULTS / "llm_harden.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bastion._util import write_json_atomic
    from bastion.llm.datasets import load_prompt_jsonl
    from bastion.llm.embed import Embedder, EmbeddingCache
    from bastion.llm.harden import harden_detector, prepare_harden_data
    from bastion.llm.training import evaluate_on_records

    cache = EmbeddingCache(args.cache) if args.cache else None
    emb = Embedder(cache=cache)
    d = prepare_harden_data(DATA / "prompts.jsonl", seed=args.seed)
    test = load_prompt_jsonl(DATA / "prompts.jsonl", split="test")
    injections = {
        r.text for r in load_prompt_jsonl(DATA / "prompts.jsonl") if r.label == "injection"
    }
    harm_rows = load_prompt_jsonl(DATA / "harmful_requests.jsonl", default_label="harmful")
    # plain harmful requests: the train split is a negative class in training, the test
    # split is only ever evaluated ("harmful topic" is not "attack")
    harmful_train = [r.text for r in harm_rows if r.split == "train"]
    harmful = [r.text for r in harm_rows if r.split == "test"]
    train_texts = list(d["train_texts"]) + harmful_train
    train_y = list(d["train_y"]) + [0] * len(harmful_train)
    train_w = [args.injection_weight if t in injections else 1.0 for t in d["train_texts"]] + [
        args.harmful_weight
    ] * len(harmful_train)
    t0 = time.time()
    evals = {}

    def on_round(rec, det):  # evaluate the first and every round on the full held-out split
        ev = evaluate_on_records(det, test, harmful=harmful)
        evals[rec.round] = {
            "overall": ev["overall"],
            "hard_negatives": ev.get("hard_negatives"),
            "harmful_requests": ev.get("harmful_requests"),
            "length_slices": ev["length_slices"],
        }
        print(
            f"round {rec.round}: evasion {rec.evasion_rate:.3f} "
            f"(all variants missed {rec.variant_miss_rate:.3f}) TPR {rec.tpr_heldout:.3f} "
            f"hardneg FPR {rec.fpr_hard_negatives:.3f} AUROC {ev['overall']['auroc']:.4f} "
            f"TPR@1%FPR {ev['overall']['tpr_at_1pct_fpr']:.3f} (+{rec.n_added} attacks, "
            f"+{rec.n_added_benign} benign) "
            f"[{time.time() - t0:.0f}s]",
            flush=True,
        )
        if cache is not None:
            cache.save()
        return None

    res = harden_detector(
        train_texts=train_texts,
        train_y=train_y,
        train_weights=train_w,
        heldout_attacks=d["heldout_attacks"],
        hard_negatives=d["hard_negatives"],
        calibration_benign=d["calibration_benign"],
        rounds=args.rounds,
        variants_per_round=args.variants,
        eval_variants=args.eval_variants,
        embedder=emb,
        seed=args.seed,
        out_dir=args.work,
        on_round=on_round,
        benign_counterparts=args.benign_counterparts,
    )
    if cache is not None:
        cache.save()
    rounds = res.to_dict()["rounds"]
    first, last = rounds[0], rounds[-1]
    result = {
        "benchmark": "llm_harden",
        "params": vars(args),
        "seconds": round(time.time() - t0, 1),
        "n_train": len(train_texts),
        "n_harmful_train_negatives": len(harmful_train),
        "n_harmful_eval": len(harmful),
        "n_heldout_attacks": len(d["heldout_attacks"]),
        "n_hard_negatives": len(d["hard_negatives"]),
        "rounds": rounds,
        "heldout_eval_by_round": evals,
        "before_after": {
            "evasion_rate": [first["evasion_rate"], last["evasion_rate"]],
            "variant_miss_rate": [first["variant_miss_rate"], last["variant_miss_rate"]],
            "fpr_hard_negatives": [first["fpr_hard_negatives"], last["fpr_hard_negatives"]],
            "tpr_heldout": [first["tpr_heldout"], last["tpr_heldout"]],
        },
        "goals_met": {
            "evasion_below_5pct": last["evasion_rate"] < 0.05,
            "hard_negative_fpr_not_worse": last["fpr_hard_negatives"]
            <= first["fpr_hard_negatives"],
        },
    }
    write_json_atomic(args.out, result)
    if args.ship and res.detector is not None:
        res.detector.meta_.update(
            {
                "trained_on": "shared prompt-injection corpus, split=train (+ hardening variants)",
                "hardening_rounds": args.rounds,
                "test_auroc": evals[last["round"]]["overall"]["auroc"],
                "test_tpr_at_1pct_fpr": evals[last["round"]]["overall"]["tpr_at_1pct_fpr"],
            }
        )
        res.detector.save(SHIP)
        print(f"shipped the final detector to {SHIP}")
    print(json.dumps(result["before_after"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
