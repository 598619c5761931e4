"""Adversarial data augmentation of the CLINC150 intent router: attack success and clean
accuracy before and after (``bastion.defend.text_augment``).

    .venv/bin/python benchmarks/bench_text_harden.py --model ROUTER_DIR [--n 150]
        [--split test|val] [--opt KEY=VALUE ...] [--save DIR | --hardened DIR]

Hardens the router with ``augment_text_model`` (its defaults: the top encoder layer and
the head fine-tuned for 3 epochs on all training texts plus two fresh random neighbour
swaps of each every epoch; ``--opt`` overrides, e.g. ``--opt n_attack=1000 --opt
rounds=2`` adds rounds of adversarial texts found by attacking the current model,
``--opt tune_layers=0 --opt n_attack=1000`` the head-only refit),
or evaluates a router already hardened that way (``--hardened DIR``, e.g. the folder
``--save`` wrote: hardening reads only the training split, so one hardened model serves
the validation run that chose the settings and the test run). Then measures clean
accuracy on the whole split and the word, char and hotflip attacks' success on ``--n``
seeded texts of it, each attack run against the model it evaluates (before: the router,
after: the hardened router; adaptive, never transferred). ``--split val`` is CLINC's
validation split (for choosing settings); the reported numbers use ``test``.
Writes ``benchmarks/results/text_harden.json`` (``--name`` changes the name).
Goal (issue 20): the attack success rate halves at a clean-accuracy cost of at most 1 point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from bastion.defend.text_augment import augment_text_model, evaluate_text_robustness  # noqa: E402
from bastion.models import resolve_model  # noqa: E402
from bastion.models.text import save_text_model  # noqa: E402

ATTACKS = ("word", "char", "hotflip")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--split", choices=("test", "val"), default="test")
    ap.add_argument("--eval-queries", type=int, default=300)
    ap.add_argument("--opt", action="append", default=[], help="augment option KEY=VALUE")
    ap.add_argument("--save", default=None, help="write the hardened router here")
    ap.add_argument("--hardened", default=None, help="evaluate this hardened router")
    ap.add_argument("--name", default="text_harden")
    args = ap.parse_args()
    torch.set_num_threads(common.THREADS)
    path = common.CLINC
    ds = common.clinc()
    if args.split == "test":
        ex, ey = ds.x_test, np.asarray(ds.y_test)
    else:  # CLINC's validation split, mapped to the loader's label ids
        doc = json.loads(path.read_text())
        index = {n: i for i, n in enumerate(ds.class_names)}
        pairs = doc["val"] + doc["oos_val"]
        ex = np.array([q for q, _ in pairs], dtype=object)
        ey = np.array([index[i] for _, i in pairs], dtype=np.int64)
    model = resolve_model(args.model)
    opts = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.opt)}
    if args.hardened:
        hardened = resolve_model(args.hardened)
        meta = json.loads((Path(args.hardened) / "bastion-text-model.json").read_text())
        info = meta.get("hardened", {})
    else:
        hardened, info = augment_text_model(
            model, ds.x_train, ds.y_train, seed=0, **opts,
            log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
        info.pop("adversarial")
        if args.save:
            save_text_model(hardened, args.save, extra={"hardened": {"options": opts, **info}})
    print({k: v for k, v in info.items() if k != "adversarial"}, flush=True)
    pick = np.sort(np.random.default_rng(1).choice(len(ex), args.n, replace=False))
    texts, labels = [str(t) for t in ex[pick]], ey[pick]
    all_texts = [str(t) for t in ex]
    out = {}
    for name, m in (("before", model), ("after", hardened)):
        t0 = time.process_time()
        r = evaluate_text_robustness(m, texts, labels, attacks=ATTACKS,
                                     max_queries=args.eval_queries, seed=1)
        r["clean_accuracy_full_split"] = float((m.predict_proba(all_texts).argmax(1)
                                                == ey).mean())
        r["cpu_seconds"] = round(time.process_time() - t0, 1)
        out[name] = r
        print(name, r, flush=True)
    b, a = out["before"], out["after"]
    goals = {"clean_cost_points": round(100 * (b["clean_accuracy_full_split"]
                                              - a["clean_accuracy_full_split"]), 2)}
    for atk in ATTACKS:
        goals[f"{atk}_success_ratio"] = round(a[atk]["success_rate"]
                                              / max(b[atk]["success_rate"], 1e-9), 3)
        goals[f"{atk}_halved"] = goals[f"{atk}_success_ratio"] <= 0.5
    goals["clean_cost_at_most_1_point"] = goals["clean_cost_points"] <= 1.0
    goals["met"] = goals["clean_cost_at_most_1_point"] and all(
        goals[f"{atk}_halved"] for atk in ATTACKS)
    common.write_result(args.name, {
        "settings": {"model": args.model, "split": args.split, "n_eval": args.n,
                     "n_split": len(ex), "eval_max_queries": args.eval_queries,
                     "augment_options": opts or "defaults", "hardened": args.hardened,
                     "constraints": "defaults (MiniLM similarity >= 0.8, <= 25% of words, "
                     "stop words/entities kept)", "torch_threads": torch.get_num_threads()},
        "augmentation": info, "before": b, "after": a, "goals": goals})
    print("goals:", goals)


if __name__ == "__main__":
    main()
