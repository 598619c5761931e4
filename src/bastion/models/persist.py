"""Safe persistence: the "Bastion model folder".

A folder holds ``bastion-model.json`` (metadata) and either ``model.safetensors`` (a zoo
torch module, rebuilt from ``arch`` + ``arch_kwargs``) or ``model.skops`` (a
scikit-learn estimator). Nothing is ever unpickled: weights are safetensors, estimators
are skops files whose types are checked against an allowlist before loading.

Folders are written atomically: everything goes into a temporary sibling folder which
is renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bastion._util import ensure_inside, safe_files, write_folder_atomic
from bastion.errors import ModelError
from bastion.models.sklearn_model import SklearnModel
from bastion.models.torch_model import TorchModel
from bastion.models.zoo import ARCHS, build_module

META_FILE = "bastion-model.json"
WEIGHTS_FILE = "model.safetensors"
SKOPS_FILE = "model.skops"
FORMAT = "bastion-model"
FORMAT_VERSION = 1


def _bastion_version() -> str:
    from bastion import __version__

    return __version__


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple | set):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


#: largest bastion-model.json Bastion reads
MAX_META_BYTES = 1024 * 1024
#: most parameters a zoo model rebuilt from metadata may have (400 MB of float32)
MAX_PARAMS = 100_000_000
_MAX_DIM = 65_536
_MAX_VALUES = 1 << 26


def _first_error(exc: Any) -> str:
    e = exc.errors()[0]
    loc = ".".join(str(p) for p in e.get("loc", ())) or "metadata"
    return f"{loc}: {e.get('msg', 'invalid')}" + (
        f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else "")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class _CnnKwargs(_Strict):
    width: int = Field(16, ge=1, le=256)


class _MlpKwargs(_Strict):
    hidden: list[Annotated[int, Field(ge=1, le=16_384)]] = Field(
        default_factory=lambda: [128, 64], max_length=16)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


_ARCH_KWARGS: dict[str, type[BaseModel]] = {"cnn": _CnnKwargs, "wong-cnn": _Strict,
                                            "mlp": _MlpKwargs}


class _ModelMeta(BaseModel):
    """The fields of ``bastion-model.json`` Bastion acts on, with limits."""

    model_config = ConfigDict(extra="allow")
    kind: Literal["torch", "sklearn"]
    arch: str = Field(min_length=1, max_length=200)
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    n_classes: int = Field(ge=2, le=100_000)
    input_shape: tuple[Annotated[int, Field(ge=1, le=_MAX_DIM)], ...] = Field(
        min_length=1, max_length=4)
    bounds: tuple[float, float]
    mean: list[float] | None = Field(None, max_length=_MAX_DIM)
    std: list[float] | None = Field(None, max_length=_MAX_DIM)
    name: str = Field("model", max_length=200)

    @field_validator("arch_kwargs", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _consistent(self) -> _ModelMeta:
        values = 1
        for s in self.input_shape:
            values *= s
        if values > _MAX_VALUES:
            raise ValueError(f"input_shape {self.input_shape} has {values} values per "
                             f"input, more than {_MAX_VALUES}")
        lo, hi = self.bounds
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"bounds must be finite with low < high, got {self.bounds}")
        for field, vals in (("mean", self.mean), ("std", self.std)):
            if vals is not None and len(vals) not in (1, self.input_shape[0]):
                raise ValueError(f"{field} has {len(vals)} values; it needs 1 or one per "
                                 f"channel/feature ({self.input_shape[0]})")
            if vals is not None and not all(math.isfinite(v) for v in vals):
                raise ValueError(f"{field} must be finite")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("std must be positive")
        if self.kind == "torch" and self.arch not in ARCHS:
            raise ValueError(f"arch {self.arch!r} is not a zoo architecture "
                             f"({', '.join(ARCHS)})")
        return self


def _build_checked(arch: str, input_shape: tuple[int, ...], n_classes: int,
                   kwargs: dict[str, Any], source: Path) -> Any:
    """Build the zoo module, first on PyTorch's meta device (no memory) to check its
    size against :data:`MAX_PARAMS`."""
    import torch

    with torch.device("meta"):
        ref = build_module(arch, input_shape=input_shape, n_classes=n_classes, **kwargs)
    n = sum(p.numel() for p in ref.parameters())
    if n > MAX_PARAMS:
        raise ModelError(f"{source}: arch {arch!r} with {kwargs} and input_shape "
                         f"{input_shape} would have {n:,} parameters, more than Bastion "
                         f"loads ({MAX_PARAMS:,})",
                         hint="the metadata was edited or not written by Bastion; save the "
                         "model again")
    return build_module(arch, input_shape=input_shape, n_classes=n_classes, **kwargs)


def is_model_folder(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder holding ``bastion-model.json``."""
    p = Path(path)
    return p.is_dir() and (p / META_FILE).is_file()


