"""ONNX adapter: white-box through onnx2torch (exact gradients), black-box when a graph does
not convert (one line why), metadata read from the graph, bad files refused in one line."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from bastion.errors import ModelError  # noqa: E402
from bastion.models import TorchModel, build_module, is_white_box, resolve_model  # noqa: E402
from bastion.models.onnx_model import OnnxModel, import_onnx2torch, load_onnx  # noqa: E402


def _export(module: torch.nn.Module, shape: tuple[int, ...], path, props=None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), torch.zeros(1, *shape), str(path), dynamo=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    if props:
        m = onnx.load(str(path))
        helper.set_model_props(m, props)
        onnx.save(m, str(path))


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return build_module("cnn", input_shape=(1, 8, 8), n_classes=10)


def test_zoo_cnn_converts_white_box_with_exact_gradients(tmp_path, cnn):
    path = tmp_path / "cnn.onnx"
    _export(cnn, (1, 8, 8), path, {"bastion.class_names": ",".join("abcdefghij")})
    model = resolve_model(f"onnx:{path}")
    assert isinstance(model, TorchModel) and is_white_box(model)
    assert model.input_shape == (1, 8, 8) and model.n_classes == 10
    assert model.class_names == list("abcdefghij")
    ref = TorchModel(cnn, n_classes=10, input_shape=(1, 8, 8))
    x = torch.rand(5, 1, 8, 8, requires_grad=True)
    g1 = torch.autograd.grad(model.logits(x).sum(), x)[0]
    x2 = x.detach().clone().requires_grad_(True)
    g2 = torch.autograd.grad(ref.logits(x2).sum(), x2)[0]
    assert torch.allclose(g1, g2, atol=1e-5)
    np.testing.assert_allclose(model.predict_proba(x.detach().numpy()),
                               ref.predict_proba(x.detach().numpy()), atol=1e-5)


def test_metadata_normalisation_and_shape(tmp_path):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 4))
    path = tmp_path / "norm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # dynamic in every dimension: only the metadata fixes the shape
        torch.onnx.export(net, torch.zeros(1, 3, 2, 2), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    m = onnx.load(str(path))
    helper.set_model_props(m, {"bastion.input_shape": "3,2,2", "bastion.mean": "0.5,0.4,0.3",
                               "bastion.std": "0.2,0.2,0.25"})
    onnx.save(m, str(path))
    model = load_onnx(path)
    x = np.random.default_rng(0).uniform(size=(6, 3, 2, 2)).astype(np.float32)
    mean = np.array([0.5, 0.4, 0.3], np.float32).reshape(3, 1, 1)
    std = np.array([0.2, 0.2, 0.25], np.float32).reshape(3, 1, 1)
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy((x - mean) / std)), 1).numpy()
    np.testing.assert_allclose(model.predict_proba(x), want, atol=1e-5)
    bb = load_onnx(path, white_box=False)
    assert isinstance(bb, OnnxModel) and not is_white_box(bb)
    np.testing.assert_allclose(bb.predict_proba(x), want, atol=1e-5)
    assert bb.queries == 6


def _hardmax_graph(path) -> None:
    """Linear layer then Hardmax: ONNX Runtime runs it, onnx2torch has no Hardmax."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.linspace(-1, 1, 12).tolist())
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"]),
             helper.make_node("Hardmax", ["z"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [None, 4])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [None, 3])], initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_unconvertible_graph_is_black_box_with_one_line_reason(tmp_path):
    path = tmp_path / "hard.onnx"
    _hardmax_graph(path)
    model = resolve_model(str(path))
    assert isinstance(model, OnnxModel) and not is_white_box(model)
    assert model.probabilities  # one-hot rows sum to 1: read as probabilities
    assert "Hardmax" in model.white_box_note and "black-box" in model.white_box_note
    assert "\n" not in model.white_box_note
    p = model.predict_proba(np.ones((2, 4), np.float32))
    assert p.shape == (2, 3) and np.allclose(p.sum(1), 1)


def test_placeholder_torchvision_is_not_left_behind():
    import_onnx2torch()
    tv = sys.modules.get("torchvision")
    assert tv is None or not getattr(tv, "__bastion_placeholder__", False)
    from onnx2torch.node_converters import nms

    if getattr(nms.torchvision, "__bastion_placeholder__", False):
        with pytest.raises(ModelError, match="needs torchvision"):
            nms.torchvision.ops.nms(None, None, 0.5)


@pytest.mark.parametrize("content", [b"not a model", b""])
def test_bad_onnx_file_is_one_line(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError) as ei:
        resolve_model(f"onnx:{path}")
    assert "not a valid ONNX model" in str(ei.value) and "\n" not in ei.value.message


def test_missing_file_and_wrong_shape(tmp_path, cnn):
    with pytest.raises(ModelError, match="not found"):
        resolve_model(f"onnx:{tmp_path}/nope.onnx")
    path = tmp_path / "cnn.onnx"
    _export(cnn, (1, 8, 8), path)
    with pytest.raises(ModelError, match="shape"):
        resolve_model(f"onnx:{path}", input_shape=(1, 28, 28))
    with pytest.raises(ModelError, match="classes"):
        resolve_model(f"onnx:{path}", n_classes=3)
