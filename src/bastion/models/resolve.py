"""``resolve_model(spec)``: turn whatever the user names into a :class:`Model`.

Accepted specs:

- a Bastion model folder (``bastion-model.json`` inside);
- a TorchScript file (``.pt``, ``.pth``, ``.ts``, ``.jit``); a pickle-based checkpoint
  is refused without being unpickled;
- a ``.skops`` file (scikit-learn);
- ``python:FILE.py:FUNCTION`` (with ``weights=`` a state dict);
- ``onnx:PATH`` or a ``.onnx`` file: ONNX Runtime, white-box through ``onnx2torch`` when
  the graph converts (:mod:`bastion.models.onnx_model`);
- ``hf:PATH``: a local Hugging Face sequence-classification folder (text; never a
  download, :mod:`bastion.models.text`);
- ``builtin:NAME`` (see :data:`BUILTIN_MODELS`): trained on first use and cached as a
  model folder under ``cache_dir`` / ``$BASTION_CACHE`` / ``~/.cache/bastion``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from bastion.errors import ModelError
from bastion.models.base import Model

#: name -> (dataset spec, arch)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "digits-cnn": ("builtin:digits", "cnn"),
    "digits-mlp": ("builtin:digits", "mlp"),
    "digits-logreg": ("builtin:digits", "logreg"),
    "breast-cancer-mlp": ("builtin:breast-cancer", "mlp"),
    "breast-cancer-logreg": ("builtin:breast-cancer", "logreg"),
    "wine-mlp": ("builtin:wine", "mlp"),
}

#: training settings of the built-in models: (epochs, lr, batch_size)
_BUILTIN_TRAINING: dict[str, tuple[int, float, int]] = {
    "digits-cnn": (8, 3e-3, 64),
    "digits-mlp": (20, 1e-3, 64),
    "digits-logreg": (1, 1e-3, 64),
    "breast-cancer-mlp": (30, 1e-3, 64),
    "breast-cancer-logreg": (1, 1e-3, 64),
    "wine-mlp": (50, 3e-3, 32),
}

#: the seed every built-in model is trained with
BUILTIN_SEED = 0

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit")


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Bastion cache folder: ``cache_dir``, ``$BASTION_CACHE`` or ``~/.cache/bastion``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("BASTION_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "bastion"


def builtin_model_path(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the built-in model ``name`` is cached."""
    return cache_root(cache_dir) / "models" / name


