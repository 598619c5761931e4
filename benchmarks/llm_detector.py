"""Benchmark 1: detector quality on the held-out split of the shared prompt corpus.

    .venv/bin/python benchmarks/llm_detector.py [--detector DIR] [--cache FILE]

Scores the detector (default: the one shipped in the package) on every ``split=test`` row
of ``$BASTION_SHARED/datasets/prompt-injection/prompts.jsonl`` and on the plain harmful
requests (their ``split=test`` rows; the train rows are training negatives), and writes
``benchmarks/results/llm_detector.json``: AUROC, F1, TPR at 1% FPR (overall, on hard
negatives versus attacks, on length-matched slices, by subtype) and the false-positive
rate on harmful requests. Goals (issue 6): AUROC >= 0.99 and TPR >= 90% at 1% FPR.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BASTION_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "datasets" / "prompt-injection"
RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", default=None, help="detector folder (default: shipped)")
    ap.add_argument("--cache", default=None, help="embedding cache .npz")
    ap.add_argument("--out", default=str(RESULTS / "llm_detector.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bastion._util import write_json_atomic
    from bastion.llm.datasets import load_prompt_jsonl
    from bastion.llm.detector import PromptInjectionDetector
    from bastion.llm.embed import Embedder, EmbeddingCache
    from bastion.llm.training import evaluate_on_records

    cache = EmbeddingCache(args.cache) if args.cache else None
    emb = Embedder(cache=cache)
    det = (
        PromptInjectionDetector.load(args.detector, embedder=emb)
        if args.detector
        else PromptInjectionDetector.load_default(embedder=emb)
    )
    test = load_prompt_jsonl(DATA / "prompts.jsonl", split="test")
    # only the test split of the harmful requests: the shipped detector saw the train split
    # as negatives during training
    harmful = [
        r.text
        for r in load_prompt_jsonl(
            DATA / "harmful_requests.jsonl", split="test", default_label="harmful"
        )
    ]
    t0 = time.time()
    ev = evaluate_on_records(det, test, harmful=harmful)
    # per attack label (injection vs jailbreak), each against all benign rows
    import numpy as np
    from sklearn.metrics import roc_auc_score

    s = det.score([r.text for r in test])
    labels = np.array([r.label for r in test])
    ben = labels == "benign"
    by_label = {}
    for lab in ("injection", "jailbreak"):
        m = labels == lab
        if m.any():
            yy = np.r_[np.ones(m.sum()), np.zeros(ben.sum())]
            by_label[lab] = {
                "n": int(m.sum()),
                "auroc_vs_benign": float(roc_auc_score(yy, np.r_[s[m], s[ben]])),
                "recall_at_threshold": float(np.mean(s[m] >= det.threshold_)),
            }
    ev["by_label"] = by_label
    if cache is not None:
        cache.save()
    o = ev["overall"]
    result = {
        "benchmark": "llm_detector",
        "detector": args.detector or "shipped",
        "data": "prompts.jsonl split=test; harmful_requests.jsonl split=test",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "seconds": round(time.time() - t0, 1),
        "goals": {"auroc": 0.99, "tpr_at_1pct_fpr": 0.90},
        "goals_met": {"auroc": o["auroc"] >= 0.99, "tpr_at_1pct_fpr": o["tpr_at_1pct_fpr"] >= 0.90},
        **ev,
    }
    write_json_atomic(args.out, result)
    hn = ev.get("hard_negatives", {})
    print(
        json.dumps(
            {
                "auroc": o["auroc"],
                "f1": o["f1"],
                "tpr_at_1pct_fpr": o["tpr_at_1pct_fpr"],
                "fpr_at_threshold": o["fpr"],
                "hard_negative_fpr": hn.get("fpr"),
                "hard_negative_auroc": hn.get("vs_attacks", {}).get("auroc"),
                "harmful_flagged": ev.get("harmful_requests", {}).get("flagged_rate"),
                "by_label": by_label,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
