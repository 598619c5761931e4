"""Benchmark 3 (issue 4): model extraction and the query-stream detector.

1. Equation solving on a breast-cancer logistic regression with d + 1 = 31 queries
   (expected fidelity 1.0), also under output hardening.
2. A Knockoff-style surrogate of an MNIST CNN at query budgets (default 1k, 5k, 20k):
   natural queries from MNIST training images the victim did not see; fidelity and
   accuracy on the test set.
3. The PRADA-style detector: detection delay (queries until the alarm) on synthetic
   JbDA-like streams (``--attack-streams`` seed sets) and on the natural Knockoff stream,
   and false alarms on ``--benign-streams`` benign natural streams (test images), with
   delta fixed at 0.9 (testing from 50 distances) and with delta calibrated on
   ``--calib-streams`` *separate* benign streams (unused training images) to the
   false-alarm rate ``--target-fpr``, testing from ``--min-queries`` distances.
   ``--prada-only`` skips parts 1 and 2 (the victim is then only used for its labels).

    .venv/bin/python benchmarks/audit_extraction.py
    .venv/bin/python benchmarks/audit_extraction.py --budgets 1000,5000 --victim-train 10000
    .venv/bin/python benchmarks/audit_extraction.py --prada-only --victim-train 10000 \
        --victim-epochs 2 --benign-streams 20 --calib-streams 20 \
        --out benchmarks/results/audit_extraction_prada.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bastion.attacks.extraction import EquationSolving, KnockoffExtraction
from bastion.attacks.privacy._training import train_torch, zoo_model
from bastion.audit.core import synthetic_stream
from bastion.data import load_data
from bastion.defend.output_hardening import RoundedOutput, TopKOutput
from bastion.detect.extraction import PradaDetector
from bastion.models.query import QueryBudget

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnist", default=str(HERE.parent.parent / "shared/datasets/mnist/mnist.npz"))
    ap.add_argument("--budgets", default="1000,5000,20000")
    ap.add_argument("--victim-train", type=int, default=30000)
    ap.add_argument("--victim-epochs", type=int, default=3)
    ap.add_argument("--surrogate-epochs", type=int, default=10)
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--stream", type=int, default=1000)
    ap.add_argument("--benign-streams", type=int, default=10)
    ap.add_argument("--calib-streams", type=int, default=20)
    ap.add_argument("--attack-streams", type=int, default=5)
    ap.add_argument("--target-fpr", type=float, default=0.05)
    ap.add_argument("--min-queries", type=int, default=100)
    ap.add_argument("--prada-only", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "audit_extraction.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    res: dict[str, object] = {"config": vars(a)}

    ds = load_data(f"mnist:{a.mnist}")
    vic = _victim(a, ds)
    res["victim"] = {"accuracy": float((vic[0].predict_proba(ds.x_test[: a.n_test]).argmax(1)
                                        == ds.y_test[: a.n_test]).mean()),
                     "train_time_s": vic[4]}
    print("victim", res["victim"], flush=True)
    if not a.prada_only:
        _parts_1_2(a, res, ds, vic)
    _prada(a, res, ds, vic)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print("wrote", a.out)


def _victim(a, ds):
    rng = np.random.default_rng(a.seed)
    perm = rng.permutation(len(ds.x_train))
    vi, pool = perm[: a.victim_train], perm[a.victim_train :]
    t = time.perf_counter()
    victim = train_torch(zoo_model((1, 28, 28), 10, seed=a.seed), ds.x_train[vi], ds.y_train[vi],
                         epochs=a.victim_epochs, lr=1e-3, batch_size=128, seed=a.seed)
    return victim, vi, pool, rng, time.perf_counter() - t


def _parts_1_2(a, res, ds, vic) -> None:
    # 1. equation solving
    from sklearn.linear_model import LogisticRegression

    from bastion.models import SklearnModel

    bc = load_data("builtin:breast-cancer", seed=a.seed)
    lr = SklearnModel(LogisticRegression(max_iter=5000).fit(bc.x_train, bc.y_train),
                      n_classes=2, input_shape=(30,))
    eq = {}
    center = bc.x_train.mean(0)
    for name, victim in (("full confidences", lr), ("rounded to 4 decimals",
                                                    RoundedOutput(lr, decimals=4)),
                         ("rounded to 2 decimals", RoundedOutput(lr, decimals=2)),
                         ("top-1 only", TopKOutput(lr, k=1))):
        try:
            r = EquationSolving(center=center, seed=a.seed).run(
                QueryBudget(victim, max_queries=31), x_eval=bc.x_test, y_eval=bc.y_test,
                reference=lr)
            eq[name] = {"queries": r.queries, "fidelity": r.fidelity, "accuracy": r.accuracy}
        except Exception as exc:
            eq[name] = {"error": str(exc)}
    res["equation_solving_breast_cancer_logreg"] = eq
    print(json.dumps(eq), flush=True)

    # 2. surrogate of an MNIST CNN
    victim, _, pool = vic[0], vic[1], vic[2]
    xt, yt = ds.x_test[: a.n_test], ds.y_test[: a.n_test]
    budgets = [int(b) for b in a.budgets.split(",")]
    t = time.perf_counter()
    ko = KnockoffExtraction(budget=max(budgets), checkpoints=budgets,
                            epochs=a.surrogate_epochs, lr=1e-3, batch_size=128, seed=a.seed)
    kr = ko.run(QueryBudget(victim, max_queries=max(budgets)), ds.x_train[pool], x_eval=xt,
                y_eval=yt, reference=victim)
    res["surrogate_mnist_cnn"] = {"curve": kr.curve, "time_s": time.perf_counter() - t}
    print(json.dumps(res["surrogate_mnist_cnn"]), flush=True)


def _prada(a, res, ds, vic) -> None:
    victim, _, pool = vic[0], vic[1], vic[2]
    rng = np.random.default_rng(a.seed + 1)
    xt = ds.x_test
    n = a.stream

    def labels(q):
        return victim.predict_proba(q).argmax(1)

    # calibration streams: training images neither the victim nor the evaluation used
    cal_pool = pool[: len(pool) // 2]
    calib = [ds.x_train[cal_pool[rng.permutation(len(cal_pool))[:n]]]
             for _ in range(a.calib_streams)]
    t = time.perf_counter()
    cal = PradaDetector(min_queries=a.min_queries)
    cal_delta = cal.calibrate(calib, [labels(q) for q in calib], fpr=a.target_fpr, margin=0.0)
    cal_time = time.perf_counter() - t
    benign = [xt[rng.permutation(len(xt))[:n]] for _ in range(a.benign_streams)]
    atk_pool = pool[len(pool) // 2 :]
    attacks = {f"synthetic JbDA-like (100 seeds, set {j})": synthetic_stream(
                   ds.x_train[atk_pool][100 * j : 100 * (j + 1)], n, bounds=(0.0, 1.0),
                   seed=a.seed + j) for j in range(a.attack_streams)}
    attacks["knockoff natural"] = ds.x_train[atk_pool][rng.permutation(len(atk_pool))[:n]]
    prada: dict[str, object] = {"calibration": {
        "streams": a.calib_streams, "target_false_alarm_rate": a.target_fpr,
        "min_queries": a.min_queries, "delta": cal_delta, "time_s": cal_time}}
    for dname, delta, mq in (("delta=0.9, min_queries=50", 0.9, 50),
                             (f"calibrated delta={cal_delta:.3f}, min_queries={a.min_queries}",
                              cal_delta, a.min_queries)):
        row: dict[str, object] = {}
        delays = []
        for sname, q in attacks.items():
            d = PradaDetector(delta=delta, min_queries=mq).run(q, labels(q))
            row[sname] = {"detected": d.drift_detected, "queries_until_alarm": d.detected_at_}
            if sname.startswith("synthetic"):
                delays.append(d.detected_at_)
        fa = [PradaDetector(delta=delta, min_queries=mq).run(q, labels(q)).drift_detected
              for q in benign]
        row["synthetic_detected"] = f"{sum(x is not None for x in delays)}/{len(delays)}"
        found = [x for x in delays if x is not None]
        row["synthetic_median_delay"] = float(np.median(found)) if found else None
        row["benign_false_alarms"] = f"{sum(fa)}/{len(fa)}"
        prada[dname] = row
        print(dname, json.dumps(row), flush=True)
    mins = np.array([PradaDetector(min_queries=a.min_queries).min_w(q, labels(q))
                     for q in benign])
    prada["benign_min_W"] = {"min": float(np.min(mins)), "median": float(np.median(mins)),
                             "max": float(np.max(mins)), "all": mins.tolist()}
    # the trade-off: for each delta, false alarms on the benign streams (their lowest W
    # from min_queries on) and the synthetic streams' detection delay (first W < delta)
    paths = {}
    for sname, q in attacks.items():
        det = PradaDetector(min_queries=a.min_queries)
        w = []
        for x_, lab in zip(q, labels(q), strict=True):
            det.update(x_, int(lab))
            w.append(det.w_ if len(det.distances_) >= a.min_queries else 1.0)
        paths[sname] = np.array(w)
    sweep = {}
    for delta in (0.85, 0.86, 0.87, 0.88, 0.89, 0.9, 0.91, 0.92, 0.93):
        delays = [int(np.argmax(w < delta)) + 1 if (w < delta).any() else None
                  for n_, w in paths.items() if n_.startswith("synthetic")]
        found = [x for x in delays if x is not None]
        sweep[str(delta)] = {
            "benign_false_alarms": f"{int((mins < delta).sum())}/{len(mins)}",
            "synthetic_detected": f"{len(found)}/{len(delays)}",
            "synthetic_delays": delays,
            "knockoff_detected": bool((paths["knockoff natural"] < delta).any())}
    prada[f"delta_sweep (min_queries={a.min_queries})"] = sweep
    # calibration without any allowed false alarm: margin under the calibration streams' lowest W
    cal_mins = np.array([cal.min_w(q, labels(q)) for q in calib])
    strict = float(cal_mins.min() - 0.01)
    delays = [int(np.argmax(w < strict)) + 1 if (w < strict).any() else None
              for n_, w in paths.items() if n_.startswith("synthetic")]
    prada["calibration_fpr0_margin0.01"] = {
        "calibration_min_W": cal_mins.tolist(), "delta": strict,
        "benign_false_alarms": f"{int((mins < strict).sum())}/{len(mins)}",
        "synthetic_detected": f"{sum(x is not None for x in delays)}/{len(delays)}",
        "synthetic_delays": delays}
    print(json.dumps(prada["calibration_fpr0_margin0.01"]), flush=True)
    print(json.dumps(sweep), flush=True)
    res["prada"] = prada

if __name__ == "__main__":
    main()
