"""Shared set-up for the benchmark scripts: a small MNIST CNN, the test points, timing,
machine information and result writing.

The model is the ``wong-cnn`` shape (Wong et al., "Fast is better than free"):
Conv(1->16, 4, s2, p1) - ReLU - Conv(16->32, 4, s2, p1) - ReLU - Flatten - Linear(100) -
ReLU - Linear(10), trained undefended for 3 epochs with Adam. It is trained once and cached
under ``benchmarks/.cache/`` (safetensors plus a JSON note).

MNIST is read from ``$BASTION_SHARED/datasets/mnist/mnist.npz`` (default: ``../shared``
beside the repository).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bastion._util import write_json_atomic
from bastion.models.torch_model import TorchModel

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
SHARED = Path(os.environ.get("BASTION_SHARED", REPO.parent / "shared"))
MNIST_NPZ = SHARED / "datasets" / "mnist" / "mnist.npz"
THREADS = int(os.environ.get("BENCH_THREADS", "1"))


#: CLINC150 in ``../shared`` (the text benchmarks' intent data)
CLINC = SHARED / "datasets" / "clinc150" / "data_full.json"


def clinc(query: str = "") -> Any:
    """CLINC150 through Bastion's loader, e.g. ``clinc("?intents=10&oos=0")``."""
    from bastion.data import load_data

    return load_data(f"clinc150:{CLINC}{query}")


def wong_cnn() -> nn.Sequential:
    """The small MNIST CNN used by the benchmarks."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def load_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: images ``(n, 1, 28, 28)`` float32 in [0, 1]."""
    if not MNIST_NPZ.exists():
        raise SystemExit(f"MNIST not found at {MNIST_NPZ}; set BASTION_SHARED")
    d = np.load(MNIST_NPZ)

    def prep(a: np.ndarray) -> np.ndarray:
        return (a.astype(np.float32) / 255.0)[:, None, :, :]

    return (prep(d["x_train"]), d["y_train"].astype(np.int64), prep(d["x_test"]),
            d["y_test"].astype(np.int64))


def train_model(epochs: int = 3, seed: int = 0) -> nn.Sequential:
    """The cached trained ``wong_cnn`` (trains it on first use, about a minute)."""
    weights, note = CACHE / "wong_cnn.safetensors", CACHE / "wong_cnn.json"
    net = wong_cnn()
    if weights.exists():
        net.load_state_dict(load_file(str(weights)))
        return net.eval()
    x_tr, y_tr, x_te, y_te = load_mnist()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 128):
            b = perm[i : i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[b]), yt[b]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    note.write_text(json.dumps({"model": "wong-cnn", "epochs": epochs, "seed": seed,
                                "optimizer": "Adam(lr=1e-3), batch 128",
                                "test_accuracy": acc}, indent=2))
    return net


def setup(n_points: int = 1000) -> tuple[TorchModel, np.ndarray, np.ndarray]:
    """``(model, x, y)``: the wrapped CNN and the first ``n_points`` MNIST test points."""
    torch.set_num_threads(THREADS)
    net = train_model()
    for p in net.parameters():
        p.requires_grad_(False)
    model = TorchModel(net, n_classes=10, input_shape=(1, 28, 28), bounds=(0.0, 1.0),
                       name="wong-cnn")
    _, _, x_te, y_te = load_mnist()
    return model, x_te[:n_points], y_te[:n_points]


def accuracy(model: TorchModel, x: np.ndarray | torch.Tensor, y: np.ndarray) -> float:
    xa = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    return float((model.predict_proba(xa).argmax(1) == y).mean())


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[Any, float]:
    """``(result of the last call, best wall time in seconds over repeats)``."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {p: _version(p) for p in
                     ("bastion", "torch", "numpy", "torchattacks",
                      "adversarial-robustness-toolbox")},
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` with machine info and the date."""
    out = {"benchmark": name,
           "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
           "machine": machine_info(), **payload}
    path = RESULTS / f"{name}.json"
    write_json_atomic(path, out)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
