"""Saving hardened models, including the wrappers, without pickle.

- A retrained network (adversarial training, distillation, noise training) is an
  ordinary Bastion model folder (:func:`bastion.models.persist.save_model`), with the
  defense recorded under ``meta.defense``.
- A wrapper (feature squeezing, randomized smoothing, an ensemble) is a folder holding
  ``bastion-defense.json`` (its kind and settings) and one Bastion model folder per
  member (``member-0``, ...). The whole folder is written into a temporary sibling and
  renamed into place, so a crash never leaves half a model.

:func:`load_hardened` reads either form back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bastion._util import safe_files, write_folder_atomic
from bastion.errors import ModelError
from bastion.models.persist import (
    META_FILE,
    is_model_folder,
    load_model,
    read_model_meta,
    save_model,
    save_sklearn,
)
from bastion.models.sklearn_model import SklearnModel
from bastion.models.torch_model import TorchModel
from bastion.models.zoo import ARCHS, build_module

DEFENSE_FILE = "bastion-defense.json"
FORMAT = "bastion-defense"
FORMAT_VERSION = 1


def infer_arch(model: TorchModel, *, hint: tuple[str, dict[str, Any]] | None = None
               ) -> tuple[str, dict[str, Any]] | None:
    """The zoo ``(arch, arch_kwargs)`` whose weights match ``model``'s, or ``None``."""
    want = {k: tuple(v.shape) for k, v in model.module.state_dict().items()}
    tries: list[tuple[str, dict[str, Any]]] = [hint] if hint else []
    tries += [(a, {}) for a in ARCHS]
    for arch, kw in tries:
        try:
            ref = build_module(arch, input_shape=model.input_shape,
                               n_classes=model.n_classes, **kw)
        except Exception:
            continue
        if {k: tuple(v.shape) for k, v in ref.state_dict().items()} == want:
            return arch, dict(kw)
    return None


def is_hardened_folder(path: str | os.PathLike[str]) -> bool:
    """True for a wrapper folder written by :func:`save_hardened`."""
    return (Path(path) / DEFENSE_FILE).is_file()


def check_saveable(model: Any, *, hint: tuple[str, dict[str, Any]] | None = None) -> None:
    """Raise before any work when ``model`` (or a member) could not be saved."""
    for m in _members(model):
        if isinstance(m, SklearnModel):
            continue
        if not isinstance(m, TorchModel) or infer_arch(m, hint=hint) is None:
            raise ModelError(
                f"the model {getattr(m, 'name', type(m).__name__)!r} is not a zoo "
                "architecture, so the hardened model could not be saved as a Bastion "
                "model folder",
                hint=f"train it from the zoo ({', '.join(ARCHS)}), or run without an "
                "output folder from Python",
            )


def _members(model: Any) -> list[Any]:
    from bastion.defend.ensemble import EnsembleModel
    from bastion.defend.smoothing import SmoothedClassifier
    from bastion.defend.squeeze import FeatureSqueezing

    if isinstance(model, EnsembleModel):
        return list(model.members)
    if isinstance(model, FeatureSqueezing | SmoothedClassifier):
        return [model.base]
    return [model]


def _save_member(m: Any, directory: Path, meta: dict[str, Any],
                 hint: tuple[str, dict[str, Any]] | None) -> None:
    if isinstance(m, SklearnModel):
        save_sklearn(m, directory, meta=meta)
        return
    found = infer_arch(m, hint=hint)
    if found is None:
        check_saveable(m)
    assert found is not None
    save_model(m, directory, arch=found[0], arch_kwargs=found[1], meta=meta)


def save_hardened(model: Any, directory: str | os.PathLike[str], *,
                  meta: dict[str, Any] | None = None,
                  arch_hint: tuple[str, dict[str, Any]] | None = None) -> Path:
    """Save a hardened model (network or wrapper) into ``directory``; returns the path."""
    from bastion.defend.ensemble import EnsembleModel
    from bastion.defend.smoothing import SmoothedClassifier
    from bastion.defend.squeeze import FeatureSqueezing

    target = Path(directory).expanduser()
    meta = dict(meta or {})
    if target.exists() and any(target.iterdir()) and not (
            is_model_folder(target) or is_hardened_folder(target)):
        raise ModelError(f"{target} is a non-empty folder that is not a Bastion model "
                         "folder; refusing to overwrite it", hint="choose another folder")
    if isinstance(model, EnsembleModel):
        kind, settings = "ensemble", {"combine": model.combine, "vote": model.vote,
                                      "name": model.name}
    elif isinstance(model, FeatureSqueezing):
        kind, settings = "squeeze", model.settings()
    elif isinstance(model, SmoothedClassifier):
        kind = "smooth"
        settings = {**model.settings(), "eot_samples": getattr(model, "eot_samples", None)}
    else:
        check_saveable(model, hint=arch_hint)
        # a plain network: an ordinary model folder
        found = infer_arch(model, hint=arch_hint)
        assert found is not None
        return save_model(model, target, arch=found[0], arch_kwargs=found[1],
                          meta={"defense": meta})
    members = _members(model)
    check_saveable(model, hint=arch_hint)
    def write(tmp: Path) -> None:
        names = []
        for i, m in enumerate(members):
            name = f"member-{i}"
            _save_member(m, tmp / name, {"defense_member_of": kind}, arch_hint)
            names.append(name)
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
               "settings": settings, "members": names, "n_classes": int(model.n_classes),
               "input_shape": list(model.input_shape), "bounds": list(model.bounds),
               "meta": meta}
        (tmp / DEFENSE_FILE).write_text(json.dumps(doc, indent=2, default=str) + "\n",
                                        encoding="utf-8")

    return write_folder_atomic(target, write)


def load_hardened(directory: str | os.PathLike[str]) -> Any:
    """Load what :func:`save_hardened` wrote (a model folder or a wrapper folder)."""
    from bastion.defend.ensemble import EnsembleModel
    from bastion.defend.smoothing import smooth
    from bastion.defend.squeeze import FeatureSqueezing

    d = Path(directory).expanduser()
    if not is_hardened_folder(d):
        return load_model(d)
    safe_files(d)  # no link or special file anywhere in the wrapper folder
    path = d / DEFENSE_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        kind, settings, names = doc["kind"], dict(doc["settings"]), list(doc["members"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelError(f"{path} is corrupt: {exc}", hint="save the model again") from None
    if doc.get("format") != FORMAT or int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelError(f"{path} is not a defense description this Bastion can read",
                         hint="save the model again or upgrade Bastion")
    for n in names:
        if "/" in n or "\\" in n or n.startswith(".") or not (d / n / META_FILE).is_file():
            raise ModelError(f"{path} names a member {n!r} that is not a model folder in {d}",
                             hint="save the model again")
        read_model_meta(d / n)
    members: list[Any] = [load_model(d / n) for n in names]
    if kind == "ensemble":
        return EnsembleModel(members, combine=settings.get("combine", "prob"),
                             vote=bool(settings.get("vote", False)),
                             name=str(settings.get("name", "ensemble")))
    if kind == "squeeze":
        return FeatureSqueezing(members[0], bits=settings.get("bits"),
                                median=settings.get("median"),
                                bpda=bool(settings.get("bpda", True)))
    if kind == "smooth":
        kw = {k: settings[k] for k in ("sigma", "n0", "n", "alpha", "n_predict", "seed")
              if k in settings}
        if settings.get("eot_samples"):
            kw["eot_samples"] = settings["eot_samples"]
        return smooth(members[0], **kw)
    raise ModelError(f"{path} has unknown defense kind {kind!r}",
                     hint="expected ensemble, squeeze or smooth")
