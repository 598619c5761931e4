"""ONNX models: ONNX Runtime for black-box use, ``onnx2torch`` for white-box gradients.

``load_onnx(path)`` reads the graph once, runs it with ONNX Runtime, and tries to convert
it to a torch module with ``onnx2torch``. When the conversion works *and* the converted
module gives ONNX Runtime's outputs on a probe batch, the model is white-box (a
:class:`~bastion.models.torch_model.TorchModel` whose gradients are exact); otherwise it
is a black-box :class:`OnnxModel` and ``white_box_note`` says, in one line, why.

What the graph carries is read from it: the input shape from the first input's static
dimensions (the batch dimension dropped), and from the model's ``metadata_props`` (set
with ``onnx.helper.set_model_props``) ``bastion.input_shape`` (``"1,28,28"``),
``bastion.mean`` / ``bastion.std`` (normalisation *outside* the graph, per channel,
``"0.5,0.5,0.5"``), ``bastion.bounds`` (``"0,1"``), ``bastion.class_names``
(comma-separated) and ``bastion.output`` (``logits`` or ``probabilities``; without it,
rows that are non-negative and sum to one are taken for probabilities).

``onnx2torch`` imports ``torchvision`` at import time, for two detection operators (NMS
and RoIAlign) only; the PyPI torchvision does not import beside the CPU build of torch
Bastion installs. When ``torchvision`` cannot be imported, a placeholder module is put in
its place for the import alone: a graph that uses those operators then fails to convert
with "this graph needs torchvision" and stays black-box. ONNX files are protobuf data,
never unpickled; no custom-operator libraries are loaded.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bastion.errors import ModelError

__all__ = ["OnnxModel", "import_onnx2torch", "load_onnx"]

_TV_NOTE = ("this graph needs torchvision (NMS/RoIAlign operators), which is not "
            "installed beside the CPU build of torch")


def _placeholder_torchvision() -> types.ModuleType:
    def _missing(*_a: Any, **_k: Any) -> Any:
        raise ModelError(_TV_NOTE, hint="use the ONNX model black-box (ONNX Runtime)")

    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    for name in ("nms", "box_convert", "roi_align", "batched_nms"):
        setattr(ops, name, _missing)
    tv.ops = ops  # type: ignore[attr-defined]
    tv.__bastion_placeholder__ = True  # type: ignore[attr-defined]
    return tv


def import_onnx2torch() -> Any:
    """``onnx2torch``, imported with a placeholder ``torchvision`` when the real one is
    missing or broken (see the module docs); ``ModelError`` when onnx2torch is absent."""
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    placed = False
    try:
        importlib.import_module("torchvision")
    except Exception:  # missing, or a build that does not import beside this torch
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]
        tv = _placeholder_torchvision()
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.ops"] = tv.ops  # type: ignore[attr-defined]
        placed = True
    try:
        return importlib.import_module("onnx2torch")
    except ImportError as exc:
        raise ModelError("onnx2torch is not installed, so ONNX models are black-box only",
                         hint="install the onnx extra: scripts/bootstrap.sh onnx") from exc
    finally:
        if placed:  # the placeholder served onnx2torch's import; nobody else should see it
            sys.modules.pop("torchvision", None)
            sys.modules.pop("torchvision.ops", None)


def _props(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _floats(text: str, what: str, path: Path) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ModelError(f"{path.name}: metadata {what}={text!r} is not a list of numbers",
                         hint="write e.g. 0.5,0.5,0.5 with onnx.helper.set_model_props") from None


class OnnxModel:
    """A black-box model run by ONNX Runtime (``predict_proba`` only).

    ``white_box_note`` says why no gradients are available (empty when the caller chose
    black-box use). Inputs are in input space; ``mean``/``std`` normalise them before the
    graph sees them, as :class:`~bastion.models.torch_model.TorchModel` does.
    """

    def __init__(self, session: Any, *, input_name: str, output_name: str, n_classes: int,
                 input_shape: Sequence[int], bounds: tuple[float, float],
                 mean: list[float] | None, std: list[float] | None, probabilities: bool,
                 name: str, class_names: list[str] | None = None, white_box_note: str = "",
                 batch_size: int = 256) -> None:
        self.session = session
        self.input_name = input_name
        self.output_name = output_name
        self.n_classes = int(n_classes)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.mean, self.std = mean, std
        self.probabilities = probabilities
        self.name = name
        self.class_names = class_names
        self.white_box_note = white_box_note
        self.batch_size = batch_size
        self.queries = 0

    def _normalise(self, x: np.ndarray) -> np.ndarray:
        shape = [-1] + [1] * (len(self.input_shape) - 1)
        if self.mean is not None:
            x = x - np.asarray(self.mean, np.float32).reshape(shape if len(self.mean) > 1
                                                              else [1])
        if self.std is not None:
            x = x / np.asarray(self.std, np.float32).reshape(shape if len(self.std) > 1
                                                             else [1])
        return x.astype(np.float32)

    def raw(self, x: np.ndarray) -> np.ndarray:
        """The graph's output for input-space ``x`` (no softmax, no query counted)."""
        x = np.asarray(x, dtype=np.float32)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ModelError(f"input shape {tuple(x.shape[1:])} does not match the ONNX "
                             f"model's {self.input_shape}")
        outs = []
        for i in range(0, len(x), self.batch_size):
            feed = {self.input_name: self._normalise(x[i : i + self.batch_size])}
            outs.append(np.asarray(self.session.run([self.output_name], feed)[0],
                                   dtype=np.float32))
        return np.concatenate(outs) if outs else np.zeros((0, self.n_classes), np.float32)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        out = self.raw(x)
        self.queries += len(out)
        if self.probabilities:
            return out
        z = out - out.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def __repr__(self) -> str:
        return (f"OnnxModel(name={self.name!r}, input_shape={self.input_shape}, "
                f"n_classes={self.n_classes}, black-box)")


