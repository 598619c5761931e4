"""Benchmark 1 (issue 4): BadNets on MNIST, detection, sanitising and retraining.

For each poison rate: attack success rate (ASR) and clean-accuracy cost of a BadNets
backdoor (3x3 white patch, bottom-right, target 0); detection recall/precision at a 5%
removal budget for Bastion's spectral signatures, activation clustering and STRIP on the
training set (and the peer library's ActivationDefence / SpectralSignatureDefense when it
is installed, on the same data and the same trained model), each with its wall time; then
ASR and clean accuracy after removing what STRIP (the audit's default with a model)
flags and retraining. When the poison rate exceeds the removal budget, the budget cannot
hold every poison, so the retraining is also run at a budget of 1.5x the poison rate.
STRIP is also run on the unpoisoned set with the clean model, and the number of samples
above the fixed threshold ``--strip-threshold`` is reported for every set (threshold mode
of the sanitiser: how much it removes on clean data).

Goal from the issue: at 5% poison, >= 95% of poisons found while removing <= 5% of the
data, and ASR < 5% after retraining.

    .venv/bin/python benchmarks/audit_badnets.py                      # the full run
    .venv/bin/python benchmarks/audit_badnets.py --n-train 10000 --epochs 2 --rates 0.05
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bastion.attacks.poisoning import BadNets, attack_success_rate
from bastion.attacks.privacy._training import train_torch, zoo_model
from bastion.data import load_data
from bastion.detect.poison import (
    ActivationClusteringDetector,
    SpectralSignatureDetector,
    StripPoisonDetector,
)

HERE = Path(__file__).resolve().parent


def _acc(m, x, y) -> float:
    return float((m.predict_proba(x).argmax(1) == y).mean())


def _rp(flag: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    return {"recall": float(mask[flag].sum() / max(mask.sum(), 1)),
            "precision": float(mask[flag].mean()) if flag.any() else 0.0,
            "removed_share": float(flag.mean())}


def _top(scores: np.ndarray, budget: float) -> np.ndarray:
    flag = np.zeros(len(scores), bool)
    flag[np.argsort(-scores, kind="stable")[: int(budget * len(scores))]] = True
    return flag


def _peer(model, x, y, rate: float) -> dict[str, object]:
    """The peer library's two defences on the same model and data (if installed)."""
    out: dict[str, object] = {}
    try:
        from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense
        from art.estimators.classification import PyTorchClassifier
    except Exception as exc:  # not installed
        return {"error": f"peer library not importable: {exc}"}

    class Seq(torch.nn.Module):  # expose body/head as two layers for get_activations
        def __init__(self, m):
            super().__init__()
            self.body, self.head = m.module.body, m.module.head

        def forward(self, t):
            return self.head(self.body(t))

    clf = PyTorchClassifier(model=Seq(model), loss=torch.nn.CrossEntropyLoss(),
                            input_shape=tuple(x.shape[1:]), nb_classes=10, clip_values=(0, 1))
    y1 = np.eye(10)[y]
    for name, fn in (
        ("peer ActivationDefence (PCA, 10 dims)", lambda: ActivationDefence(clf, x, y1)
         .detect_poison(nb_clusters=2, nb_dims=10, reduce="PCA")),
        ("peer SpectralSignatureDefense", lambda: SpectralSignatureDefense(
            clf, x, y1, batch_size=256, eps_multiplier=1.5, expected_pp_poison=rate)
         .detect_poison()),
    ):
        t = time.perf_counter()
        try:
            _, is_clean = fn()
            flag = np.asarray(is_clean) == 0
            out[name] = {**_rp(flag, POISON), "time_s": time.perf_counter() - t}
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


POISON = np.zeros(0, bool)