def load_builtin(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> Any:
    """Load the built-in model ``name``, training and caching it on first use.

    A built-in model is one fixed artifact: it is always trained with
    :data:`BUILTIN_SEED` on the train split of ``load_data(data_spec, seed=BUILTIN_SEED)``,
    whatever seed the caller runs with, so every run sees the same model.

    Training writes into a private temporary folder that is renamed into the cache only
    when complete; if another process got there first, its model is used.
    """
    from bastion.models.persist import is_model_folder, load_model
    from bastion.models.train import train_from_spec

    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown built-in model {name!r}",
                         hint=f"valid: {', '.join('builtin:' + n for n in BUILTIN_MODELS)}")
    target = builtin_model_path(name, cache_dir=cache_dir)
    if is_model_folder(target):
        return load_model(target)
    data_spec, arch = BUILTIN_MODELS[name]
    epochs, lr, batch_size = _BUILTIN_TRAINING[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.train-", dir=target.parent))
    try:
        out = work / "model"
        train_from_spec(arch, data_spec, out, epochs=epochs, lr=lr, batch_size=batch_size,
                        seed=BUILTIN_SEED, progress=progress, name=name)
        if target.exists() and not is_model_folder(target):
            shutil.rmtree(target, ignore_errors=True)  # debris, not a model
        try:
            os.rename(out, target)
        except OSError:
            if not is_model_folder(target):  # lost the race to something broken
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return load_model(target)


def _looks_like_pickle_checkpoint(path: Path) -> bool:
    """A torch.save zip archive (data.pkl inside) or a raw pickle stream."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            # TorchScript archives hold data.pkl too, but also compiled code/
            return any(n.endswith("data.pkl") for n in names) and not any(
                "/code/" in n or n.startswith("code/") for n in names)
        with open(path, "rb") as f:
            head = f.read(2)
        return len(head) == 2 and head[0] == 0x80  # pickle protocol marker
    except OSError:
        return False


def _check_expected(model: Any, input_shape: Any, n_classes: int | None, spec: str) -> Any:
    if input_shape is not None and tuple(int(s) for s in input_shape) != tuple(
            model.input_shape):
        raise ModelError(
            f"model {spec!r} takes inputs of shape {tuple(model.input_shape)}, "
            f"not {tuple(input_shape)}",
            hint="use data with the model's input shape (--data) or a model made for it",
        )
    if n_classes is not None and int(n_classes) != int(model.n_classes):
        raise ModelError(f"model {spec!r} has {model.n_classes} classes, not {n_classes}",
                         hint="use data with the model's classes (--data) or a model made "
                         "for it")
    return model


def resolve_model(
    spec: str,
    *,
    weights: str | None = None,
    input_shape: Any = None,
    n_classes: int | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Model:
    """Load the model named by ``spec`` (see the module docs for the forms).

    ``input_shape`` is required for TorchScript, ``.skops`` and ``python:`` specs;
    for folders and built-ins it is read from the metadata (and checked when given).
    ``seed`` is accepted so every entry point takes one; loading is deterministic and
    built-in models are always trained with :data:`BUILTIN_SEED` (one model per name).
    """
    from bastion.models.loaders import load_python_module, load_torchscript
    from bastion.models.persist import is_model_folder, load_model, load_skops

    def need_shape(kind: str) -> tuple[int, ...]:
        if input_shape is None:
            raise ModelError(f"{kind} models need an input shape",
                             hint="pass input_shape=, e.g. (1, 28, 28); the CLI takes it "
                             "from --data")
        return tuple(int(s) for s in input_shape)

    if spec.startswith("builtin:"):
        model = load_builtin(spec.split(":", 1)[1], cache_dir=cache_dir, progress=progress)
        return _check_expected(model, input_shape, n_classes, spec)
    if spec.startswith("onnx:") or (spec.endswith(".onnx") and ":" not in spec):
        from bastion.models.onnx_model import load_onnx

        return load_onnx(spec.removeprefix("onnx:"), input_shape=input_shape,
                         n_classes=n_classes)
    if spec.startswith("hf:"):
        from bastion.models.text import load_hf

        return load_hf(spec[3:])  # text: labels are matched by name in the text scan
    if spec.startswith("python:"):
        return load_python_module(spec.split(":", 1)[1], weights=weights,
                                  input_shape=need_shape("python:"), n_classes=n_classes,
                                  bounds=bounds)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(
            f"model {spec!r} not found",
            hint="pass a Bastion model folder, a TorchScript file (.pt/.pth/.ts/.jit), a "
            f".skops file, onnx:FILE.onnx, hf:FOLDER, python:FILE.py:FUNCTION, or builtin:NAME "
            f"({', '.join(BUILTIN_MODELS)})",
        )
    if path.is_dir():
        from bastion.models.text import is_text_model_folder, load_text_model

        if is_text_model_folder(path):
            return load_text_model(path)  # text: labels matched by name in the text scan
        if not is_model_folder(path) and (path / "config.json").is_file():
            raise ModelError(f"{path} looks like a Hugging Face model folder",
                             hint=f"name it hf:{spec}")
        if not is_model_folder(path):
            raise ModelError(f"{path} is a folder but not a Bastion model folder",
                             hint="it needs bastion-model.json; create one with bastion train")
        return _check_expected(load_model(path), input_shape, n_classes, spec)
    if path.suffix == ".skops":
        model = load_skops(path, input_shape=need_shape(".skops"), bounds=bounds)
        return _check_expected(model, None, n_classes, spec)
    if path.suffix in TORCHSCRIPT_SUFFIXES:
        shape = need_shape("TorchScript")
        try:
            return load_torchscript(path, input_shape=shape, bounds=bounds, n_classes=n_classes)
        except ModelError as exc:
            if "not a loadable TorchScript" in exc.message and _looks_like_pickle_checkpoint(
                    path):
                raise ModelError(
                    f"{path} is a pickle-based PyTorch checkpoint, not TorchScript; Bastion "
                    "does not unpickle files it did not create",
                    hint="use python:FILE.py:FUNCTION (a function building the network) "
                    f"with --weights {path} holding a state dict",
                ) from None
            raise
    raise ModelError(
        f"cannot tell what kind of model {path} is (suffix {path.suffix!r})",
        hint="use a Bastion model folder, .pt/.pth/.ts/.jit TorchScript, .skops, "
        "python:FILE.py:FUNCTION or builtin:NAME",
    )
