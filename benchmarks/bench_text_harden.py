"""Adversarial data augmentation of the CLINC150 intent router: attack success and clean
accuracy before and after (``bastion.defend.text_augment``).

    .venv/bin/python benchmarks/bench_text_harden.py --model ROUTER_DIR [--n-train 400] [--n 150]

Attacks ``--n-train`` seeded training texts (word and character level, half each), refits
the head on the training set plus the successful adversarial texts (true labels), then
measures clean accuracy on the whole test split and word/char attack success on ``--n``
seeded test texts, for the router before and after. Writes
``benchmarks/results/text_harden.json``.
Goal (issue 20): the attack success rate halves at a clean-accuracy cost of at most 1 point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from bastion.data import load_data  # noqa: E402
from bastion.defend.text_augment import augment_text_model, evaluate_text_robustness  # noqa: E402
from bastion.models import resolve_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--max-queries", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(common.THREADS)
    ds = load_data(f"clinc150:{common.SHARED}/datasets/clinc150/data_full.json")
    model = resolve_model(args.model)
    hardened, info = augment_text_model(model, ds.x_train, ds.y_train, n_attack=args.n_train,
                                        max_queries=args.max_queries, seed=0)
    print({k: v for k, v in info.items() if k != "adversarial"}, flush=True)
    pick = np.sort(np.random.default_rng(1).choice(len(ds.x_test), args.n, replace=False))
    texts, labels = [str(t) for t in ds.x_test[pick]], ds.y_test[pick]
    all_texts = [str(t) for t in ds.x_test]
    out = {}
    for name, m in (("before", model), ("after", hardened)):
        r = evaluate_text_robustness(m, texts, labels, max_queries=args.max_queries, seed=1)
        r["clean_accuracy_full_test"] = float(
            (m.predict_proba(all_texts).argmax(1) == ds.y_test).mean())
        out[name] = r
        print(name, r, flush=True)
    b, a = out["before"], out["after"]
    goals = {"clean_cost_points": round(100 * (b["clean_accuracy_full_test"]
                                              - a["clean_accuracy_full_test"]), 2)}
    for atk in ("word", "char"):
        goals[f"{atk}_success_ratio"] = round(a[atk]["success_rate"]
                                              / max(b[atk]["success_rate"], 1e-9), 3)
        goals[f"{atk}_halved"] = goals[f"{atk}_success_ratio"] <= 0.5
    goals["clean_cost_at_most_1_point"] = goals["clean_cost_points"] <= 1.0
    info.pop("adversarial")
    common.write_result("text_harden", {
        "settings": {"model": args.model, "n_train_attacked": args.n_train, "n_eval": args.n,
                     "max_queries": args.max_queries, "constraints": "defaults (MiniLM "
                     "similarity >= 0.8, <= 25% of words, stop words/entities kept)",
                     "torch_threads": torch.get_num_threads()},
        "augmentation": info, "before": b, "after": a, "goals": goals})
    print("goals:", goals)


if __name__ == "__main__":
    main()
