"""Issue 15, section 1: feedback campaigns against the self-healing retrain, through the
real HTTP service (uvicorn on 127.0.0.1, one fresh service and event store per cell).

Every cell: honest clients send drifted traffic (a natural drift, true labels) through
``/v1/predict`` and ``/v1/feedback`` so that the accuracy monitor asks for a retrain; a
poisoner sends a share of the feedback (1, 5, 10 or 30%) as a campaign, from one client
id or spread over ten; then one healing step runs (what ``serve --heal-interval`` runs),
with the shipped :class:`~bastion.runtime.retrain.RetrainConfig` defaults. Campaigns:

- ``patch2-br-7``, ``patch3-tl-0``, ``patch1-bl-3``: BadNets patches (size, corner,
  target class) on digits of other classes, all labelled with the target;
- ``blend-5``: a fixed random full-image pattern blended at 20%, labelled 5;
- ``flip-1to8``: digits of class 1 labelled 8 (a targeted label flip).

Plus ten benign campaigns (different natural drifts, true labels only, four clients).

Per cell: promoted / refused / no retrain, the failed gates, what screening removed and
the caps left out, the champion's attack success afterwards (triggered holdout digits of
other classes classified as the target; for the flip, holdout 1s classified as 8) and
its clean and drifted accuracy on the digits test split.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/healing_poisoning.py [--quick] [--seed 100]

Thresholds were tuned on other seeds (0-9, the tests' and a scratch script's scenarios);
the cells here use seeds ``--seed`` + cell index.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

N_FEEDBACK = 400
RATES = (0.01, 0.05, 0.10, 0.30)


# ------------------------------------------------------------------ campaigns
def _patch(size: int, corner: str):
    def f(x: np.ndarray) -> np.ndarray:
        x = x.copy()
        r = slice(0, size) if corner[0] == "t" else slice(8 - size, 8)
        c = slice(0, size) if corner[1] == "l" else slice(8 - size, 8)
        x[..., r, c] = 1.0
        return x
    return f


_BLEND = np.random.default_rng(12345).random((1, 8, 8)).astype(np.float32)


def _blend(x: np.ndarray) -> np.ndarray:
    return (0.8 * x + 0.2 * _BLEND).astype(np.float32)


CAMPAIGNS: dict[str, dict[str, Any]] = {
    "patch2-br-7": {"trigger": _patch(2, "br"), "target": 7},
    "patch3-tl-0": {"trigger": _patch(3, "tl"), "target": 0},
    "patch1-bl-3": {"trigger": _patch(1, "bl"), "target": 3},
    "blend-5": {"trigger": _blend, "target": 5},
    "flip-1to8": {"trigger": None, "source": 1, "target": 8},
}


def shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    o = np.roll(x, (dy, dx), axis=(-2, -1))
    if dy > 0:
        o[..., :dy, :] = 0
    elif dy < 0:
        o[..., dy:, :] = 0
    if dx > 0:
        o[..., :dx] = 0
    elif dx < 0:
        o[..., dx:] = 0
    return o


def _blur(x: np.ndarray) -> np.ndarray:
    from scipy.ndimage import uniform_filter

    return np.clip(uniform_filter(x, size=(1, 1, 3, 3)), 0, 1).astype(np.float32)


def _thick(x: np.ndarray) -> np.ndarray:
    from scipy.ndimage import maximum_filter

    return maximum_filter(x, size=(1, 1, 2, 2)).astype(np.float32)


BENIGN: dict[str, Any] = {
    "shift+1+1": lambda x: shift(x, 1, 1), "shift+0+1": lambda x: shift(x, 0, 1),
    "shift+1+0": lambda x: shift(x, 1, 0), "shift-1+0": lambda x: shift(x, -1, 0),
    "shift+0-1": lambda x: shift(x, 0, -1), "shift-1-1": lambda x: shift(x, -1, -1),
    "shift+1-1": lambda x: shift(x, 1, -1), "shift-1+1": lambda x: shift(x, -1, 1),
    "thicker": _thick, "blur3": _blur,
}


# ------------------------------------------------------------------ one cell
def attack_success(model: Any, ds: Any, camp: dict[str, Any]) -> float:
    y = ds.y_test
    if camp["trigger"] is None:
        src = ds.x_test[y == camp["source"]]
        return float((model.predict_proba(src).argmax(1) == camp["target"]).mean())
    keep = y != camp["target"]
    x = camp["trigger"](ds.x_test[keep])
    return float((model.predict_proba(x).argmax(1) == camp["target"]).mean())


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float((model.predict_proba(x).argmax(1) == y).mean())


def send(c: Any, x: np.ndarray, labels: np.ndarray, client: str) -> None:
    """Predict and label as ``client``, with that client's own API key: the service
    credits feedback to the key, as in production."""
    key = {"Authorization": f"Bearer {c.keys[client]}"}
    for i in range(0, len(x), 50):
        r = c.post("/v1/predict", json={"inputs": x[i:i + 50].tolist()}, headers=key)
        r.raise_for_status()
        fb = [{"request_id": rid, "label": int(t)}
              for rid, t in zip(r.json()["request_ids"], labels[i:i + 50], strict=True)]
        c.post("/v1/feedback", json={"feedback": fb}, headers=key).raise_for_status()


def run_cell(name: str, *, model_dir: Path, mlflow: str, work: Path, ds: Any, seed: int,
             campaign: str | None, rate: float, spread: str, drift: str,
             gates_only: bool = False) -> dict[str, Any]:
    import httpx

    from bastion.registry.models import ModelRegistry
    from bastion.runtime.healing import HealingPolicy, MonitorSettings, Rule
    from bastion.service.app import create_app
    from bastion.service.config import ServiceConfig
    from bastion.service.server import ServiceThread

    rng = np.random.default_rng(seed)
    policy = HealingPolicy(
        rules=[Rule(monitor="accuracy", actions=["alert", "retrain"]),
               Rule(monitor="input_drift", actions=["alert"]),
               Rule(monitor="client_alert_rate", actions=["alert", "quarantine_client"])],
        monitors=MonitorSettings(mmd=False))
    policy.retrain.seed = seed
    if gates_only:  # no screening, no cap: the backdoor gates alone
        policy.retrain.sanitize = False
        policy.retrain.max_client_share = 1.0
    cfg = ServiceConfig.build(model=str(model_dir), reference="builtin:digits",
                              model_name=name, events_url=f"sqlite:///{work / name}.db",
                              tracking_uri=mlflow, reference_limit=600,
                              reload_interval_s=0.0, heal_interval_s=0.0, healing=policy,
                              seed=0)  # the champion's train/test split
    t0 = time.perf_counter()
    n_poison = int(round(rate * N_FEEDBACK)) if campaign else 0
    n_honest = N_FEEDBACK - n_poison
    from bastion.web.keys import KeyStore

    # every key before the app is built, so its key table starts with them (a key
    # created while it runs is found by a re-read the service allows at most once a
    # second for unknown keys: creating several in a row gave 401s)
    names = [*(f"user-{k}" for k in range(4)), "mallory", *(f"sybil-{k}" for k in range(10))]
    with KeyStore(cfg.events_url) as ks:
        keys = {n: ks.create(n, "client")[0] for n in names}
        admin = ks.create("bench-operator", "admin")[0]
    app = create_app(cfg)
    svc = app.state.service
    reg = ModelRegistry(name, tracking_uri=mlflow)
    champion0 = reg.load("champion")
    with ServiceThread(app) as st, httpx.Client(
            base_url=st.url, timeout=300, headers={"Authorization": f"Bearer {admin}"}) as c:
        c.keys = keys
        # honest clients: a natural drift with true labels
        dfn = BENIGN[drift]
        i = rng.choice(len(ds.x_train), n_honest, replace=False)
        honest = [f"user-{k}" for k in range(4)]
        for k, part in enumerate(np.array_split(i, len(honest))):
            send(c, dfn(ds.x_train[part]), ds.y_train[part], honest[k])
        poisoners: list[str] = []
        if campaign:
            camp = CAMPAIGNS[campaign]
            if camp["trigger"] is None:
                pool = np.flatnonzero(ds.y_train == camp["source"])
                j = rng.choice(pool, n_poison, replace=len(pool) < n_poison)
                xp = ds.x_train[j]
            else:
                pool = np.flatnonzero(ds.y_train != camp["target"])
                j = rng.choice(pool, n_poison, replace=False)
                xp = camp["trigger"](ds.x_train[j])
            yp = np.full(n_poison, camp["target"])
            poisoners = ["mallory"] if spread == "one" else [f"sybil-{k}" for k in range(10)]
            order = rng.permutation(n_poison)
            for k, part in enumerate(np.array_split(order, len(poisoners))):
                if len(part):
                    send(c, xp[part], yp[part], poisoners[k])
        t_send = time.perf_counter() - t0
        rep = svc.heal_once()
        audits = c.get("/v1/events", params={"kind": "audit", "limit": 500}).json()["events"]
        quarantined = c.get("/v1/health").json()["quarantined_clients"]
    rt = [e["payload"] for e in audits if e["payload"]["action"] == "retrain"]
    outcome, failed, removed, capped, decision = "no retrain", [], None, None, ""
    if rt:
        p = rt[-1]
        decision = p["decision"]
        ev = p["evidence"]
        if p["done"]:
            outcome = "promoted"
        elif "refused" in decision:
            outcome = "refused"
        elif "crashed" in decision:
            outcome = "crashed"
        else:
            outcome = "deferred"
        failed = [g["name"] for g in ev.get("gates", []) if not g["passed"]]
        r = ev.get("retrain") or {}
        removed, capped = r.get("n_removed"), r.get("n_capped")
    champ = reg.load("champion")
    out: dict[str, Any] = {
        "cell": name, "campaign": campaign or "benign", "rate": rate if campaign else 0.0,
        "spread": spread if campaign else "-", "drift": drift, "seed": seed,
        "n_poison": n_poison, "outcome": outcome, "failed_gates": failed,
        "screened_out": removed, "capped": capped, "decision": decision[:400],
        "poisoners_quarantined": [q for q in quarantined if q in poisoners],
        "honest_quarantined": [q for q in quarantined if q not in poisoners],
        "champion_version": reg.get_alias("champion"),
        "clean_accuracy_before": accuracy(champion0, ds.x_test, ds.y_test),
        "clean_accuracy_after": accuracy(champ, ds.x_test, ds.y_test),
        "drift_accuracy_before": accuracy(champion0, BENIGN[drift](ds.x_test), ds.y_test),
        "drift_accuracy_after": accuracy(champ, BENIGN[drift](ds.x_test), ds.y_test),
        "time_send_s": round(t_send, 1), "time_heal_s": round(rep.time_s, 1),
    }
    if campaign:
        out["attack_success_before"] = attack_success(champion0, ds, CAMPAIGNS[campaign])
        out["attack_success_after"] = attack_success(champ, ds, CAMPAIGNS[campaign])
    return out


def champion_folder(out: Path) -> Path:
    """The digits CNN the service starts from (zoo ``cnn``, 12 epochs, seed 0)."""
    import torch

    from bastion.data import load_data
    from bastion.models.persist import save_model
    from bastion.models.torch_model import TorchModel
    from bastion.models.train import train_classifier
    from bastion.models.zoo import build_module

    ds = load_data("builtin:digits", seed=0)
    torch.manual_seed(0)
    m = TorchModel(build_module("cnn", input_shape=(1, 8, 8), n_classes=10), n_classes=10,
                   input_shape=(1, 8, 8), name="digits-cnn")
    train_classifier(m, ds.x_train, ds.y_train, epochs=12, lr=3e-3, batch_size=64, seed=0)
    return save_model(m, out / "champion", arch="cnn")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true",
                    help="a subset: 3 campaigns at 10%% and 30%%, 3 benign drifts")
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--only", default=None, help="run cells whose name contains this")
    ap.add_argument("--gates-only", action="store_true",
                    help="screening and caps off: what the backdoor gates stop alone "
                         "(writes healing_poisoning_gates_only.json)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from common import markdown_table, write_result

    from bastion.data import load_data

    ds = load_data("builtin:digits", seed=0)
    work = Path(tempfile.mkdtemp(prefix="bench-heal-poison-"))
    model_dir = champion_folder(work)
    mlflow = f"sqlite:///{work / 'mlflow.db'}"
    cells: list[dict[str, Any]] = []
    camps = list(CAMPAIGNS)
    rates: tuple[float, ...] = RATES
    benign = list(BENIGN)
    if args.quick:
        camps, rates, benign = ["patch2-br-7", "blend-5", "flip-1to8"], (0.10, 0.30), benign[:3]
    drifts = list(BENIGN)
    k = 0
    for camp in camps:
        for rate in rates:
            for spread in ("one", "many"):
                cells.append({"campaign": camp, "rate": rate, "spread": spread,
                              "drift": drifts[k % 3], "name": f"{camp}-{int(rate * 100)}-{spread}"})
                k += 1
    for d in benign:
        cells.append({"campaign": None, "rate": 0.0, "spread": "-", "drift": d,
                      "name": f"benign-{d}"})
    rows = []
    t0 = time.perf_counter()
    for i, cell in enumerate(cells):
        if args.only and args.only not in cell["name"]:
            continue
        name = cell.pop("name")
        safe = "b" + "".join(ch if ch.isalnum() else "-" for ch in name)
        r = run_cell(safe, model_dir=model_dir, mlflow=mlflow, work=work, ds=ds,
                     seed=args.seed + i, gates_only=args.gates_only, **cell)
        r["cell"] = name
        rows.append(r)
        print(f"[{time.perf_counter() - t0:6.0f}s] {name:24s} {r['outcome']:10s} "
              f"asr {r.get('attack_success_after', float('nan')):.3f} "
              f"clean {r['clean_accuracy_after']:.3f} drift {r['drift_accuracy_before']:.2f}->"
              f"{r['drift_accuracy_after']:.2f} failed {r['failed_gates']} "
              f"removed {r['screened_out']} capped {r['capped']} q {r['poisoners_quarantined']}",
              flush=True)
    attacks = [r for r in rows if r["campaign"] != "benign"]
    benign_rows = [r for r in rows if r["campaign"] == "benign"]
    worst = max((r["attack_success_after"] for r in attacks), default=None)
    retrained = [r for r in benign_rows if r["outcome"] != "no retrain"]
    promoted = sum(r["outcome"] == "promoted" for r in benign_rows)
    summary = {
        "campaign_cells": len(attacks),
        "max_attack_success_after": worst,
        "cells_above_5pct": [r["cell"] for r in attacks if r["attack_success_after"] > 0.05],
        "attack_cells_promoted": sum(r["outcome"] == "promoted" for r in attacks),
        "attack_cells_refused": sum(r["outcome"] == "refused" for r in attacks),
        "benign_cells": len(benign_rows), "benign_retrained": len(retrained),
        "benign_promoted": promoted,
        "goal_attack_success_max": 0.05, "goal_benign_promoted_of_10": 9,
        "goal_met": bool(worst is not None and worst <= 0.05 and promoted >= 0.9 * len(
            benign_rows)) if rows else False,
        "time_s": round(time.perf_counter() - t0, 1),
    }
    path = write_result("healing_poisoning" + ("_gates_only" if args.gates_only else ""), {
        "settings": {"quick": args.quick, "seed": args.seed, "n_feedback": N_FEEDBACK,
                     "rates": list(rates), "only": args.only, "gates_only": args.gates_only},
        "summary": summary, "cells": rows})
    print(markdown_table(
        ["cell", "outcome", "failed gates", "screened out", "capped", "ASR after",
         "clean acc", "drift acc before -> after"],
        [[r["cell"], r["outcome"], ",".join(r["failed_gates"]) or "-", r["screened_out"],
          r["capped"], f"{r['attack_success_after']:.1%}" if "attack_success_after" in r
          else "-", f"{r['clean_accuracy_after']:.1%}",
          f"{r['drift_accuracy_before']:.1%} -> {r['drift_accuracy_after']:.1%}"]
         for r in rows]))
    print(summary)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