def _write_folder(directory: str | os.PathLike[str], write: Any) -> Path:
    """Run ``write(tmp_dir)`` then move ``tmp_dir`` onto ``directory`` atomically."""
    target = Path(directory).expanduser()
    if target.exists():
        if not target.is_dir():
            raise ModelError(f"{target} exists and is not a folder",
                             hint="choose another output path")
        if any(target.iterdir()) and not is_model_folder(target):
            raise ModelError(
                f"{target} is a non-empty folder that is not a Bastion model folder; "
                "refusing to overwrite it",
                hint="choose an empty or new output folder",
            )
    return write_folder_atomic(target, write)


def _meta_json(kind: str, **fields: Any) -> str:
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, **fields,
           "bastion_version": _bastion_version()}
    try:
        return json.dumps(doc, indent=2, default=_json_default) + "\n"
    except TypeError as exc:
        raise ModelError(f"model metadata is not JSON serialisable: {exc}",
                         hint="pass plain numbers, strings, lists and dicts in meta") from None


def save_model(
    model: TorchModel,
    directory: str | os.PathLike[str],
    *,
    arch: str,
    arch_kwargs: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Save a :class:`TorchModel` whose module is a zoo ``arch`` as a Bastion model folder.

    Writes ``model.safetensors`` and ``bastion-model.json`` atomically; refuses to
    overwrite a non-empty folder that is not a Bastion model folder. Returns the path.
    """
    from safetensors.torch import save_file

    if arch not in ARCHS:
        raise ModelError(f"cannot save arch {arch!r}: not a zoo architecture",
                         hint=f"save_model handles {', '.join(ARCHS)}")
    if not isinstance(model, TorchModel):
        raise ModelError(f"save_model needs a TorchModel, got {type(model).__name__}",
                         hint="use save_sklearn for scikit-learn models")
    kwargs = dict(arch_kwargs or {})
    # check the module really is this arch before writing anything
    ref = build_module(arch, input_shape=model.input_shape, n_classes=model.n_classes, **kwargs)
    _check_state_shapes(ref.state_dict(), model.module.state_dict(), arch)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in
               model.module.state_dict().items()}
    text = _meta_json(
        "torch", arch=arch, arch_kwargs=kwargs, n_classes=model.n_classes,
        input_shape=list(model.input_shape), bounds=list(model.bounds), mean=model.mean,
        std=model.std, name=model.name, meta=dict(meta or {}),
    )

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(text, encoding="utf-8")

    return _write_folder(directory, write)


def save_sklearn(
    model: SklearnModel,
    directory: str | os.PathLike[str],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Save a :class:`SklearnModel` as a Bastion model folder (``model.skops`` + JSON)."""
    import skops.io as sio

    if not isinstance(model, SklearnModel):
        raise ModelError(f"save_sklearn needs a SklearnModel, got {type(model).__name__}",
                         hint="use save_model for torch models")
    data = sio.dumps(model.estimator)
    text = _meta_json(
        "sklearn", arch=type(model.estimator).__name__, arch_kwargs={},
        n_classes=model.n_classes, input_shape=list(model.input_shape),
        bounds=list(model.bounds), mean=None, std=None, name=model.name,
        meta=dict(meta or {}),
    )

    def write(tmp: Path) -> None:
        (tmp / SKOPS_FILE).write_bytes(data)
        (tmp / META_FILE).write_text(text, encoding="utf-8")

    return _write_folder(directory, write)


def _check_state_shapes(want: dict[str, Any], got: dict[str, Any], arch: str) -> None:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise ModelError(
            f"weights do not match arch {arch!r}: missing {missing[:5]}, unexpected {extra[:5]}",
            hint="the weights belong to another architecture",
        )
    bad = [f"{k}: {tuple(got[k].shape)} vs {tuple(want[k].shape)}" for k in want
           if tuple(want[k].shape) != tuple(got[k].shape)]
    if bad:
        raise ModelError(
            f"weight shapes do not match arch {arch!r}: {bad[:3]}",
            hint="input_shape, n_classes or arch_kwargs differ from the saved model",
        )


def read_model_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``bastion-model.json`` of a model folder."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise ModelError(f"model folder not found: {d}", hint="check the path")
    path = ensure_inside(d, META_FILE)
    if not path.is_file():
        raise ModelError(f"{d} has no {META_FILE}; it is not a Bastion model folder",
                         hint="save models with bastion train or save_model")
    try:
        size = path.stat().st_size
        if size > MAX_META_BYTES:
            raise ModelError(f"{path} is {size} bytes, more than model metadata can be "
                             f"({MAX_META_BYTES})", hint="save the model again")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelError(f"{path} is corrupt: {exc}",
                         hint="save the model again") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelError(f"{path} is not Bastion model metadata",
                         hint="save the model again with save_model")
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelError(
            f"{path} has format version {doc.get('format_version')}, newer than this "
            f"Bastion understands ({FORMAT_VERSION})",
            hint="upgrade Bastion",
        )
    required = ("kind", "arch", "n_classes", "input_shape", "bounds")
    missing = [k for k in required if k not in doc]
    if missing:
        raise ModelError(f"{path} lacks the fields {missing}", hint="save the model again")
    if doc["kind"] not in ("torch", "sklearn"):
        raise ModelError(f"{path} has unknown kind {doc['kind']!r}",
                         hint="expected 'torch' or 'sklearn'")
    from pydantic import ValidationError

    prefix = ""
    try:
        checked = _ModelMeta.model_validate(doc)
        if checked.kind == "torch":
            prefix = "arch_kwargs."
            _ARCH_KWARGS[checked.arch].model_validate(checked.arch_kwargs)
    except ValidationError as exc:
        raise ModelError(f"{path}: {prefix}{_first_error(exc)}",
                         hint="the metadata was edited or not written by Bastion; save the "
                         "model again with bastion train or save_model") from None
    doc["n_classes"] = checked.n_classes
    doc["input_shape"] = checked.input_shape
    doc["bounds"] = checked.bounds
    doc["arch_kwargs"] = dict(checked.arch_kwargs)
    return doc


def check_model_folder(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a model folder without building anything from it: valid metadata, no link
    or special file inside, its weights file present and, for scikit-learn, a skops file
    that passes the allowlist. Returns the metadata; raises ModelError (or
    UnsafePathError) naming the problem."""
    from bastion.models.skops_check import refused_types

    d = Path(directory).expanduser()
    doc = read_model_meta(d)
    safe_files(d)
    name = SKOPS_FILE if doc["kind"] == "sklearn" else WEIGHTS_FILE
    f = d / name
    if not f.is_file():
        raise ModelError(f"{d} has no {name}", hint="save the model again")
    if doc["kind"] == "sklearn":
        refused = refused_types(f.read_bytes(), f)
        if refused:
            raise ModelError(f"{f} contains what Bastion does not load: "
                             f"{', '.join(refused[:6])}",
                             hint="only listed scikit-learn estimators and NumPy arrays are "
                             "loaded, never functions as parameters")
    return doc


def load_model(directory: str | os.PathLike[str]) -> TorchModel | SklearnModel:
    """Load a Bastion model folder written by :func:`save_model` or :func:`save_sklearn`."""
    d = Path(directory).expanduser()
    doc = read_model_meta(d)
    safe_files(d)  # no link or special file anywhere in the folder
    if doc["kind"] == "sklearn":
        return load_skops(d / SKOPS_FILE, input_shape=doc["input_shape"], bounds=doc["bounds"],
                          n_classes=doc["n_classes"], name=str(doc.get("name", "sklearn")))
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    wpath = d / WEIGHTS_FILE
    if not wpath.is_file():
        raise ModelError(f"{d} has no {WEIGHTS_FILE}", hint="save the model again")
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{wpath} is corrupt: {exc}", hint="save the model again") from None
    kwargs = doc.get("arch_kwargs") or {}
    module = _build_checked(str(doc["arch"]), doc["input_shape"], doc["n_classes"], kwargs,
                            d / META_FILE)
    _check_state_shapes(module.state_dict(), state, str(doc["arch"]))
    module.load_state_dict(state)
    try:
        return TorchModel(
            module, n_classes=doc["n_classes"], input_shape=doc["input_shape"],
            bounds=doc["bounds"], mean=doc.get("mean"), std=doc.get("std"),
            name=str(doc.get("name", "torch")),
        )
    except (RuntimeError, ValueError) as exc:  # e.g. mean/std that do not fit the shape
        raise ModelError(f"{d / META_FILE}: mean/std do not fit input_shape "
                         f"{doc['input_shape']}: {' '.join(str(exc).split())[:200]}",
                         hint="save the model again") from None


def load_skops(
    path: str | os.PathLike[str],
    *,
    input_shape: tuple[int, ...] | list[int],
    bounds: tuple[float, float] = (0.0, 1.0),
    n_classes: int | None = None,
    name: str | None = None,
) -> SklearnModel:
    """Load a bare ``.skops`` file as a :class:`SklearnModel`.

    The file's schema is checked first (:mod:`bastion.models.skops_check`): only an
    explicit list of scikit-learn classes, NumPy arrays/dtypes/scalars and plain
    containers are accepted; functions as values and any other type raise ModelError
    naming them, before anything in the file is constructed.
    """
    import skops.io as sio

    from bastion.models.skops_check import refused_types

    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"skops file not found: {p}", hint="check the path")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {p}: {exc.strerror}", hint="check the path") from None
    refused = refused_types(data, p)  # the same bytes are then given to skops
    if refused:
        raise ModelError(
            f"{p} contains what Bastion does not load: {', '.join(refused[:6])}"
            + (f" and {len(refused) - 6} more" if len(refused) > 6 else ""),
            hint="only listed scikit-learn estimators and NumPy arrays are loaded, never "
            "functions as parameters (FunctionTransformer(func=...)); re-save the model "
            "without them",
        )
    try:
        untrusted = sio.get_untrusted_types(data=data)
        est = sio.loads(data, trusted=list(untrusted))
    except Exception as exc:
        raise ModelError(f"cannot load {p}: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}",
                         hint="the file is corrupt; save the model again") from None
    classes = getattr(est, "classes_", None)
    if n_classes is None:
        if classes is None:
            raise ModelError(f"{p} holds an unfitted or non-classifier {type(est).__name__}",
                             hint="save a fitted classifier")
        n_classes = len(classes)
    return SklearnModel(est, n_classes=int(n_classes), input_shape=tuple(input_shape),
                        bounds=bounds, name=name or p.stem)
