"""Issue 16: which survivors should the scan's escalation restart? (a dev measurement)

On MNIST test points 1000-1999 (never the benchmark's first 1,000), for each robust model
of ``bench_scan_robust.py``: APGD-CE (100 steps) first, then two independent Square-5000
runs (seeds 11 and 22, AutoAttack's schedule) on the points it left standing. For each
direction (A then B, B then A), the points the second run breaks and the first did not
are ranked by the margin the first run reached on them (closest first). The share of
survivors a restart must cover to find them sets ``presets.ESCALATION_SHARE``.

    BASTION_SHARED=/work/shared python benchmarks/scan_escalation_dev.py --model trades
    python benchmarks/scan_escalation_dev.py --combine
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from bench_scan_robust import robust_model
from common import CACHE, load_mnist, markdown_table, write_result

from bastion.attacks import get_attack

START, N, EPS, SHARES = 1000, 1000, 0.3, (0.1, 0.2, 0.3, 0.5)


def _raw(model: str):  # noqa: ANN202
    return CACHE / f"escalation_dev_{model}.json"


def measure(name: str) -> None:
    _, _, x_te, y_te = load_mnist()
    x, y = x_te[START:START + N], y_te[START:START + N]
    model, _ = robust_model(name)

    def margin(xa: np.ndarray, ya: np.ndarray) -> np.ndarray:
        p = np.asarray(model.predict_proba(xa))
        rows = np.arange(len(ya))
        t = p[rows, ya].copy()
        p[rows, ya] = -1
        return t - p.max(1)

    r = get_attack("apgd-ce", norm="linf", seed=0, steps=100).run(model, x, y, epsilons=[EPS])
    keep = ~np.asarray(r.success).reshape(-1).astype(bool)
    keep &= np.asarray(model.predict_proba(x)).argmax(1) == y
    idx = np.flatnonzero(keep)
    out: dict = {"model": name, "idx": idx.tolist()}
    for tag, seed in (("A", 11), ("B", 22)):
        c0 = time.process_time()
        sq = get_attack("square", norm="linf", seed=seed, max_queries=5000, p_init=0.8)
        rr = sq.run(model, x[idx], y[idx], epsilons=[EPS])
        xa = np.asarray(rr.x_adv).reshape(x[idx].shape)
        out[f"{tag}_succ"] = np.asarray(rr.success).reshape(-1).astype(int).tolist()
        out[f"{tag}_margin"] = margin(xa, y[idx]).tolist()
        out[f"{tag}_cpu_s"] = time.process_time() - c0
    _raw(name).write_text(json.dumps(out))
    print(f"{name}: {len(idx)} survivors of APGD-CE -> {_raw(name)}")


def combine(names: list[str]) -> None:
    rows, res = [], {}
    for m in names:
        d = json.loads(_raw(m).read_text())
        for a, b in (("A", "B"), ("B", "A")):
            sa, sb = np.array(d[f"{a}_succ"], bool), np.array(d[f"{b}_succ"], bool)
            ma = np.array(d[f"{a}_margin"])
            surv = np.flatnonzero(~sa)
            extra = sb[surv][np.argsort(ma[surv], kind="stable")]
            ranks = np.flatnonzero(extra) / max(len(surv), 1)
            caught = {str(s): int((ranks < s).sum()) for s in SHARES}
            res[f"{m} {a}->{b}"] = {"survivors": len(surv), "extra": int(extra.sum()),
                                    "rank_share_of_extra": ranks.round(4).tolist(),
                                    "caught_by_share": caught}
            rows.append([m, f"{a} then {b}", len(surv), int(extra.sum()),
                         *[caught[str(s)] for s in SHARES]])
    total = {str(s): sum(v["caught_by_share"][str(s)] for v in res.values()) for s in SHARES}
    n_extra = sum(v["extra"] for v in res.values())
    rows.append(["all", "", "", n_extra, *[total[str(s)] for s in SHARES]])
    table = markdown_table(["model", "runs", "survivors of the first", "broken only by the "
                            "second", *[f"closest {int(100 * s)}% catch" for s in SHARES]],
                           rows)
    print(table)
    print("->", write_result("scan_escalation_dev", {"points": [START, START + N], "eps": EPS,
                                                      "results": res, "table": table}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--models", default="fast-at-wong,pgd-at,trades")
    ap.add_argument("--combine", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.combine:
        combine([m for m in a.models.split(",") if m])
    else:
        measure(a.model)


if __name__ == "__main__":
    main()
