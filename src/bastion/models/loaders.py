"""Loading models the user brings: TorchScript files and ``FILE.py:FUNCTION`` + weights.

Neither path unpickles arbitrary objects: TorchScript archives are read by
``torch.jit.load`` (which runs no Python pickle), and weights for a Python-defined module
are read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bastion.errors import ModelError
from bastion.models.torch_model import TorchModel


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The line of an exception's text that says what went wrong, for a one-line error.

    TorchScript errors carry a TorchScript traceback; the cause is on their last line.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[-1] if len(lines) > 1 and "Traceback" in str(exc) else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _infer_n_classes(module: nn.Module, input_shape: tuple[int, ...], source: str) -> int:
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, *input_shape))
    except Exception as exc:
        raise ModelError(
            f"{source} failed on an input of shape (1, {', '.join(map(str, input_shape))}): "
            f"{one_line(exc)}",
            hint="the input shape comes from the data (--data, or input_shape= from Python); "
            "use a model made for inputs of that shape",
        ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{source} returned {shape}; expected logits of shape (n, n_classes)",
                         hint="the model must output one row of class logits per input")
    return int(out.shape[1])


def _check_n_classes(module: nn.Module, input_shape: tuple[int, ...], n_classes: int | None,
                     source: str) -> int:
    inferred = _infer_n_classes(module, input_shape, source)
    if n_classes is not None and int(n_classes) != inferred:
        raise ModelError(f"{source} outputs {inferred} classes but n_classes={n_classes}",
                         hint="pass the right number of classes or omit it")
    return inferred


def load_torchscript(
    path: str | os.PathLike[str],
    *,
    input_shape: Sequence[int],
    bounds: tuple[float, float] = (0.0, 1.0),
    n_classes: int | None = None,
) -> TorchModel:
    """Load a TorchScript file as a :class:`TorchModel`; ``n_classes`` is inferred."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"TorchScript file not found: {p}", hint="check the path")
    try:
        with warnings.catch_warnings():  # torch marks jit as deprecated; it still loads
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location="cpu")
    except Exception as exc:
        raise ModelError(
            f"{p} is not a loadable TorchScript file: {one_line(exc, 200)}",
            hint="export with torch.jit.script/trace and torch.jit.save, or use "
            "python:FILE.py:FUNCTION with --weights for a state dict",
        ) from None
    shape = tuple(int(s) for s in input_shape)
    k = _check_n_classes(module, shape, n_classes, f"TorchScript model {p.name}")
    return TorchModel(module, n_classes=k, input_shape=shape, bounds=bounds, name=p.stem)


def _extract_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                return inner
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                       for k, v in obj.items()):
            return obj
    raise ModelError(
        f"{source} does not hold a state dict (got {type(obj).__name__})",
        hint="save weights with torch.save(module.state_dict(), PATH)",
    )


def load_python_module(
    spec: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    input_shape: Sequence[int],
    n_classes: int | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> TorchModel:
    """Import ``FILE.py``, call ``FUNCTION()`` for an ``nn.Module``, load ``weights``.

    ``weights`` is a state dict saved with ``torch.save(module.state_dict(), PATH)``
    (or a safetensors file); it is read with ``weights_only=True``.
    """
    if ":" not in spec:
        raise ModelError(f"python model spec {spec!r} needs the form FILE.py:FUNCTION",
                         hint="e.g. python:models/net.py:build")
    file_part, func_name = spec.rsplit(":", 1)
    file = Path(file_part).expanduser()
    if not file.is_file():
        raise ModelError(f"Python file not found: {file}", hint="check the path")
    mod_name = "bastion_user_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
    try:
        mspec = importlib.util.spec_from_file_location(mod_name, file)
        if mspec is None or mspec.loader is None:
            raise ImportError(f"cannot import {file}")
        pymod = importlib.util.module_from_spec(mspec)
        sys.modules[mod_name] = pymod
        mspec.loader.exec_module(pymod)
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        raise ModelError(f"importing {file} failed: {type(exc).__name__}: {exc}",
                         hint="fix the error in the file") from None
    fn = getattr(pymod, func_name, None)
    if not callable(fn):
        raise ModelError(f"{file} has no function {func_name!r}",
                         hint="name a function that returns an nn.Module")
    try:
        module = fn()
    except Exception as exc:
        raise ModelError(f"{file}:{func_name}() failed: {type(exc).__name__}: {exc}",
                         hint="the function must build the model without arguments") from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"{file}:{func_name}() returned {type(module).__name__}, "
                         "not a torch.nn.Module", hint="return the network object")
    if weights is not None:
        wpath = Path(weights).expanduser()
        if not wpath.is_file():
            raise ModelError(f"weights file not found: {wpath}", hint="check --weights")
        if wpath.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                state: Any = load_file(str(wpath))
            except Exception as exc:
                raise ModelError(f"{wpath} is corrupt: {exc}",
                                 hint="save the weights again") from None
        else:
            try:
                state = torch.load(wpath, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ModelError(
                    f"{wpath} cannot be read as plain weights: "
                    f"{str(exc).splitlines()[0][:200]}",
                    hint="save only the state dict (torch.save(module.state_dict(), PATH)); "
                    "Bastion does not unpickle whole model objects",
                ) from None
        sd = _extract_state_dict(state, str(wpath))
        try:
            result = module.load_state_dict(sd, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ModelError(
                f"weights in {wpath.name} do not fit {func_name}(): "
                f"{' '.join(str(exc).split())[:300]}",
                hint="the weights belong to a different architecture or size",
            ) from None
        if result.missing_keys or result.unexpected_keys:
            raise ModelError(
                f"weights in {wpath.name} do not match {func_name}(): missing "
                f"{list(result.missing_keys)[:5]}, unexpected {list(result.unexpected_keys)[:5]}",
                hint="the weights belong to a different architecture",
            )
    shape = tuple(int(s) for s in input_shape)
    module.eval()
    k = _check_n_classes(module, shape, n_classes, f"{file.name}:{func_name}")
    return TorchModel(module, n_classes=k, input_shape=shape, bounds=bounds, name=func_name)
