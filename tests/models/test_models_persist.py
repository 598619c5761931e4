"""Bastion model folders: round trips, atomic writes, corrupt files, skops allowlist."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from bastion.errors import ModelError
from bastion.models import (
    SklearnModel,
    TorchModel,
    build_module,
    is_white_box,
    load_model,
    load_skops,
    read_model_meta,
    save_model,
    save_sklearn,
)


@pytest.fixture()
def cnn_model():
    torch.manual_seed(0)
    net = build_module("cnn", input_shape=(1, 8, 8), n_classes=10)
    return TorchModel(net, n_classes=10, input_shape=(1, 8, 8), mean=[0.3], std=[0.4],
                      name="t-cnn")


def test_torch_round_trip_identical(tmp_path, cnn_model, digits_arrays):
    x = digits_arrays[2][:50]
    save_model(cnn_model, tmp_path / "m", arch="cnn", meta={"note": "hi", "acc": np.float32(1)})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "bastion-model.json", "model.safetensors"]
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, TorchModel) and loaded.name == "t-cnn"
    assert loaded.mean == [0.3] and loaded.std == [0.4] and loaded.bounds == (0.0, 1.0)
    np.testing.assert_array_equal(loaded.predict_proba(x), cnn_model.predict_proba(x))
    doc = read_model_meta(tmp_path / "m")
    assert doc["kind"] == "torch" and doc["arch"] == "cnn" and doc["meta"]["note"] == "hi"
    assert "bastion_version" in doc
    # no temporary debris left beside the folder
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_mlp_kwargs_round_trip(tmp_path):
    net = build_module("mlp", input_shape=(13,), n_classes=3, hidden=(8, 4))
    m = TorchModel(net, n_classes=3, input_shape=(13,))
    save_model(m, tmp_path / "m", arch="mlp", arch_kwargs={"hidden": (8, 4)})
    x = np.random.default_rng(0).uniform(0, 1, (5, 13)).astype(np.float32)
    np.testing.assert_array_equal(load_model(tmp_path / "m").predict_proba(x), m.predict_proba(x))


def test_overwrite_rules(tmp_path, cnn_model):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    with pytest.raises(ModelError, match="refusing to overwrite"):
        save_model(cnn_model, other, arch="cnn")
    assert (other / "thesis.txt").read_text() == "precious"
    save_model(cnn_model, tmp_path / "m", arch="cnn")
    save_model(cnn_model, tmp_path / "m", arch="cnn", meta={"v": 2})  # Bastion folder: ok
    assert read_model_meta(tmp_path / "m")["meta"] == {"v": 2}
    (tmp_path / "empty").mkdir()
    save_model(cnn_model, tmp_path / "empty", arch="cnn")


def test_save_wrong_arch_writes_nothing(tmp_path, cnn_model):
    with pytest.raises(ModelError, match="do not match arch 'mlp'"):
        save_model(cnn_model, tmp_path / "m", arch="mlp")
    assert not (tmp_path / "m").exists()
    with pytest.raises(ModelError, match="not a zoo architecture"):
        save_model(cnn_model, tmp_path / "m", arch="resnet")


def test_load_errors(tmp_path, cnn_model):
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "none")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelError, match="not a Bastion model folder"):
        load_model(tmp_path / "plain")
    d = tmp_path / "m"
    save_model(cnn_model, d, arch="cnn")
    meta = json.loads((d / "bastion-model.json").read_text())

    (d / "bastion-model.json").write_text("{ not json")
    with pytest.raises(ModelError, match="corrupt"):
        load_model(d)

    meta2 = dict(meta, n_classes=7)  # arch rebuilt with 7 outputs: shape mismatch
    (d / "bastion-model.json").write_text(json.dumps(meta2))
    with pytest.raises(ModelError, match="shapes do not match"):
        load_model(d)

    (d / "bastion-model.json").write_text(json.dumps(meta))
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ModelError, match="corrupt"):
        load_model(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no model.safetensors"):
        load_model(d)


def _logreg(digits_arrays):
    x, y = digits_arrays[0][:400], digits_arrays[1][:400]
    est = LogisticRegression(max_iter=300).fit(x.reshape(len(x), -1), y)
    return SklearnModel(est, n_classes=10, input_shape=(1, 8, 8), name="lr")


def test_sklearn_round_trip(tmp_path, digits_arrays):
    m = _logreg(digits_arrays)
    save_sklearn(m, tmp_path / "s", meta={"k": 1})
    assert (tmp_path / "s" / "model.skops").is_file()
    loaded = load_model(tmp_path / "s")
    assert isinstance(loaded, SklearnModel) and is_white_box(loaded)
    x = digits_arrays[2][:30]
    np.testing.assert_array_equal(loaded.predict_proba(x), m.predict_proba(x))
    assert read_model_meta(tmp_path / "s")["kind"] == "sklearn"
    bare = load_skops(tmp_path / "s" / "model.skops", input_shape=(1, 8, 8), bounds=(0, 1))
    assert bare.n_classes == 10


def _double(x):
    return x * 2


def test_skops_untrusted_type_refused(tmp_path, digits_arrays):
    import skops.io as sio

    x, y = digits_arrays[0][:200].reshape(200, -1), digits_arrays[1][:200]
    pipe = make_pipeline(FunctionTransformer(_double), LogisticRegression(max_iter=200)).fit(x, y)
    sio.dump(pipe, tmp_path / "evil.skops")
    with pytest.raises(ModelError, match="does not load: function") as e:
        load_skops(tmp_path / "evil.skops", input_shape=(1, 8, 8))
    assert "_double" in str(e.value)
    (tmp_path / "junk.skops").write_bytes(b"not a zip at all")
    with pytest.raises(ModelError, match="not a valid skops file"):
        load_skops(tmp_path / "junk.skops", input_shape=(1, 8, 8))
