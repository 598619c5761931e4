"""Benchmark 2 of issue 3: TRADES and PGD adversarial training on MNIST, same network
(Wong et al.'s small CNN), Linf eps=0.3, with a stated budget.

    python benchmarks/harden_trades_pgd_mnist.py                  # 5 epochs, 10 steps
    python benchmarks/harden_trades_pgd_mnist.py --epochs 1 --train-limit 10000

Both start from the same fresh network and use Adam (lr 1e-3), batch 100, PGD step
2.5 * eps / steps; TRADES uses beta=1 (its MNIST setting). Evaluated on the first
``--n-eval`` test points: clean, PGD-50 (x ``--pgd-restarts``), Bastion's cascade.
"""

from __future__ import annotations

import argparse
import time

from harden_common import (
    cascade_accuracy,
    clean_accuracy,
    mnist,
    pgd_accuracy,
    start_model,
    write_result,
)

from bastion.defend import AdversarialTrainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--n-cascade", type=int, default=500)
    ap.add_argument("--pgd-restarts", type=int, default=1)
    ap.add_argument("--methods", default="pgd-at,trades")
    ap.add_argument("--init", choices=["pretrained", "scratch"], default="pretrained",
                    help="start from the undefended network (robust fine-tuning) or fresh")
    ap.add_argument("--eps-warmup", type=float, default=0.0,
                    help="epochs over which epsilon ramps linearly from 0")
    ap.add_argument("--lr-schedule", default=None,
                    help="the trainer's lr schedule (e.g. cyclic); default: the trainer's")
    ap.add_argument("--name", default="harden_trades_pgd_mnist",
                    help="results file name (without .json)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    ds = mnist(a.train_limit)
    x, y = ds.x_test[:a.n_eval], ds.y_test[:a.n_eval]
    rows = {}
    for method in a.methods.split(","):
        t0 = time.perf_counter()
        tr = AdversarialTrainer(method=method, eps=a.eps, steps=a.steps, epochs=a.epochs,
                                lr=a.lr, batch_size=a.batch_size, beta=a.beta, seed=a.seed,
                                eps_warmup=a.eps_warmup,
                                **({"lr_schedule": a.lr_schedule} if a.lr_schedule else {}))
        model = tr.fit(start_model(a.init, a.seed), ds, on_epoch=lambda e, m=method: print(
            f"{m} epoch {e.epoch}/{e.epochs} guard clean {e.clean_accuracy:.3f} robust "
            f"{e.robust_accuracy:.3f} ({e.time_s:.0f}s)", flush=True))
        train_s = time.perf_counter() - t0
        clean = clean_accuracy(model, ds.x_test, ds.y_test)
        pgd, pgd_s = pgd_accuracy(model, x, y, a.eps, steps=50, restarts=a.pgd_restarts)
        casc, casc_s = cascade_accuracy(model, ds.x_test[:a.n_cascade],
                                        ds.y_test[:a.n_cascade], [a.eps])
        rows[method] = {"clean_accuracy": clean, "pgd50_accuracy": pgd,
                        "cascade_accuracy": casc, "train_s": train_s, "pgd_eval_s": pgd_s,
                        "cascade_eval_s": casc_s,
                        "history": [vars(h) for h in tr.history_]}
        print(method, {k: v for k, v in rows[method].items() if k != "history"}, flush=True)
    path = write_result(a.name, {
        "settings": vars(a), "n_train": len(ds.x_train), "n_eval": len(x), "results": rows})
    print(path)


if __name__ == "__main__":
    main()
