"""Adversarial training on Ray Train (2 CPU workers, data-parallel, gloo) on a real local
cluster: a run whose driver is killed after its first epoch resumes from the checkpoint on
shared storage and ends with every epoch, its history continuous."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.train")

from serve_cluster import start_cluster  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray")

SRC = Path(__file__).resolve().parents[2] / "src"
EPOCHS = 3

DRIVER = """
import sys
from bastion.data import load_data
from bastion.models.persist import load_model
from bastion.defend.training import AdversarialTrainer
from bastion.defend.ray_train import train_on_ray

ds = load_data("builtin:digits", seed=0)
model = load_model(sys.argv[2])
tr = AdversarialTrainer(method="fast-at", eps=0.1, epochs={epochs}, batch_size=64,
                        guard_points=64, guard_steps=3, checkpoint_dir=sys.argv[3], seed=0)
train_on_ray(tr, model, ds, workers=2, address=sys.argv[1])
print("finished")
"""


@pytest.fixture(scope="module")
def cluster():
    c = start_cluster(num_cpus=2, src=SRC)
    yield c
    import ray

    if ray.is_initialized():
        ray.shutdown()
    c.stop()


def _model(out: Path) -> Path:
    import torch

    from bastion.data import load_data
    from bastion.models.persist import save_model
    from bastion.models.torch_model import TorchModel
    from bastion.models.train import train_classifier
    from bastion.models.zoo import build_module

    ds = load_data("builtin:digits", seed=0)
    torch.manual_seed(0)
    m = TorchModel(build_module("cnn", input_shape=(1, 8, 8), n_classes=10), n_classes=10,
                   input_shape=(1, 8, 8), name="ray-train")
    train_classifier(m, ds.x_train, ds.y_train, epochs=3, lr=3e-3, batch_size=64, seed=0)
    return save_model(m, out, arch="cnn")


def _epochs_in(storage: Path) -> list[int]:
    """The epochs of the trainer checkpoints Ray Train has registered under ``storage``
    (listed in its run snapshot: a checkpoint folder alone is not resumable yet)."""
    out = []
    for snap in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            doc = json.loads(snap.read_text())
            for c in doc.get("checkpoint_results", []):
                js = snap.parent / c["checkpoint_dir_name"] / "state.json"
                out.append(int(json.loads(js.read_text())["epoch"]))
        except (OSError, ValueError, KeyError):
            continue  # being written
    return sorted(out)


def test_training_resumes_from_its_checkpoint_after_the_driver_is_killed(cluster, tmp_path):
    from bastion.data import load_data
    from bastion.defend.ray_train import train_on_ray
    from bastion.defend.training import AdversarialTrainer
    from bastion.models.persist import load_model

    folder = _model(tmp_path / "model")
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "OMP_NUM_THREADS": "1"}
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(epochs=EPOCHS))
    proc = subprocess.Popen([sys.executable, str(script), cluster.address, str(folder),
                             str(ckpt)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not _epochs_in(ckpt / "ray") and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
            time.sleep(0.2)
        done = _epochs_in(ckpt / "ray")
        assert done, "no checkpoint within the time limit"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and nothing else: its own group
        proc.wait()
    assert max(done) < EPOCHS, "the first run finished before it was killed"
    first = json.loads(next((ckpt / "ray").glob("**/checkpoint_*/state.json")).read_text())
    first_log = first["history"][0]
    assert first_log["epoch"] == 1

    ds = load_data("builtin:digits", seed=0)
    tr = AdversarialTrainer(method="fast-at", eps=0.1, epochs=EPOCHS, batch_size=64,
                            guard_points=64, guard_steps=3, checkpoint_dir=ckpt, seed=0)
    model = train_on_ray(tr, load_model(folder), ds, workers=2, address=cluster.address)
    assert 1 <= tr.resumed_from_ < EPOCHS
    assert [h.epoch for h in tr.history_] == list(range(1, EPOCHS + 1))
    # the epoch the killed run did is the one in the history, not a re-run of it
    assert tr.history_[0].loss == pytest.approx(first_log["loss"])
    assert tr.history_[0].time_s == pytest.approx(first_log["time_s"])
    assert tr.workers_ == 2
    acc = float((model.predict_proba(ds.x_test).argmax(1) == ds.y_test).mean())
    assert acc > 0.5, acc


def test_methods_that_do_not_train_on_ray_are_refused_before_anything_runs(tmp_path):
    from bastion.data import load_data
    from bastion.defend.harden import harden
    from bastion.defend.ray_train import RayFit
    from bastion.errors import BastionError
    from bastion.models.persist import load_model

    ds = load_data("builtin:digits", seed=0)
    model = load_model(_model(tmp_path / "m"))
    with pytest.raises(BastionError, match="squeeze does not run on Ray Train"):
        harden(model, ds, method="squeeze", fit=RayFit(workers=2), out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(BastionError, match="several seeds do not run on Ray Train"):
        harden(model, ds, method="fast-at", fit=RayFit(workers=2), out=tmp_path / "o",
               options={"seeds": 3})
    assert not (tmp_path / "o").exists()
    with pytest.raises(BastionError, match="--workers 0 is not allowed"):
        RayFit(workers=0)


def test_cli_harden_on_ray_trains_on_two_workers(cluster, tmp_path, capsys):
    """`bastion harden --engine ray` end to end: trained by Ray Train's two workers,
    evaluated here, the report says where it trained; a cluster that does not answer is
    one line, exit 2, nothing written."""
    from bastion.cli.main import run

    folder = _model(tmp_path / "model")
    out = tmp_path / "hardened"
    code = run(["harden", "--model", str(folder), "--data", "builtin:digits",
                "--method", "fast-at", "--eps", "0.1", "--epochs", "2", "--batch-size", "64",
                "--engine", "ray", "--workers", "2", "--ray-address", cluster.address,
                "--limit", "40", "--attacks", "pgd", "--out", str(out), "--no-track",
                "--quiet"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["settings"]["engine"] == "ray" and rep["settings"]["workers"] == 2
    assert [e["epoch"] for e in rep["training"]] == [1, 2]
    assert (out / "model").is_dir()
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert run(["harden", "--model", str(folder), "--data", "builtin:digits",
                "--method", "fast-at", "--engine", "ray", "--ray-address", "127.0.0.1:1",
                "--out", str(bad), "--no-track"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no Ray cluster answers" in err
    assert not bad.exists()
