"""``bastion audit data`` without a budget (issue 15): the verdict and what is removed on
every row of clean and label-flipped data, no model given.

For each dataset (digits, breast-cancer, wine: every row; MNIST: the first 3000 training
images) and flip rate (0, 5%, 10%; a flipped label is moved to a random other class):
whether the verdict says abnormal, how many rows the detectors' own rules flag (and so
remove), and their recall/precision against the known flips.

    .venv/bin/python benchmarks/audit_data_verdict.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from bastion.audit.core import audit_data
from bastion.data.dataset import Dataset

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("BASTION_SHARED", HERE.parent.parent / "shared"))


def _sets(with_mnist: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn import datasets as skd

    d = skd.load_digits()
    out = {"digits": ((d.images / 16.0).reshape(len(d.target), -1), d.target)}
    for name, fn in (("breast-cancer", skd.load_breast_cancer), ("wine", skd.load_wine)):
        b = fn()
        x = (b.data - b.data.min(0)) / (b.data.max(0) - b.data.min(0))
        out[name] = (x, b.target)
    mnist = SHARED / "datasets" / "mnist" / "mnist.npz"
    if with_mnist and mnist.exists():
        with np.load(mnist) as z:
            out["mnist-3k"] = (z["x_train"][:3000].reshape(3000, -1) / 255.0,
                               z["y_train"][:3000])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="0,0.05,0.1")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-mnist", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "audit_data_verdict.json"))
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for name, (x, y) in _sets(not a.no_mnist).items():
        k = int(y.max()) + 1
        for rate in [float(r) for r in a.rates.split(",")]:
            rng = np.random.default_rng(a.seed)
            yy, truth = y.copy(), np.zeros(len(y), bool)
            idx = rng.choice(len(y), int(rate * len(y)), replace=False)
            yy[idx] = (y[idx] + rng.integers(1, k, len(idx))) % k
            truth[idx] = True
            ds = Dataset(name=name, x_train=x.astype(np.float32), y_train=yy,
                         x_test=x[:10].astype(np.float32), y_test=y[:10], n_classes=k,
                         kind="tabular")
            t = time.perf_counter()
            rep, _, res = audit_data(ds, seed=a.seed)
            f = res.flagged
            rows.append({
                "dataset": name, "rows": len(y), "flip_rate": rate, "abnormal": rep.abnormal,
                "flagged": int(f.sum()), "flagged_share": float(f.mean()),
                "recall": float((f & truth).sum() / truth.sum()) if truth.any() else None,
                "precision": float((f & truth).sum() / max(f.sum(), 1)) if truth.any()
                else None,
                "time_s": round(time.perf_counter() - t, 2), "verdict": rep.verdict})
            print(json.dumps(rows[-1]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"config": vars(a), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
