"""Bastion's worst-case scan against torchattacks' AutoAttack (standard version) on the
same MNIST CNN and the same first 1000 test points, L-inf, in one process.

    .venv/bin/python benchmarks/bench_scan.py [--n 1000] [--eps 0.3 0.1]

The issue's goal: robust accuracy no higher than AutoAttack's (+0.5 points at most) in at
most 60% of its time. Both run on the undefended ``wong-cnn`` from ``common.py``; at
eps = 0.3 an undefended network falls completely, so eps = 0.1 is the informative budget.
Writes ``benchmarks/results/scan.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from bastion.evaluate import scan  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.3, 0.1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="standard", help="the scan's preset (issue 16)")
    args = ap.parse_args()
    model, x, y = common.setup(args.n)
    clean = common.accuracy(model, x, y)
    runs = []
    for eps in args.eps:
        t0 = time.perf_counter()
        report = scan(model, x, y, norm="linf", epsilons=[eps], seed=args.seed,
                      sanity_checks=False, preset=args.preset)
        t_bastion = time.perf_counter() - t0
        ra_bastion = report.robust_accuracy_at(eps)

        import torchattacks

        aa = torchattacks.AutoAttack(model.module, norm="Linf", eps=eps, version="standard",
                                     n_classes=10, seed=args.seed)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        t0 = time.perf_counter()
        x_adv = torch.cat([aa(xt[i : i + 250], yt[i : i + 250]) for i in range(0, len(xt), 250)])
        x_adv = x_adv.detach()
        t_aa = time.perf_counter() - t0
        ra_aa = common.accuracy(model, x_adv, y)
        linf = float((x_adv.detach() - xt).abs().flatten(1).max(1).values.max())
        goals = {
            "robust_accuracy_within_0.5pt": bool(ra_bastion <= ra_aa + 0.005),
            "time_at_most_60pct": bool(t_bastion <= 0.6 * t_aa),
        }
        runs.append({
            "eps": eps,
            "bastion_scan": {"time_s": t_bastion, "robust_accuracy": ra_bastion,
                             "cascade": [a.name for a in report.per_attack],
                             "per_stage_robust_accuracy": [
                                 a.robust_accuracy_after for a in report.per_attack]},
            "torchattacks_autoattack": {"time_s": t_aa, "robust_accuracy": ra_aa,
                                        "max_linf": linf},
            "time_ratio_bastion_over_autoattack": t_bastion / t_aa,
            "goals": goals,
        })
        rows = [["Bastion scan (APGD-CE, APGD-T, Square)", ra_bastion, t_bastion, 1.0],
                ["torchattacks AutoAttack (standard)", ra_aa, t_aa, t_aa / t_bastion]]
        print(f"\nLinf eps={eps}, {len(x)} MNIST test points, wong-cnn (clean {clean:.3f})")
        print(common.markdown_table(["", "robust accuracy", "time (s)",
                                     "time / Bastion's"], rows))
        print("goals:", goals)
    path = common.write_result("scan", {
        "settings": {"n_points": len(x), "norm": "linf", "epsilons": args.eps,
                     "seed": args.seed, "model": "wong-cnn", "clean_accuracy": clean,
                     "torch_threads": torch.get_num_threads(),
                     "bastion": "default white-box cascade, default attack settings",
                     "autoattack": "torchattacks 3.5.1 AutoAttack(version='standard')"},
        "runs": runs,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
