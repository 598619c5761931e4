"""The poison -> audit -> sanitise -> train -> scan -> serve loop, from the CLI alone, on
built-in digits (issue 15, section 5): every file Bastion writes reads back as data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from bastion.cli.main import run


@pytest.fixture()
def zoo_model_folder(tmp_path, digits_arrays):
    """A zoo cnn saved the way a harden run leaves it: ``out/hardened/model``."""
    from bastion.models.persist import save_model
    from bastion.models.torch_model import TorchModel
    from bastion.models.train import train_classifier
    from bastion.models.zoo import build_module

    x_tr, y_tr, _, _ = digits_arrays
    m = TorchModel(build_module("cnn", input_shape=(1, 8, 8), n_classes=10), n_classes=10,
                   input_shape=(1, 8, 8))
    train_classifier(m, x_tr, y_tr, epochs=2, lr=3e-3, batch_size=64, seed=0)
    return save_model(m, tmp_path / "out" / "hardened" / "model", arch="cnn")


def test_poison_audit_sanitise_train_scan_loop(tmp_path, capsys):
    p, a, m, s = (tmp_path / d for d in ("poisoned", "audit", "cleaned/model", "scan"))
    assert run(["audit", "poison", "--data", "builtin:digits", "--attack", "label-flip",
                "--rate", "0.1", "--out", str(p)]) == 0
    assert (p / "poisoned.npz").exists()
    # the audit reads the poisoned file back (npz:) and knows its ground truth
    assert run(["audit", "data", "--data", f"npz:{p / 'poisoned.npz'}", "--out", str(a),
                "--no-track"]) == 0
    rep = json.loads((a / "report.json").read_text())
    assert rep["abnormal"], rep["verdict"]
    sanitiser = next(d for d in rep["detectors"] if d["detector"].startswith("sanitiser"))
    assert sanitiser["recall"] >= 0.8 and sanitiser["precision"] >= 0.6, sanitiser
    with np.load(a / "cleaned.npz") as z:
        n_clean = len(z["y_train"])
    assert n_clean == rep["n_train"] - rep["n_removed"]
    # train on the sanitised file, then scan the model on it
    assert run(["train", "--model", "cnn", "--data", f"npz:{a / 'cleaned.npz'}", "--epochs",
                "3", "--out", str(m), "--no-track"]) == 0
    assert run(["scan", "--model", str(m), "--data", f"npz:{a / 'cleaned.npz'}", "--limit",
                "20", "--eps", "0.1", "--attacks", "apgd-ce", "--set", "apgd-ce.steps=5",
                "--out", str(s), "--no-track"]) == 0
    scan = json.loads((s / "report.json").read_text())
    assert scan["clean_accuracy"] > 0.5 and "0.1" in scan["robust_accuracy"]
    err = capsys.readouterr().err  # not a terminal: one progress line per stage
    assert "scan: apgd-ce (1/1)" in err and "audit data: running knn" in err


def _free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return int(sk.getsockname()[1])


def test_serve_names_a_model_folder_after_its_parent(tmp_path, zoo_model_folder):
    """``serve --model out/hardened/model`` registers "hardened" and says so."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bastion.cli", "serve", "--model", str(zoo_model_folder),
         "--reference", "builtin:digits", "--port", str(port), "--tracking-uri",
         f"sqlite:///{tmp_path / 'mlflow.db'}", "--events", f"sqlite:///{tmp_path / 'ev.db'}"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving "):
                break
        text = "".join(lines)
        assert "registered model name: hardened" in text, text
        assert "serving hardened v1" in text, text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_default_model_name():
    from bastion.service.core import default_model_name

    assert default_model_name("out/hardened/model") == "hardened"
    assert default_model_name("runs/final/model") == "runs"
    assert default_model_name("models/mnist-cnn") == "mnist-cnn"
    assert default_model_name("builtin:digits-cnn") == "digits-cnn"
    assert default_model_name("registry:prod") == "prod"
