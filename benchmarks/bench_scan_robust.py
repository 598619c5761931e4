"""Issue 16: the scan's presets against AutoAttack (standard) on robust MNIST models.

Robust ``wong-cnn`` models are trained with Bastion itself (``AdversarialTrainer``) at
L-inf 0.3 on MNIST and cached under ``benchmarks/.cache/`` (gitignored, so no weights are
committed):

- ``fast-at-wong``: fast adversarial training exactly as Wong et al.'s MNIST script
  (FGSM from a random start, step 0.375 = 1.25 eps, 10 epochs, cyclic lr up to 5e-3, no
  guard and no early stop), the recipe that masks gradients like the public model;
- ``fast-at``: the same with 5 epochs and Bastion's catastrophic-overfitting guard (masks
  little);
- ``pgd-at``: Madry's PGD adversarial training (5 steps, warm-up of epsilon);
- ``trades``: TRADES (beta 1, 5 steps).

Then, in one process and on the same first ``--n`` test points, it runs torchattacks'
``AutoAttack(version="standard")`` and ``bastion.evaluate.scan`` with each preset, and
writes ``benchmarks/results/scan_robust.json``.

    BASTION_SHARED=/work/shared python benchmarks/bench_scan_robust.py --train-only
    BASTION_SHARED=/work/shared python benchmarks/bench_scan_robust.py --n 1000
    # or one process per part (model x {aa, quick, standard}), then:
    BASTION_SHARED=/work/shared python benchmarks/bench_scan_robust.py --part aa --models pgd-at
    BASTION_SHARED=/work/shared python benchmarks/bench_scan_robust.py --combine

torchattacks is installed with ``pip install --no-deps torchattacks==3.5.1`` (see the
``bench`` extra in pyproject.toml).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
import torch
from common import CACHE, THREADS, load_mnist, markdown_table, wong_cnn, write_result
from safetensors.torch import load_file, save_file

from bastion.data.dataset import Dataset
from bastion.models.torch_model import TorchModel

EPS = 0.3

#: the training recipes (AdversarialTrainer options); kept short for a shared 2-core box
RECIPES: dict[str, dict[str, Any]] = {
    "fast-at": {"method": "fast-at", "eps": EPS, "step_size": 0.375, "epochs": 5,
                "lr": 5e-3, "lr_schedule": "cyclic", "batch_size": 100, "guard": True,
                "train_limit": None},
    # Wong et al.'s MNIST script as published (train_mnist.py defaults): FGSM-RS, step
    # 1.25 eps, 10 epochs, cyclic lr up to 5e-3, batch 100, no guard and no early stop
    "fast-at-wong": {"method": "fast-at", "eps": EPS, "step_size": 0.375, "epochs": 10,
                     "lr": 5e-3, "lr_schedule": "cyclic", "batch_size": 100, "guard": False,
                     "train_limit": None},
    "pgd-at": {"method": "pgd-at", "eps": EPS, "steps": 5, "epochs": 4, "lr": 5e-3,
               "lr_schedule": "cyclic", "batch_size": 100, "eps_warmup": 1.0,
               "train_limit": 30000},
    "trades": {"method": "trades", "eps": EPS, "steps": 5, "beta": 1.0, "epochs": 4,
               "lr": 5e-3, "lr_schedule": "cyclic", "batch_size": 100, "eps_warmup": 1.0,
               "train_limit": 30000},
}


def wrap(net: torch.nn.Module, name: str) -> TorchModel:
    for p in net.parameters():
        p.requires_grad_(False)
    return TorchModel(net.eval(), n_classes=10, input_shape=(1, 28, 28), bounds=(0.0, 1.0),
                      name=name)


def robust_model(name: str, seed: int = 0) -> tuple[TorchModel, dict[str, Any]]:
    """The cached robust model ``name`` (trained on first use) and its training note."""
    from bastion.defend import AdversarialTrainer

    weights, note = CACHE / f"robust_{name}.safetensors", CACHE / f"robust_{name}.json"
    if weights.exists() and note.exists():
        net = wong_cnn()
        net.load_state_dict(load_file(str(weights)))
        return wrap(net, name), json.loads(note.read_text())
    recipe = dict(RECIPES[name])
    limit = recipe.pop("train_limit")
    x_tr, y_tr, x_te, y_te = load_mnist()
    if limit:
        x_tr, y_tr = x_tr[:limit], y_tr[:limit]
    ds = Dataset(name="mnist", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                 n_classes=10, bounds=(0.0, 1.0), kind="image")
    torch.manual_seed(seed)
    start = TorchModel(wong_cnn(), n_classes=10, input_shape=(1, 28, 28), name=name)
    t0 = time.perf_counter()
    tr = AdversarialTrainer(**recipe, seed=seed)
    model = tr.fit(start, ds, on_epoch=lambda e: print(
        f"[{name}] epoch {e.epoch}/{e.epochs} loss {e.loss:.3f} guard clean "
        f"{e.clean_accuracy:.3f} robust {e.robust_accuracy:.3f} ({e.time_s:.0f}s)",
        flush=True))
    train_s = time.perf_counter() - t0
    net = model.module
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    info = {"model": name, "recipe": RECIPES[name], "train_s": train_s, "seed": seed,
            "stopped_early": tr.stopped_early_, "best_epoch": tr.best_epoch_}
    note.write_text(json.dumps(info, indent=2))
    return wrap(net, name), info


def autoattack(model: TorchModel, x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, Any]:
    import torchattacks

    net = model.module
    atk = torchattacks.AutoAttack(net, norm="Linf", eps=EPS, version="standard",
                                  n_classes=10, seed=seed)
    t0, c0 = time.perf_counter(), time.process_time()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    adv = torch.cat([atk(xs[i:i + 250], ys[i:i + 250]).detach()
                     for i in range(0, len(xs), 250)])
    t, cpu = time.perf_counter() - t0, time.process_time() - c0
    with torch.no_grad():
        pred = net(adv).argmax(1).numpy()
    d = (adv - xs).abs().reshape(len(xs), -1).amax(1)
    robust = (pred == y) & (d.numpy() <= EPS + 1e-5)
    return {"robust_accuracy": float(robust.mean()), "time_s": t, "cpu_s": cpu,
            "robust_mask": robust}


def run_scan(model: TorchModel, x: np.ndarray, y: np.ndarray, preset: str,
             seed: int) -> dict[str, Any]:
    from bastion.evaluate import scan

    t0, c0 = time.perf_counter(), time.process_time()
    rep = scan(model, x, y, norm="linf", epsilons=[EPS], preset=preset, seed=seed)
    t, cpu = time.perf_counter() - t0, time.process_time() - c0
    robust = np.array([b is None for b in rep.first_broken_by])
    return {
        "robust_accuracy": rep.robust_accuracy_at(EPS),
        "interval_95": rep.robust_interval.get(str(EPS)),
        "time_s": t,
        "cpu_s": cpu,
        "stages": [{"name": s.name, "round": s.round, "points_attacked": s.points_attacked,
                    "points_broken": s.points_broken, "time_s": round(s.time_s, 2)}
                   for s in rep.per_attack],
        "escalations": len(rep.escalations),
        "masking_warning": any("gradient masking" in w.lower() for w in rep.warnings),
        "masking_evidence": rep.masking_evidence,
        "warnings": rep.warnings,
        "stage_order": rep.stage_order,
        "robust_mask": robust,
    }


def _part_path(model: str, part: str, start: int, n: int) -> Any:
    return CACHE / "parts" / f"{model}_{part}_{start}_{n}.json"


def run_part(model_name: str, part: str, a: argparse.Namespace, x: np.ndarray,
             y: np.ndarray) -> dict[str, Any]:
    """One measurement (``aa`` or a preset) on one model, saved with its per-point mask so
    that separate processes can be combined; CPU seconds are this process's own."""
    model, info = robust_model(model_name, a.seed)
    load0 = os.getloadavg()
    r = autoattack(model, x, y, a.seed) if part == "aa" else run_scan(model, x, y, part, a.seed)
    r["robust_mask"] = [int(v) for v in r["robust_mask"]]
    r.update(training=info, loadavg_start=list(load0), loadavg_end=list(os.getloadavg()))
    path = _part_path(model_name, part, a.start, a.n)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r))
    print(f"[{model_name}] {part}: {r['robust_accuracy']:.4f} in {r['time_s']:.0f}s wall, "
          f"{r['cpu_s']:.0f}s CPU -> {path}", flush=True)
    return r


