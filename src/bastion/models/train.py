"""Plain (undefended) training: ``train_classifier`` and ``train_from_spec``.

Training happens in input space through ``TorchModel.logits``, so the adapter's
normalisation is part of the trained function, exactly as attacks will see it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

from bastion.data.validate import check_inputs, check_labels
from bastion.errors import DataError, ModelError
from bastion.models.sklearn_model import SklearnModel
from bastion.models.torch_model import TorchModel

#: architectures trained with scikit-learn instead of torch
SKLEARN_ARCHS = ("logreg",)


def _accuracy(model: TorchModel, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = torch.cat([model.logits(torch.from_numpy(x[i : i + 1024])).argmax(1)
                          for i in range(0, len(x), 1024)]).numpy()
    return float((pred == y).mean())


def train_classifier(
    model: TorchModel,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    weight_decay: float = 0.0,
    label_smoothing: float = 0.0,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``model`` in place with Adam and cross-entropy; deterministic under ``seed``.

    Inputs are checked first (shape, bounds, NaN/Inf, labels), so bad data stops the
    run before any weight changes. The module is left in ``eval()`` mode.

    Returns:
        ``{"loss": [...], "train_acc": [...], "val_acc": [...], "epochs": n}``, one
        value per epoch (``val_acc`` is empty without validation data).
    """
    xs = check_inputs(x, input_shape=model.input_shape, bounds=model.bounds, name="training inputs")
    ys = check_labels(y, n_classes=model.n_classes, n=len(xs))
    xv = yv = None
    if x_val is not None or y_val is not None:
        if x_val is None or y_val is None:
            raise DataError("pass both x_val and y_val, or neither",
                            hint="validation needs inputs and labels")
        xv = check_inputs(x_val, input_shape=model.input_shape, bounds=model.bounds,
                          name="validation inputs")
        yv = check_labels(y_val, n_classes=model.n_classes, n=len(xv))
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ModelError(f"bad training settings: epochs={epochs}, batch_size={batch_size}, "
                         f"lr={lr}", hint="epochs and batch_size must be >= 1, lr > 0")
    history: dict[str, Any] = {"loss": [], "train_acc": [], "val_acc": [], "epochs": epochs}
    module = model.module
    xt, yt = torch.from_numpy(xs), torch.from_numpy(ys)
    n = len(xt)
    bar = None
    if progress and sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(console=Console(stderr=True), transient=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        task = None
        if bar is not None:
            bar.start()
            task = bar.add_task("training", total=epochs)
        try:
            for _ in range(epochs):
                module.train()
                perm = torch.randperm(n, generator=g)
                total, correct, seen = 0.0, 0, 0
                for i in range(0, n, batch_size):
                    b = perm[i : i + batch_size]
                    xb, yb = xt[b], yt[b]
                    opt.zero_grad(set_to_none=True)
                    out = model.logits(xb)
                    loss = loss_fn(out, yb)
                    if not torch.isfinite(loss):
                        raise ModelError("training diverged (loss is NaN or infinite)",
                                         hint="lower the learning rate")
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(b)
                    correct += int((out.detach().argmax(1) == yb).sum())
                    seen += len(b)
                module.eval()
                history["loss"].append(total / seen)
                history["train_acc"].append(correct / seen)
                if xv is not None and yv is not None:
                    history["val_acc"].append(_accuracy(model, xv, yv))
                if bar is not None and task is not None:
                    bar.update(task, advance=1)
                logging.getLogger("bastion.progress.tick").info(
                    "train: epoch %d/%d, loss %.4f", len(history["loss"]), epochs,
                    history["loss"][-1])
        finally:
            module.eval()
            if bar is not None:
                bar.stop()
    return history


def _normalisation(x: np.ndarray, kind: str, bounds: tuple[float, float]) -> tuple[
        list[float] | None, list[float] | None]:
    """Per-channel mean/std for images; none for [0,1] tables; per-feature otherwise."""
    if kind == "image":
        axes = tuple(i for i in range(x.ndim) if i != 1)
        mean = x.mean(axis=axes)
        std = np.maximum(x.std(axis=axes), 1e-6)
        return mean.astype(float).tolist(), std.astype(float).tolist()
    if bounds == (0.0, 1.0):
        return None, None
    flat = x.reshape(len(x), -1)
    return (flat.mean(axis=0).astype(float).tolist(),
            np.where(flat.std(axis=0) > 1e-6, flat.std(axis=0), 1.0).astype(float).tolist())


def train_from_spec(
    arch: str,
    data_spec: str,
    out_dir: str | os.PathLike[str] | None,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int = 128,
    seed: int = 0,
    label_column: str = "label",
    progress: bool = False,
    arch_kwargs: dict[str, Any] | None = None,
    name: str | None = None,
) -> tuple[TorchModel | SklearnModel, dict[str, Any]]:
    """Load ``data_spec``, build ``arch``, train, evaluate and save to ``out_dir``.

    ``arch`` is a zoo architecture (``cnn``, ``wong-cnn``, ``mlp``), ``logreg``
    (scikit-learn ``LogisticRegression``, saved with skops) or ``text-intent`` (text data:
    MiniLM layers and a head, :func:`bastion.models.text.train_text_from_spec`).
    ``epochs``/``lr`` default to 10 and 1e-3 (text-intent: its own). ``out_dir=None`` skips
    saving. Returns ``(model, metrics)``; metrics are also stored in the folder's meta.
    """
    from bastion._util import set_seed
    from bastion.data.loaders import load_data
    from bastion.models.persist import save_model, save_sklearn
    from bastion.models.zoo import ARCHS, build_module

    if arch == "text-intent":  # the text zoo model (bastion.models.text)
        from bastion.models.text import train_text_from_spec

        text_kw = {k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}
        return train_text_from_spec(data_spec, out_dir, seed=seed,  # type: ignore[return-value]
                                    label_column=label_column, progress=progress,
                                    **text_kw)
    epochs = 10 if epochs is None else epochs
    lr = 1e-3 if lr is None else lr
    if arch not in ARCHS and arch not in SKLEARN_ARCHS:
        raise ModelError(f"unknown architecture {arch!r}",
                         hint=f"valid: {', '.join(ARCHS + SKLEARN_ARCHS + ('text-intent',))}")
    ds = load_data(data_spec, label_column=label_column, seed=seed)
    if arch in ("cnn", "wong-cnn") and ds.kind != "image":
        raise ModelError(
            f"arch {arch!r} needs image data but {data_spec!r} is {ds.kind} "
            f"(inputs shaped {ds.input_shape})",
            hint="use --model mlp (or logreg) for tabular data",
        )
    model_name = name or f"{ds.name}-{arch}"
    base_meta: dict[str, Any] = {"data": data_spec, "dataset": ds.name, "seed": seed,
                                 "n_train": len(ds.x_train), "n_test": len(ds.x_test),
                                 "class_names": ds.class_names,
                                 "feature_names": ds.feature_names, "kind": ds.kind}
    if arch == "logreg":
        from sklearn.linear_model import LogisticRegression

        est = LogisticRegression(max_iter=2000, random_state=seed)
        est.fit(ds.x_train.reshape(len(ds.x_train), -1), ds.y_train)
        skm = SklearnModel(est, n_classes=ds.n_classes, input_shape=ds.input_shape,
                           bounds=ds.bounds, name=model_name)
        metrics = {
            **base_meta, "arch": arch,
            "train_accuracy": float((skm.predict_proba(ds.x_train).argmax(1)
                                     == ds.y_train).mean()),
            "test_accuracy": float((skm.predict_proba(ds.x_test).argmax(1)
                                    == ds.y_test).mean()),
        }
        skm.queries = 0
        if out_dir is not None:
            save_sklearn(skm, out_dir, meta={"metrics": metrics})
        return skm, metrics
    set_seed(seed)
    kwargs = dict(arch_kwargs or {})
    module = build_module(arch, input_shape=ds.input_shape, n_classes=ds.n_classes, **kwargs)
    mean, std = _normalisation(ds.x_train, ds.kind, ds.bounds)
    model = TorchModel(module, n_classes=ds.n_classes, input_shape=ds.input_shape,
                       bounds=ds.bounds, mean=mean, std=std, name=model_name)
    history = train_classifier(model, ds.x_train, ds.y_train, epochs=epochs, lr=lr,
                               batch_size=batch_size, seed=seed, x_val=ds.x_test,
                               y_val=ds.y_test, progress=progress)
    metrics = {
        **base_meta, "arch": arch, "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "train_accuracy": _accuracy(model, ds.x_train, ds.y_train),
        "test_accuracy": _accuracy(model, ds.x_test, ds.y_test),
        "history": history,
    }
    if out_dir is not None:
        save_model(model, out_dir, arch=arch, arch_kwargs=kwargs, meta={"metrics": metrics})
    return model, metrics
