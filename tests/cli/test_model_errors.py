"""Every broken or hostile model a user can hand ``bastion scan`` gives exit code 1 and
exactly one line on stderr naming the problem: no traceback, no "internal error"."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bastion.cli.main import run
from bastion.models import TorchModel, build_module, save_model


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    m = TorchModel(build_module("mlp", input_shape=(1, 8, 8), n_classes=10, hidden=(16,)),
                   n_classes=10, input_shape=(1, 8, 8))
    return save_model(m, tmp_path_factory.mktemp("good") / "m", arch="mlp",
                      arch_kwargs={"hidden": [16]})


def _copy(good: Path, tmp_path: Path) -> Path:
    d = tmp_path / "m"
    shutil.copytree(good, d)
    return d


def _edit_meta(d: Path, **fields: object) -> None:
    meta = d / "bastion-model.json"
    doc = json.loads(meta.read_text())
    doc.update(fields)
    meta.write_text(json.dumps(doc))


def _scan(model: Path | str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = run(["scan", "--model", str(model), "--data", "builtin:digits", "--out",
                str(tmp_path / "report"), "--no-track", "--limit", "4"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert lines[0].startswith("error: ")
    assert not (tmp_path / "report" / "report.json").exists()
    return lines[0]


def test_huge_arch_kwargs(good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    d = _copy(good, tmp_path)
    _edit_meta(d, arch_kwargs={"hidden": [10**12]})
    line = _scan(d, tmp_path, capsys)
    assert "arch_kwargs.hidden.0" in line and "save the model again" in line
    _edit_meta(d, arch_kwargs={"hidden": [16_000] * 16})  # each allowed, too many in all
    line = _scan(d, tmp_path, capsys)
    assert "parameters, more than Bastion loads" in line
    _edit_meta(d, arch_kwargs={"hidden": [16], "evil": 1})
    assert "arch_kwargs.evil" in _scan(d, tmp_path, capsys)
    _edit_meta(d, arch_kwargs={"hidden": [16]}, input_shape=[1, 10**9, 8])
    assert "input_shape" in _scan(d, tmp_path, capsys)


def test_bad_metadata_fields(good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    d = _copy(good, tmp_path)
    for fields, word in [({"n_classes": "ten"}, "n_classes"), ({"bounds": [1, 0]}, "bounds"),
                         ({"arch": "resnet"}, "not a zoo architecture"),
                         ({"mean": [0.1, 0.2, 0.3]}, "mean has 3 values"),
                         ({"std": [0.0]}, "std must be positive")]:
        shutil.rmtree(d)
        d = _copy(good, tmp_path)
        _edit_meta(d, **fields)
        assert word in _scan(d, tmp_path, capsys)
    (d / "bastion-model.json").write_text("{not json")
    assert "is corrupt" in _scan(d, tmp_path, capsys)


def test_weights_problems(good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    d = _copy(good, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert "model.safetensors is corrupt" in _scan(d, tmp_path, capsys)
    (d / "model.safetensors").unlink()
    assert "has no model.safetensors" in _scan(d, tmp_path, capsys)
    shutil.rmtree(d)
    d = _copy(good, tmp_path)
    _edit_meta(d, arch_kwargs={"hidden": [32]})  # weights are for hidden=[16]
    assert "weight shapes do not match" in _scan(d, tmp_path, capsys)


def test_folder_without_metadata(good: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]):
    d = tmp_path / "plain"
    d.mkdir()
    shutil.copy(good / "model.safetensors", d)
    assert "not a Bastion model folder" in _scan(d, tmp_path, capsys)


def test_links_in_and_as_the_folder(good: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]):
    d = _copy(good, tmp_path)
    os.symlink("/etc/passwd", d / "leak.txt")
    assert "leak.txt is a symbolic link" in _scan(d, tmp_path, capsys)
    (d / "leak.txt").unlink()
    real = tmp_path / "weights.safetensors"
    shutil.move(d / "model.safetensors", real)
    os.symlink(real, d / "model.safetensors")
    assert "model.safetensors is a symbolic link" in _scan(d, tmp_path, capsys)
    link = tmp_path / "linked-folder"
    os.symlink(good, link)
    assert "is a symbolic link" in _scan(link, tmp_path, capsys)


class _Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 7, -1) @ torch.ones(3, 10)


def test_failing_torchscript_is_one_line_with_a_real_hint(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]):
    f = tmp_path / "broken.pt"
    torch.jit.save(torch.jit.script(_Broken()), str(f))
    line = _scan(f, tmp_path, capsys)
    assert "broken.pt failed on an input of shape (1, 1, 8, 8)" in line
    assert "--input-shape" not in line and "--data" in line
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    assert "not a loadable TorchScript" in _scan(tmp_path / "junk.pt", tmp_path, capsys)


def test_real_process_prints_one_line(good: Path, tmp_path: Path) -> None:
    d = _copy(good, tmp_path)
    _edit_meta(d, arch_kwargs={"hidden": [10**12]})
    r = subprocess.run([sys.executable, "-m", "bastion.cli", "scan", "--model", str(d),
                        "--data", "builtin:digits", "--out", str(tmp_path / "r"), "--no-track"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "arch_kwargs.hidden.0" in lines[0], r.stderr