def combine(a: argparse.Namespace, names: list[str], presets: list[str]) -> None:
    """The table and JSON from the saved parts (one process per part, or one for all)."""
    rows, results, loads = [], {}, []
    for m in names:
        aa = json.loads(_part_path(m, "aa", a.start, a.n).read_text())
        aa_mask = np.array(aa.pop("robust_mask"), dtype=bool)
        loads += [aa["loadavg_start"], aa["loadavg_end"]]
        res: dict[str, Any] = {"training": aa.pop("training"), "autoattack": aa}
        for p in presets:
            r = json.loads(_part_path(m, p, a.start, a.n).read_text())
            mask = np.array(r.pop("robust_mask"), dtype=bool)
            r.pop("training", None)
            loads += [r["loadavg_start"], r["loadavg_end"]]
            missed = int((mask & ~aa_mask).sum())
            r["points_aa_broke_scan_missed"] = missed
            r["points_scan_broke_aa_missed"] = int((~mask & aa_mask).sum())
            r["time_vs_autoattack"] = r["time_s"] / aa["time_s"]
            # CPU seconds: the fair ratio on a shared, loaded machine (wall time depends on
            # what else runs; CPU time of a 1-thread process much less)
            r["cpu_vs_autoattack"] = r["cpu_s"] / aa["cpu_s"]
            res[p] = r
            ev = r.get("masking_evidence") or {}
            lo_hi = ev.get("rate_interval_95")
            rows.append([m, p, f"{100 * aa['robust_accuracy']:.1f}%",
                         f"{100 * r['robust_accuracy']:.1f}%", missed,
                         r["points_scan_broke_aa_missed"],
                         f"{r['cpu_s']:.0f} s / {aa['cpu_s']:.0f} s",
                         f"{100 * r['cpu_vs_autoattack']:.0f}%",
                         f"{100 * r['time_vs_autoattack']:.0f}%",
                         f"{ev.get('points', 0)} of {ev.get('survivors', '?')}"
                         + (f" ({100 * lo_hi[0]:.1f}-{100 * lo_hi[1]:.1f}%)" if lo_hi else ""),
                         "yes" if r["masking_warning"] else "no"])
        results[m] = res
    table = markdown_table(["model", "preset", "AutoAttack", "scan", "AA broke, scan missed",
                            "scan broke, AA missed", "CPU scan / AA", "CPU share",
                            "wall share", "Square-only breaks (95%)", "masking warning"], rows)
    print(table)
    path = write_result(a.name, {"settings": vars(a), "n_points": a.n, "first_point": a.start,
                                 "eps": EPS, "torch_threads": THREADS, "loadavg": loads,
                                 "results": results, "table": table})
    print(f"-> {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--models", default="fast-at-wong,fast-at,pgd-at,trades")
    ap.add_argument("--start", type=int, default=0, help="first test point")
    ap.add_argument("--presets", default="quick,standard")
    ap.add_argument("--part", default=None,
                    help="run only this part (aa or a preset) and save it under .cache/parts")
    ap.add_argument("--combine", action="store_true",
                    help="build the table from saved parts instead of running")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--name", default="scan_robust")
    a = ap.parse_args()
    torch.set_num_threads(THREADS)
    names = [m.strip() for m in a.models.split(",") if m.strip()]
    presets = [s.strip() for s in a.presets.split(",") if s.strip()]
    if a.train_only:
        for m in names:
            robust_model(m, a.seed)
        return
    if a.combine:
        combine(a, names, presets)
        return
    _, _, x_te, y_te = load_mnist()
    x, y = x_te[a.start:a.start + a.n], y_te[a.start:a.start + a.n]
    for m in names:
        for part in ([a.part] if a.part else ["aa", *presets]):
            run_part(m, part, a, x, y)
    if not a.part:
        combine(a, names, presets)


if __name__ == "__main__":
    main()
