"""SklearnModel / CallableModel adapters and the model sources resolve_model accepts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, SGDClassifier
from torch import nn

from bastion.errors import ModelError
from bastion.models import (
    CallableModel,
    SklearnModel,
    TorchModel,
    WhiteBoxModel,
    is_white_box,
    load_torchscript,
    resolve_model,
)

# set when a Tripwire object is unpickled: proves a file was (not) unpickled
UNPICKLED: list[str] = []


class Tripwire(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x):
        return self.lin(x.flatten(1))

    def __setstate__(self, state):
        UNPICKLED.append("tripwire")
        super().__setstate__(state)


@pytest.fixture(scope="module")
def flat_digits(digits_arrays):
    x_tr, y_tr, x_te, _ = digits_arrays
    return x_tr[:500], y_tr[:500], x_te[:40]


def test_logreg_logits_reproduce_proba_multiclass(flat_digits):
    x, y, xt = flat_digits
    est = LogisticRegression(max_iter=300).fit(x.reshape(len(x), -1), y)
    m = SklearnModel(est, n_classes=10, input_shape=(1, 8, 8))
    assert is_white_box(m) and isinstance(m, WhiteBoxModel)
    xt_t = torch.from_numpy(xt).requires_grad_(True)
    z = m.logits(xt_t)
    assert z.shape == (40, 10)
    np.testing.assert_allclose(torch.softmax(z, 1).detach().numpy(), m.predict_proba(xt),
                               atol=1e-5)
    z[:, 0].sum().backward()
    assert xt_t.grad is not None and float(xt_t.grad.abs().sum()) > 0
    assert m.queries == 40


def test_logreg_logits_binary():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (200, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 1).astype(int)
    for est in (LogisticRegression().fit(x, y),
                SGDClassifier(loss="log_loss", random_state=0).fit(x, y)):
        m = SklearnModel(est, n_classes=2, input_shape=(5,))
        z = m.logits(torch.from_numpy(x[:20]))
        assert z.shape == (20, 2) and torch.all(z[:, 0] == 0)
        np.testing.assert_allclose(torch.softmax(z, 1).numpy(), m.predict_proba(x[:20]),
                                   atol=1e-5)


def test_nonlinear_estimator_is_black_box(flat_digits):
    x, y, xt = flat_digits
    rf = RandomForestClassifier(n_estimators=5, random_state=0).fit(x.reshape(len(x), -1), y)
    m = SklearnModel(rf, n_classes=10, input_shape=(1, 8, 8))
    assert not hasattr(m, "logits") and not is_white_box(m)
    assert m.predict_proba(xt).shape == (40, 10) and m.queries == 40
    with pytest.raises(ModelError, match="11 classes|has 10 classes"):
        SklearnModel(rf, n_classes=11, input_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="not fitted"):
        SklearnModel(LogisticRegression(), n_classes=2, input_shape=(3,))


def test_callable_model_validation():
    def good(x):
        z = np.stack([x.sum(1), -x.sum(1)], 1)
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    m = CallableModel(good, n_classes=2, input_shape=(3,))
    x = np.full((4, 3), 0.5, dtype=np.float32)
    p = m.predict_proba(x)
    assert p.shape == (4, 2) and m.queries == 4 and not is_white_box(m)
    cases = [
        (lambda x: np.ones((len(x), 3)) / 3, "shape"),
        (lambda x: np.stack([x.sum(1), -x.sum(1)], 1), "negative"),
        (lambda x: np.full((len(x), 2), 0.7), "sum to"),
        (lambda x: np.full((len(x), 2), np.nan), "NaN"),
    ]
    for fn, frag in cases:
        with pytest.raises(ModelError, match=frag):
            CallableModel(fn, n_classes=2, input_shape=(3,)).predict_proba(x)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript(tmp_path, digits_arrays):
    net = _net()
    scripted = torch.jit.trace(net, torch.zeros(1, 1, 8, 8))
    p = tmp_path / "net.pt"
    torch.jit.save(scripted, str(p))
    m = resolve_model(str(p), input_shape=(1, 8, 8))
    assert isinstance(m, TorchModel) and m.n_classes == 10
    x = digits_arrays[2][:10]
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(m.predict_proba(x), want, atol=1e-6)
    (tmp_path / "bad.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(ModelError, match="not a loadable TorchScript"):
        load_torchscript(tmp_path / "bad.pt", input_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="input shape"):
        resolve_model(str(p))
    with pytest.raises(ModelError, match="outputs 10 classes"):
        resolve_model(str(p), input_shape=(1, 8, 8), n_classes=3)


def test_pickled_checkpoint_refused_without_unpickling(tmp_path):
    p = tmp_path / "full.pth"
    torch.save(Tripwire(), p)
    # the tripwire works: a plain unpickle fires it
    UNPICKLED.clear()
    torch.load(p, weights_only=False)
    assert UNPICKLED == ["tripwire"]
    UNPICKLED.clear()
    with pytest.raises(ModelError, match="pickle-based PyTorch checkpoint") as e:
        resolve_model(str(p), input_shape=(1, 8, 8))
    assert "python:FILE.py:FUNCTION" in str(e.value)
    assert UNPICKLED == []


_MODULE_SRC = """
from torch import nn

