"""One safe walk for every folder Bastion reads or writes: no link, nothing outside.

``leak.txt -> /etc/passwd`` in a model or defense folder, a linked weights file, a
linked folder, a linked report folder: each is refused with one line naming it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from bastion._util import copy_folder_safely, ensure_inside, safe_files, write_folder_atomic
from bastion.defend.persist import load_hardened, save_hardened
from bastion.defend.squeeze import FeatureSqueezing
from bastion.errors import UnsafePathError
from bastion.models import TorchModel, build_module, load_model, save_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    m = TorchModel(build_module("cnn", input_shape=(1, 8, 8), n_classes=10), n_classes=10,
                   input_shape=(1, 8, 8))
    return save_model(m, tmp_path_factory.mktemp("m") / "m", arch="cnn")


def test_helpers(tmp_path: Path) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "a.txt").write_text("a")
    (d / "b.bin").write_bytes(b"b")
    assert [p.name for p in safe_files(d)] == ["b.bin", "a.txt"]
    assert ensure_inside(d, "sub/a.txt") == d / "sub" / "a.txt"
    with pytest.raises(UnsafePathError, match="leaves"):
        ensure_inside(d, "sub/../../x")
    with pytest.raises(UnsafePathError, match="outside"):
        ensure_inside(d, "/etc/passwd")
    os.symlink("/etc", d / "sub" / "etc")
    with pytest.raises(UnsafePathError, match="etc is a symbolic link"):
        ensure_inside(d, "sub/etc/passwd")
    with pytest.raises(UnsafePathError, match="etc is a symbolic link"):
        safe_files(d)
    with pytest.raises(UnsafePathError):
        copy_folder_safely(d, tmp_path / "copy")
    assert not (tmp_path / "copy" / "sub" / "etc").exists()
    f = tmp_path / "f"
    f.mkdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(f / "pipe")
        with pytest.raises(UnsafePathError, match="not a regular file"):
            safe_files(f)


def test_model_folder_links_refused(folder: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(folder, d)
    os.symlink("/etc/passwd", d / "leak.txt")
    with pytest.raises(UnsafePathError, match="leak.txt is a symbolic link") as e:
        load_model(d)
    assert "\n" not in str(e.value)
    (d / "leak.txt").unlink()
    meta = d / "bastion-model.json"
    real = tmp_path / "meta.json"
    shutil.move(meta, real)
    os.symlink(real, meta)
    with pytest.raises(UnsafePathError, match="bastion-model.json is a symbolic link"):
        load_model(d)
    link = tmp_path / "link"
    os.symlink(folder, link)
    with pytest.raises(UnsafePathError, match="is a symbolic link"):
        load_model(link)
    load_model(folder)  # the real folder still loads


def test_defense_folder_links_refused(folder: Path, tmp_path: Path) -> None:
    wrapped = FeatureSqueezing(load_model(folder), bits=3)
    out = save_hardened(wrapped, tmp_path / "h")
    load_hardened(out)
    os.symlink("/etc/passwd", out / "member-0" / "leak.txt")
    with pytest.raises(UnsafePathError, match="leak.txt"):
        load_hardened(out)


def test_writers_refuse_a_linked_target(folder: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "out"
    os.symlink(elsewhere, link)
    with pytest.raises(UnsafePathError, match="output folder .* is a symbolic link"):
        write_folder_atomic(link, lambda tmp: (tmp / "x").write_text("x"))
    with pytest.raises(UnsafePathError, match="symbolic link"):
        save_model(load_model(folder), link, arch="cnn")
    from bastion.evaluate.report import write_scan_report

    with pytest.raises(UnsafePathError, match="output folder .* is a symbolic link"):
        write_scan_report(None, link)  # type: ignore[arg-type]
    assert list(elsewhere.iterdir()) == []


def test_tracking_never_uploads_a_link(folder: Path, tmp_path: Path) -> None:
    from bastion.registry.tracking import track_run

    d = tmp_path / "m"
    shutil.copytree(folder, d)
    os.symlink("/etc/passwd", d / "leak.txt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with track_run("t", tracking_uri=uri) as run:
            run.log_artifact(d, artifact_path="model")
            run.log_artifact(d / "leak.txt")
    finally:
        os.chdir(cwd)
    assert len(run.warnings) == 2 and all("leak.txt" in w for w in run.warnings)
    assert not [p for p in (tmp_path / "mlartifacts").rglob("*") if p.name == "leak.txt"]
