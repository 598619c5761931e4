"""``serve`` start-up refuses a gadget .skops model and a model folder with a link in it,
before registering anything in MLflow and before anything in the file runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.testing._private.utils import runstring
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from bastion.errors import BastionError, ModelError, UnsafePathError
from bastion.models import SklearnModel, save_sklearn
from bastion.registry.models import ModelRegistry


def _artifact_names(mlflow_uri: str) -> list[str]:
    root = Path(mlflow_uri[len("sqlite:///"):]).parent / "mlartifacts"
    return [p.name for p in root.rglob("*")] if root.exists() else []


def _gadget_folder(tmp_path: Path, sentinel: Path, digits: Any) -> Path:
    x = digits.x_train[:300].reshape(300, -1)
    clf = LogisticRegression(max_iter=200).fit(x, digits.y_train[:300])
    code = f"open({str(sentinel)!r}, 'w').write('pwned')"
    pipe = Pipeline([
        ("fill", FunctionTransformer(np.full_like, kw_args={"fill_value": code,
                                                            "dtype": object})),
        ("pick", FunctionTransformer(np.take, kw_args={"indices": 0})),
        ("run", FunctionTransformer(runstring, kw_args={"dict": {}})),
        ("clf", clf)])
    return save_sklearn(SklearnModel(pipe, n_classes=10, input_shape=(1, 8, 8)),
                        tmp_path / "gadget")


def test_serve_refuses_a_gadget_skops_model(tmp_path: Path, digits: Any, make_config: Any,
                                            no_admin_env: None) -> None:
    from bastion.service.core import BastionService

    sentinel = tmp_path / "SENTINEL"
    folder = _gadget_folder(tmp_path, sentinel, digits)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_config(folder, tmp_path / "events.db", uri, model_name="gadget")
    with pytest.raises(ModelError, match="does not load: function numpy"):
        BastionService(cfg)
    assert not sentinel.exists()
    assert ModelRegistry("gadget", tracking_uri=uri).versions() == []
    assert "model.skops" not in _artifact_names(uri)


def test_serve_refuses_a_folder_with_a_link_out(tmp_path: Path, svc_models: Any,
                                                make_config: Any, no_admin_env: None) -> None:
    from bastion.service.core import BastionService

    folder = tmp_path / "m"
    shutil.copytree(svc_models[0], folder)
    os.symlink("/etc/passwd", folder / "leak.txt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_config(folder, tmp_path / "events.db", uri, model_name="leaky")
    with pytest.raises(UnsafePathError, match="leak.txt is a symbolic link") as e:
        BastionService(cfg)
    assert "\n" not in str(e.value)
    assert "leak.txt" not in _artifact_names(uri)
    assert ModelRegistry("leaky", tracking_uri=uri).versions() == []


def test_register_never_copies_a_link(tmp_path: Path, svc_models: Any) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = ModelRegistry("links", tracking_uri=uri)
    # leak.txt -> /etc/passwd
    leaky = tmp_path / "leaky"
    shutil.copytree(svc_models[0], leaky)
    os.symlink("/etc/passwd", leaky / "leak.txt")
    with pytest.raises(UnsafePathError, match="leak.txt"):
        reg.register(leaky)
    # the weights themselves a link (to a real safetensors file elsewhere)
    linked = tmp_path / "linked"
    shutil.copytree(svc_models[0], linked)
    real = tmp_path / "elsewhere.safetensors"
    shutil.move(linked / "model.safetensors", real)
    os.symlink(real, linked / "model.safetensors")
    with pytest.raises(UnsafePathError, match="model.safetensors is a symbolic link"):
        reg.register(linked)
    # the folder itself a link
    alias = tmp_path / "alias"
    os.symlink(svc_models[0], alias)
    with pytest.raises(BastionError, match="symbolic link"):
        reg.register(alias)
    assert reg.versions() == []
    names = _artifact_names(uri)
    assert "leak.txt" not in names and "model.safetensors" not in names
    # and a clean folder still registers, with exactly its two files
    v = reg.register(svc_models[0])
    assert v == 1
    assert sorted(n for n in _artifact_names(uri) if "." in n) == [
        "bastion-model.json", "model.safetensors"]
