"""Benchmark 1 of issue 3: fast adversarial training on MNIST (Wong, Rice & Kolter 2020).

Wong et al.'s small CNN, Linf eps=0.3, FGSM from a uniform random start with step
alpha=0.375, Adam with a cyclic learning rate peaking at 5e-3, batch 100, 10 epochs, the
catastrophic-overfitting guard on. Published anchor for this network: 98.50% clean,
88.38% under PGD-50 with 10 restarts. Goal: >= 98.5% clean, >= 89% under PGD-50x10,
>= 86% under Bastion's cascade, in under 45 minutes of wall time on 2 CPU cores.

    python benchmarks/harden_fast_at_mnist.py                      # as specified
    python benchmarks/harden_fast_at_mnist.py --epochs 3 --n-pgd 500 --n-cascade 200
    python benchmarks/harden_fast_at_mnist.py --variant nfgsm       # N-FGSM (de Jorge 2022)

``--variant nfgsm`` uses N-FGSM's inner step (random start of ``--noise-mult`` x eps,
default 2; step eps unless ``--alpha`` is given; no projection back onto the eps-ball).
``--ema-decay D`` evaluates a weight average of the trained network (EMA, as in Gowal et al.
2020). ``--train-eps`` trains at another budget than the one evaluated (``--eps``).
Set ``BENCH_THREADS=2`` to use both cores; the JSON records ``os.getloadavg()`` at the
start and the end (other load on the machine inflates the wall time).

``--n-pgd`` / ``--n-cascade`` bound the evaluation points (the full test set is 10,000).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from harden_common import (
    cascade_accuracy,
    clean_accuracy,
    fresh_wong_cnn,
    mnist,
    pgd_accuracy,
    write_result,
)

from bastion.defend import AdversarialTrainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--alpha", type=float, default=None,
                    help="step size (default 0.375 for rs, eps for nfgsm)")
    ap.add_argument("--variant", choices=["rs", "nfgsm"], default="rs")
    ap.add_argument("--noise-mult", type=float, default=None)
    ap.add_argument("--eps-warmup", type=float, default=0.0)
    ap.add_argument("--train-eps", type=float, default=None)
    ap.add_argument("--ema-decay", type=float, default=0.0,
                    help="weight averaging (0 = off); the averaged model is evaluated")
    ap.add_argument("--guard-drop", type=float, default=0.2,
                    help="a collapse is guard PGD accuracy falling more than this below "
                    "the best epoch's")
    ap.add_argument("--on-collapse", choices=["recover", "stop"], default="recover",
                    help="at a collapse: restore the best epoch and go on with a safer step "
                    "(the default since issue 21), or stop there (rows 1-1g ran with stop)")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--n-pgd", type=int, default=10000)
    ap.add_argument("--pgd-restarts", type=int, default=10)
    ap.add_argument("--n-cascade", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="harden_fast_at_mnist")
    ap.add_argument("--save", default=None,
                    help="also save the trained model to this folder (a Bastion model)")
    a = ap.parse_args()

    load_start = os.getloadavg()
    t_wall = time.perf_counter()
    ds = mnist(a.train_limit)
    train_eps = a.eps if a.train_eps is None else a.train_eps
    alpha = a.alpha if a.alpha is not None else (
        1.25 * train_eps if a.variant == "rs" else train_eps)
    tr = AdversarialTrainer(method="fast-at", eps=train_eps, step_size=alpha,
                            epochs=a.epochs, lr=a.lr, lr_schedule="cyclic",
                            batch_size=a.batch_size, optimizer="adam", guard=True,
                            fast_variant=a.variant, noise_mult=a.noise_mult,
                            eps_warmup=a.eps_warmup, guard_drop=a.guard_drop,
                            ema_decay=a.ema_decay, on_collapse=a.on_collapse,
                            seed=a.seed)
    model = tr.fit(fresh_wong_cnn(a.seed), ds, on_epoch=lambda e: print(
        f"epoch {e.epoch}/{e.epochs} loss {e.loss:.3f} guard clean {e.clean_accuracy:.3f} "
        f"robust {e.robust_accuracy:.3f} ({e.time_s:.0f}s)", flush=True))
    train_s = time.perf_counter() - t_wall
    if a.save:
        from bastion.models.persist import save_model

        save_model(model, a.save, arch="wong-cnn")
    clean = clean_accuracy(model, ds.x_test, ds.y_test)
    print(f"clean {clean:.4f}; train {train_s:.0f}s", flush=True)
    xp, yp = ds.x_test[:a.n_pgd], ds.y_test[:a.n_pgd]
    pgd, pgd_s = pgd_accuracy(model, xp, yp, a.eps, steps=50, restarts=a.pgd_restarts)
    print(f"PGD-50x{a.pgd_restarts} on {len(xp)}: {pgd:.4f} ({pgd_s:.0f}s)", flush=True)
    xc, yc = ds.x_test[:a.n_cascade], ds.y_test[:a.n_cascade]
    casc, casc_s = cascade_accuracy(model, xc, yc, [a.eps])
    print(f"cascade on {len(xc)}: {casc} ({casc_s:.0f}s)", flush=True)
    wall = time.perf_counter() - t_wall
    path = write_result(a.name, {
        "settings": vars(a), "n_train": len(ds.x_train),
        "clean_accuracy": clean, "pgd50_accuracy": pgd, "pgd_points": len(xp),
        "pgd_restarts": a.pgd_restarts, "cascade_accuracy": casc,
        "cascade_points": len(xc), "train_s": train_s, "pgd_eval_s": pgd_s,
        "cascade_eval_s": casc_s, "wall_s": wall, "stopped_early": tr.stopped_early_,
        "best_epoch": tr.best_epoch_, "trainer_settings": tr.settings(),
        "recoveries": tr.recoveries_, "ended_on_best": tr.ended_on_best_,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
        "history": [vars(h) for h in tr.history_],
        "anchor": {"clean": 0.985, "pgd50x10": 0.8838, "source": "Wong et al. 2020"},
        "goal": {"clean": 0.985, "pgd50x10": 0.89, "cascade": 0.86, "wall_s": 45 * 60},
    })
    print(f"wall {wall:.0f}s -> {path}")


if __name__ == "__main__":
    main()