class _LogOf:
    """Wraps a converted module whose output is probabilities: logits = log(p)."""

    def __init__(self, module: Any) -> None:
        import torch

        class LogProb(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x: Any) -> Any:
                return torch.log(self.inner(x).clamp_min(1e-12))

        self.module = LogProb(module)


def load_onnx(
    path: str | os.PathLike[str],
    *,
    input_shape: Sequence[int] | None = None,
    n_classes: int | None = None,
    bounds: tuple[float, float] | None = None,
    white_box: bool = True,
) -> Any:
    """Load an ONNX file: a white-box ``TorchModel`` when ``onnx2torch`` converts it
    faithfully, else a black-box :class:`OnnxModel` (see the module docs).

    ``input_shape`` is needed only when neither the graph nor its metadata fixes it.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"ONNX file not found: {p}", hint="check the path after onnx:")
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError("onnx and onnxruntime are needed for ONNX models",
                         hint="install the onnx extra: scripts/bootstrap.sh onnx") from exc
    try:
        proto = onnx.load(str(p))
        onnx.checker.check_model(proto)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"{p} is not a valid ONNX model: {first}",
                         hint="export it again (torch.onnx.export, tf2onnx, skl2onnx)") from None
    props = _props(proto)
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"{p.name} has {len(inputs)} inputs "
                         f"({[i.name for i in inputs][:5]}); Bastion attacks one input tensor",
                         hint="export a graph with a single input")
    inp = inputs[0]
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in inp.type.tensor_type.shape.dim]
    shape: tuple[int, ...] | None = None
    if "bastion.input_shape" in props:
        shape = tuple(int(v) for v in _floats(props["bastion.input_shape"], "bastion.input_shape",
                                              p))
    elif len(dims) >= 2 and all(d for d in dims[1:]):
        shape = tuple(int(d) for d in dims[1:])  # type: ignore[arg-type]
    if input_shape is not None:
        given = tuple(int(s) for s in input_shape)
        if shape is not None and given != shape:
            raise ModelError(f"ONNX model {p.name} takes inputs of shape {shape}, not {given}",
                             hint="use data with the model's input shape")
        shape = given
    if shape is None:
        raise ModelError(f"ONNX model {p.name} does not fix its input shape ({dims})",
                         hint="set metadata bastion.input_shape (e.g. 1,28,28) or pass "
                         "input_shape= (the CLI takes it from --data)")
    mean = _floats(props["bastion.mean"], "bastion.mean", p) if "bastion.mean" in props else None
    std = _floats(props["bastion.std"], "bastion.std", p) if "bastion.std" in props else None
    if std is not None and any(s <= 0 for s in std):
        raise ModelError(f"{p.name}: metadata bastion.std must be positive, got {std}")
    if bounds is None:
        b = _floats(props["bastion.bounds"], "bastion.bounds", p) if (
            "bastion.bounds" in props) else [0.0, 1.0]
        if len(b) != 2 or not b[0] < b[1]:
            raise ModelError(f"{p.name}: metadata bastion.bounds must be low,high, got {b}")
        bounds = (b[0], b[1])
    class_names = [c for c in props["bastion.class_names"].split(",")] if (
        "bastion.class_names" in props) else None
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        session = ort.InferenceSession(proto.SerializeToString(), so,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot run {p.name}: {str(exc).splitlines()[0][:200]}",
                         hint="check the opset and operators the exporter used") from None
    out_name = None
    for o in session.get_outputs():
        if "float" in o.type and len(o.shape or []) == 2:
            out_name = o.name
            break
    if out_name is None:
        raise ModelError(f"{p.name} has no float output of shape (n, classes): "
                         f"{[(o.name, o.type, o.shape) for o in session.get_outputs()]}",
                         hint="export the classifier's logits or probabilities")
    rng = np.random.default_rng(0)
    probe = rng.uniform(bounds[0], bounds[1], size=(4, *shape)).astype(np.float32)
    kind = props.get("bastion.output", "").strip().lower()
    bb = OnnxModel(session, input_name=inp.name, output_name=out_name, n_classes=2,
                   input_shape=shape, bounds=bounds, mean=mean, std=std, probabilities=False,
                   name=p.stem, class_names=class_names)
    try:
        out = bb.raw(probe)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"ONNX model {p.name} failed on inputs of shape {shape}: "
                         f"{str(exc).splitlines()[0][:200]}",
                         hint="use data with the model's input shape") from None
    if out.ndim != 2 or out.shape[1] < 2:
        raise ModelError(f"ONNX model {p.name} returned shape {out.shape}; expected (n, classes)")
    k = int(out.shape[1])
    if n_classes is not None and int(n_classes) != k:
        raise ModelError(f"ONNX model {p.name} has {k} classes, not {n_classes}",
                         hint="use data with the model's classes")
    if kind in ("probabilities", "proba", "probs"):
        probs = True
    elif kind == "logits":
        probs = False
    else:
        probs = bool((out >= 0).all() and np.allclose(out.sum(axis=1), 1.0, atol=1e-4))
    bb.n_classes, bb.probabilities = k, probs
    if class_names is not None and len(class_names) != k:
        bb.class_names = None
    if not white_box:
        return bb
    note = _convert(proto, bb, probe, out)
    if isinstance(note, str):
        bb.white_box_note = note
        return bb
    return note


def _convert(proto: Any, bb: OnnxModel, probe: np.ndarray, ref: np.ndarray) -> Any:
    """A TorchModel from onnx2torch, or the one-line reason there is none."""
    import torch

    from bastion.models.torch_model import TorchModel

    why = "the graph did not convert to torch"
    try:
        onnx2torch = import_onnx2torch()
        module = onnx2torch.convert(proto).eval()
        module.requires_grad_(False)
        if bb.probabilities:
            module = _LogOf(module).module.eval()
        tm = TorchModel(module, n_classes=bb.n_classes, input_shape=bb.input_shape,
                        bounds=bb.bounds, mean=bb.mean, std=bb.std, name=bb.name)
        with torch.no_grad():
            got = tm.logits(torch.from_numpy(probe)).numpy()
        want = np.log(np.clip(ref, 1e-12, None)) if bb.probabilities else ref
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-4):
            return (f"the torch conversion of {bb.name} disagrees with ONNX Runtime "
                    f"(max difference {float(np.abs(got - want).max()):.2g}); black-box only")
    except ModelError as exc:
        return f"{exc.message}; black-box only"
    except Exception as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if "torchvision" in line:
            line = _TV_NOTE
        return f"{why} ({type(exc).__name__}: {line}); black-box only (ONNX Runtime)"
    tm.onnx_path = None  # type: ignore[attr-defined]
    tm.class_names = bb.class_names  # type: ignore[attr-defined]
    return tm
