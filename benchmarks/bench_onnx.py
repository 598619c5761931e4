"""PGD through an ONNX export converted back to torch (``onnx:PATH``, onnx2torch) against
PGD on the original torch model: same points, same random start, same steps.

    .venv/bin/python benchmarks/bench_onnx.py [--n 1000]

The model is the benchmarks' MNIST ``wong-cnn`` (common.py), exported with
``torch.onnx.export`` (the TorchScript exporter) and loaded with ``resolve_model("onnx:...")``.
Writes ``benchmarks/results/onnx.json``: the largest difference between the two runs'
adversarial examples, logits and gradients, and robust accuracy of each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from bastion.attacks.evasion.pgd import pgd_tensor  # noqa: E402
from bastion.models import TorchModel, resolve_model  # noqa: E402

EPS, ALPHA, STEPS = 0.3, 0.01, 40


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(common.THREADS)
    model, x, y = common.setup(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "wong.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.module.eval(), torch.zeros(1, 1, 28, 28), str(path),
                              dynamo=False, input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
        converted = resolve_model(f"onnx:{path}")
    assert isinstance(converted, TorchModel), converted
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    runs = {}
    for name, m in (("torch", model), ("onnx2torch", converted)):
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        adv = pgd_tensor(m, xt, yt, eps=EPS, steps=STEPS, step_size=ALPHA, generator=g)
        secs = time.perf_counter() - t0
        with torch.no_grad():
            robust = float((m.logits(adv).argmax(1) == yt).float().mean())
        xg = xt[:100].clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(m.logits(xg), yt[:100])
        grad = torch.autograd.grad(loss, xg)[0]
        runs[name] = {"adv": adv, "robust": robust, "secs": secs, "grad": grad}
    a, b = runs["torch"], runs["onnx2torch"]
    with torch.no_grad():
        dlog = float((model.logits(a["adv"]) - converted.logits(a["adv"])).abs().max())
    result = {
        "settings": {"n_points": len(x), "eps": EPS, "step_size": ALPHA, "steps": STEPS,
                     "model": "wong-cnn (benchmarks/common.py)", "seed": 0,
                     "torch_threads": torch.get_num_threads()},
        "max_abs_diff_adversarial": float((a["adv"] - b["adv"]).abs().max()),
        "n_points_differing": int(((a["adv"] - b["adv"]).abs().flatten(1).amax(1) > 0).sum()),
        "max_abs_diff_logits": dlog,
        "max_abs_diff_gradient": float((a["grad"] - b["grad"]).abs().max()),
        "robust_accuracy": {"torch": a["robust"], "onnx2torch": b["robust"]},
        "seconds": {"torch": round(a["secs"], 3), "onnx2torch": round(b["secs"], 3)},
    }
    result["goals"] = {"same_robust_accuracy": a["robust"] == b["robust"],
                       "adversarial_examples_identical": result["max_abs_diff_adversarial"]
                       == 0.0}
    common.write_result("onnx", result)
    for k, v in result.items():
        print(f"{k}: {v}")
    if not np.isfinite(result["max_abs_diff_adversarial"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