def main() -> None:
    global POISON
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnist", default=str(HERE.parent.parent / "shared/datasets/mnist/mnist.npz"))
    ap.add_argument("--n-train", type=int, default=60000)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rates", default="0.01,0.05,0.1")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--sanitise-budgets", default=None,
                    help="removal budgets for the retraining step (default: --budget)")
    ap.add_argument("--second-pass", type=float, default=0.0,
                    help="after sanitising and retraining, detect again on the kept data "
                    "with the retrained model and remove this share more (0: off)")
    ap.add_argument("--strip-threshold", type=float, default=-0.05,
                    help="fixed STRIP score threshold (minus the mean entropy) to report")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "audit_badnets.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_data(f"mnist:{a.mnist}")
    rng = np.random.default_rng(a.seed)
    i = rng.permutation(len(ds.x_train))[: a.n_train]
    x, y = ds.x_train[i], ds.y_train[i]
    xt, yt = ds.x_test[: a.n_test], ds.y_test[: a.n_test]

    def train(xx, yy):
        m = zoo_model((1, 28, 28), 10, seed=a.seed)
        return train_torch(m, xx, yy, epochs=a.epochs, lr=1e-3, batch_size=128, seed=a.seed)

    t = time.perf_counter()
    clean = train(x, y)
    res: dict[str, object] = {
        "config": vars(a), "clean_accuracy": _acc(clean, xt, yt),
        "clean_train_time_s": time.perf_counter() - t, "rates": {}}
    print("clean accuracy", res["clean_accuracy"], flush=True)
    t = time.perf_counter()
    s_clean = StripPoisonDetector(model=clean, seed=a.seed).fit_score(x, y)
    res["strip_on_unpoisoned_data"] = {
        "time_s": time.perf_counter() - t, "threshold": a.strip_threshold,
        "flagged_at_threshold": int((s_clean > a.strip_threshold).sum()),
        "flagged_share_at_threshold": float((s_clean > a.strip_threshold).mean())}
    print("strip on clean data", res["strip_on_unpoisoned_data"], flush=True)
    for rate in [float(r) for r in a.rates.split(",")]:
        bd = BadNets(target=0, rate=rate, patch_size=3, seed=a.seed)
        pr = bd.poison(x, y, n_classes=10)
        POISON = pr.poison_mask
        m = train(pr.x, pr.y)
        row: dict[str, object] = {"n_poison": pr.n_poison, "clean_accuracy": _acc(m, xt, yt),
                                  "asr": attack_success_rate(m, bd, xt, yt)}
        row["clean_accuracy_cost"] = res["clean_accuracy"] - row["clean_accuracy"]
        print(rate, row, flush=True)
        det_rows: dict[str, object] = {}
        flags = {}
        for name, det in (("bastion spectral signatures", SpectralSignatureDetector(model=m)),
                          ("bastion activation clustering (PCA)",
                           ActivationClusteringDetector(model=m, seed=a.seed)),
                          ("bastion STRIP on the training set",
                           StripPoisonDetector(model=m, seed=a.seed))):
            t = time.perf_counter()
            s = det.fit_score(pr.x, pr.y)
            flag = _top(s, a.budget)
            flags[name] = s
            det_rows[name] = {**_rp(flag, pr.poison_mask), "time_s": time.perf_counter() - t}
            if isinstance(det, StripPoisonDetector):
                thr = s > a.strip_threshold
                det_rows[name]["at_threshold"] = {"threshold": a.strip_threshold,
                                                  **_rp(thr, pr.poison_mask)}
            print(" ", name, det_rows[name], flush=True)
        if not a.no_peer:
            det_rows.update(_peer(m, pr.x, pr.y, rate))
            print("  peer", {k: v for k, v in det_rows.items() if k.startswith("peer")},
                  flush=True)
        row["detection_at_budget"] = det_rows
        san_name = "bastion STRIP on the training set"
        san_scores = flags[san_name]
        budgets = ([a.budget] if a.sanitise_budgets is None
                   else [float(b) for b in a.sanitise_budgets.split(",")])
        if rate > max(budgets):
            budgets.append(round(1.5 * rate, 4))
        after = []
        for b in budgets:
            keep = ~_top(san_scores, b)
            m2 = train(pr.x[keep], pr.y[keep])
            after.append({"detector": san_name,
                          "removal_budget": b, "removed": int((~keep).sum()),
                          "poisons_left": int(pr.poison_mask[keep].sum()),
                          "clean_accuracy": _acc(m2, xt, yt),
                          "asr": attack_success_rate(m2, bd, xt, yt)})
            print("  after", after[-1], flush=True)
            if a.second_pass > 0:
                xk, yk, pk = pr.x[keep], pr.y[keep], pr.poison_mask[keep]
                s2 = ActivationClusteringDetector(model=m2, seed=a.seed).fit_score(xk, yk)
                flag2 = np.zeros(len(yk), bool)
                flag2[np.argsort(-s2, kind="stable")[: int(a.second_pass * len(pr.y))]] = True
                m3 = train(xk[~flag2], yk[~flag2])
                after.append({"detector": "second pass: activation clustering on the "
                              "retrained model", "removal_budget": b + a.second_pass,
                              "removed": int((~keep).sum() + flag2.sum()),
                              "poisons_left": int(pk[~flag2].sum()),
                              "clean_accuracy": _acc(m3, xt, yt),
                              "asr": attack_success_rate(m3, bd, xt, yt)})
                print("  after second pass", after[-1], flush=True)
        row["after_sanitising"] = after
        res["rates"][str(rate)] = row  # type: ignore[index]
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