def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

def wrong():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))

def not_a_module():
    return 42
"""


def test_python_module_with_weights(tmp_path, digits_arrays):
    f = tmp_path / "netdef.py"
    f.write_text(_MODULE_SRC)
    net = _net()
    w = tmp_path / "w.pth"
    torch.save(net.state_dict(), w)
    m = resolve_model(f"python:{f}:build", weights=str(w), input_shape=(1, 8, 8))
    x = digits_arrays[2][:10]
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(m.predict_proba(x), want, atol=1e-6)
    assert m.n_classes == 10 and is_white_box(m)
    with pytest.raises(ModelError, match="do not fit|do not match"):
        resolve_model(f"python:{f}:wrong", weights=str(w), input_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        resolve_model(f"python:{f}:not_a_module", input_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="no function 'nope'"):
        resolve_model(f"python:{f}:nope", input_shape=(1, 8, 8))
    # a full pickled model as --weights is refused by weights_only, not unpickled
    full = tmp_path / "full.pth"
    torch.save(Tripwire(), full)
    UNPICKLED.clear()
    with pytest.raises(ModelError, match="cannot be read as plain weights"):
        resolve_model(f"python:{f}:build", weights=str(full), input_shape=(1, 8, 8))
    assert UNPICKLED == []
    torch.save({"epoch": 3}, tmp_path / "notsd.pth")
    with pytest.raises(ModelError, match="does not hold a state dict"):
        resolve_model(f"python:{f}:build", weights=str(tmp_path / "notsd.pth"),
                      input_shape=(1, 8, 8))


def test_resolve_unknown_specs(tmp_path):
    with pytest.raises(ModelError, match="not found") as e:
        resolve_model(str(tmp_path / "nothing.pt"))
    assert "builtin:NAME" in str(e.value)
    with pytest.raises(ModelError, match="unknown built-in model"):
        resolve_model("builtin:imagenet-vit", cache_dir=tmp_path)
    (tmp_path / "x.h5").write_bytes(b"00")
    with pytest.raises(ModelError, match="cannot tell"):
        resolve_model(str(tmp_path / "x.h5"))
    (tmp_path / "x.onnx").write_bytes(b"00")  # .onnx is read as ONNX now (issue 20)
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        resolve_model(str(tmp_path / "x.onnx"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelError, match="not a Bastion model folder"):
        resolve_model(str(tmp_path / "plain"))


def test_small_batches_use_native_convolution_with_the_same_answers():
    """A forward pass of a few rows runs with oneDNN off (faster for tiny batches) and
    gives the answers the oneDNN path gives; the switch is restored afterwards, also
    when used from several threads at once and when nested."""
    import threading

    from bastion.models.torch_model import NATIVE_CONV_MAX_ROWS, TorchModel, native_conv
    from bastion.models.zoo import build_module

    torch.manual_seed(0)
    m = TorchModel(build_module("wong-cnn", input_shape=(1, 28, 28), n_classes=10),
                   n_classes=10, input_shape=(1, 28, 28))
    x = np.random.default_rng(0).random((NATIVE_CONV_MAX_ROWS, 1, 28, 28), dtype=np.float32)
    before = torch.backends.mkldnn.enabled
    seen = []
    orig = m.module.forward

    def spy(t):
        seen.append(torch.backends.mkldnn.enabled)
        return orig(t)

    m.module.forward = spy
    small = m.predict_logits(x)  # native
    m.module.forward = orig
    with torch.no_grad():
        reference = m.logits(torch.from_numpy(x)).numpy()  # oneDNN (the default)
    assert seen == [False] and torch.backends.mkldnn.enabled == before
    np.testing.assert_allclose(small, reference, rtol=1e-4, atol=1e-5)
    # a larger batch keeps oneDNN
    seen.clear()
    m.module.forward = spy
    m.predict_logits(np.concatenate([x, x]))
    m.module.forward = orig
    assert seen == [before]

    errors = []

    def worker():
        try:
            for _ in range(200):
                with native_conv():
                    with native_conv():
                        assert torch.backends.mkldnn.enabled is False
        except AssertionError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and torch.backends.mkldnn.enabled == before
