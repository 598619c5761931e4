"""``load_data(spec)``: built-in scikit-learn sets, MNIST (npz or IDX), CSV and Parquet.

A *data spec* is ``SCHEME:ARG``:

- ``builtin:digits`` (1x8x8 images in [0, 1]), ``builtin:breast-cancer``, ``builtin:wine``
  (tables min-max scaled to [0, 1] by a scaler fitted on the train split);
- ``mnist:PATH`` / ``fashion-mnist:PATH``: an ``.npz`` with ``x_train, y_train, x_test,
  y_test`` or a folder with the four IDX files (plain or ``.gz``);
- ``csv:PATH`` / ``parquet:PATH``: one row a sample, numeric feature columns plus a label
  column;
- ``npz:PATH``: any ``.npz`` of plain arrays, ``x_train, y_train, x_test, y_test`` or just
  ``x, y`` (split here), inputs of any shape (``(n, d)`` a table, ``(n, H, W)`` or
  ``(n, C, H, W)`` images). Every data file Bastion writes (``audit poison``'s
  ``poisoned.npz``, the sanitiser's ``cleaned.npz``) reads back this way, with its
  ``bounds``, ``n_classes`` and ``poison_mask`` when saved;
- ``text-csv:PATH``, ``jsonl:PATH`` (``?text=COL&label=COL``) and ``clinc150:PATH``: text
  classification sets (:mod:`bastion.data.text`).

Nothing here unpickles: ``.npz`` files are opened with ``allow_pickle=False``.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from bastion.data.dataset import Dataset
from bastion.data.idx import MAGIC_IMAGES, MAGIC_LABELS, read_idx
from bastion.errors import DataError

SCHEMES = ("builtin", "mnist", "fashion-mnist", "csv", "parquet", "npz", "text-csv", "jsonl",
           "clinc150")
BUILTIN_DATASETS = ("digits", "breast-cancer", "wine")
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                    "Sneaker", "Bag", "Ankle boot"]


def load_data(
    spec: str,
    *,
    label_column: str = "label",
    test_size: float = 0.25,
    seed: int = 0,
    id_column: str | None = None,
    whole_file: bool = False,
) -> Dataset:
    """Load the dataset named by ``spec`` (see the module docs for the forms).

    Args:
        spec: ``SCHEME:ARG``, e.g. ``builtin:digits`` or ``csv:data/train.csv``.
        label_column: the label column for CSV/Parquet.
        test_size: fraction held out for testing (MNIST keeps its own split).
        seed: seed of the stratified train/test split.
        id_column: a CSV/Parquet column of row ids: not a feature; its values are kept
            in ``meta["ids"]`` for reports.
        whole_file: CSV/Parquet and ``npz:`` files of ``x, y``: no split; ``x_train``
            holds every row of the file in file order (``meta["rows"]``: 0 = the first
            row after the header) and ``x_test`` is the same rows (for audits, which must
            see every row). An ``npz:`` file with its own train/test split keeps it.

    Raises:
        DataError: unknown scheme, missing or corrupt file, missing label column,
            non-numeric features, empty data, NaN/Inf.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise DataError(
            f"data spec {spec!r} has no scheme",
            hint=f"use SCHEME:ARG with SCHEME one of {', '.join(SCHEMES)} "
            "(e.g. builtin:digits, csv:data.csv)",
        )
    if not 0.0 < float(test_size) < 1.0:
        raise DataError(f"test_size must be in (0, 1), got {test_size}",
                        hint="e.g. 0.25 holds out a quarter for testing")
    scheme, arg = spec.split(":", 1)
    scheme = scheme.strip().lower()
    if scheme == "builtin":
        return _load_builtin(arg.strip(), test_size=test_size, seed=seed)
    if scheme in ("mnist", "fashion-mnist"):
        return _load_mnist(arg, name=scheme)
    if scheme == "npz":
        if id_column is not None:
            raise DataError("--id-column is for CSV and Parquet files, not npz:",
                            hint="drop --id-column")
        return _load_npz(arg, test_size=test_size, seed=seed, whole_file=whole_file)
    if scheme in ("text-csv", "jsonl", "clinc150"):
        from bastion.data.text import load_text_data

        return load_text_data(scheme, arg, label_column=label_column, test_size=test_size,
                              seed=seed)
    if scheme in ("csv", "parquet"):
        return _load_table(arg, fmt=scheme, label_column=label_column,
                           test_size=test_size, seed=seed, id_column=id_column,
                           whole_file=whole_file)
    if id_column is not None or whole_file:
        raise DataError(f"--id-column and whole-file audits are for CSV and Parquet files, "
                        f"not {scheme}:", hint="drop --id-column")
    raise DataError(f"unknown data scheme {scheme!r} in {spec!r}",
                    hint=f"valid schemes: {', '.join(SCHEMES)}")


# ---------------------------------------------------------------- helpers


def _split(
    x: np.ndarray, y: np.ndarray, *, test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified split (plain shuffle split when a class has fewer than 2 samples)."""
    from sklearn.model_selection import train_test_split

    n = len(x)
    n_test = int(np.ceil(test_size * n))
    if n < 2 or n_test < 1 or n - n_test < 1:
        raise DataError(f"only {n} samples: too few to split into train and test",
                        hint="provide more rows or change test_size")
    counts = np.bincount(y)
    classes = int((counts > 0).sum())
    stratify = y if counts[counts > 0].min() >= 2 and n_test >= classes and (
        n - n_test) >= classes else None
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=stratify
    )
    return x_tr, y_tr, x_te, y_te


def _check_finite(x: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        raise DataError(f"{what} contains {int(bad.sum())} NaN or infinite values",
                        hint="drop or impute the missing values first")


def _minmax(
    x_tr: np.ndarray, x_te: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    lo = x_tr.min(axis=0)
    hi = x_tr.max(axis=0)
    scale = np.where(hi > lo, hi - lo, 1.0)
    tr = ((x_tr - lo) / scale).astype(np.float32)
    te = ((x_te - lo) / scale).astype(np.float32)
    n_clipped = int(((te < 0) | (te > 1)).sum())
    te = np.clip(te, 0.0, 1.0)
    meta = {
        "scaler": "minmax",
        "scaler_min": lo.astype(float).tolist(),
        "scaler_scale": scale.astype(float).tolist(),
        "n_test_values_clipped": n_clipped,
    }
    return tr, te, meta


# ---------------------------------------------------------------- builtin


def _load_builtin(name: str, *, test_size: float, seed: int) -> Dataset:
    from sklearn import datasets as skd

    if name == "digits":
        d = skd.load_digits()
        x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
        y = d.target.astype(np.int64)
        x_tr, y_tr, x_te, y_te = _split(x, y, test_size=test_size, seed=seed)
        return Dataset(
            name="digits", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
            n_classes=10, bounds=(0.0, 1.0), kind="image",
            class_names=[str(i) for i in range(10)],
            meta={"source": "builtin:digits", "test_size": test_size, "seed": seed},
        )
    loaders = {"breast-cancer": skd.load_breast_cancer, "wine": skd.load_wine}
    if name not in loaders:
        raise DataError(f"unknown built-in dataset {name!r}",
                        hint=f"valid: {', '.join('builtin:' + b for b in BUILTIN_DATASETS)}")
    d = loaders[name]()
    x = np.asarray(d.data, dtype=np.float64)
    y = np.asarray(d.target, dtype=np.int64)
    x_tr, y_tr, x_te, y_te = _split(x, y, test_size=test_size, seed=seed)
    x_tr, x_te, meta = _minmax(x_tr, x_te)
    meta.update({"source": f"builtin:{name}", "test_size": test_size, "seed": seed})
    return Dataset(
        name=name, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
        n_classes=len(d.target_names), bounds=(0.0, 1.0), kind="tabular",
        feature_names=[str(f) for f in d.feature_names],
        class_names=[str(c) for c in d.target_names], meta=meta,
    )


# ---------------------------------------------------------------- MNIST


def _load_mnist(arg: str, *, name: str) -> Dataset:
    path = Path(arg).expanduser()
    if not path.exists():
        raise DataError(f"{name} data not found at {path}",
                        hint="pass an .npz file or a folder with the four IDX files")
    if path.is_dir():
        parts = _read_idx_folder(path)
    else:
        parts = _read_npz(path)
    x_tr, y_tr, x_te, y_te = (parts[k] for k in _NPZ_KEYS)
    out: dict[str, np.ndarray] = {}
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if x.ndim == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise DataError(f"{name} {split} images have shape {x.shape}; expected (n, 28, 28)",
                            hint="check the file holds MNIST-format images")
        if len(x) == 0:
            raise DataError(f"{name} {split} split is empty", hint="check the file")
        y = np.asarray(y).reshape(-1)
        if len(y) != len(x):
            raise DataError(f"{name} {split} has {len(x)} images but {len(y)} labels",
                            hint="the files do not belong together")
        if x.dtype == np.uint8:
            xf = x.astype(np.float32) / 255.0
        else:
            xf = x.astype(np.float32)
            _check_finite(xf, f"{name} {split} images")
            if xf.min() < 0 or xf.max() > 255:
                raise DataError(f"{name} {split} images have values outside [0, 255]",
                                hint="expected uint8 pixels")
            if xf.max() > 1.0:
                xf = xf / 255.0
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9:
            raise DataError(f"{name} {split} labels must be integers in [0, 9]",
                            hint="check the label file")
        out["x_" + split] = xf[:, None, :, :]
        out["y_" + split] = y.astype(np.int64)
    return Dataset(
        name=name, x_train=out["x_train"], y_train=out["y_train"], x_test=out["x_test"],
        y_test=out["y_test"], n_classes=10, bounds=(0.0, 1.0), kind="image",
        class_names=_FASHION_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)],
        meta={"source": f"{name}:{path}"},
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The four MNIST-layout arrays of an ``.npz`` (read by :func:`_read_npz_any`, which
    refuses pickles and turns a bad file into one line)."""
    z = _read_npz_any(path)
    missing = [k for k in _NPZ_KEYS if k not in z]
    if missing:
        raise DataError(f"{path} lacks the keys {missing} (has {sorted(z)})",
                        hint="the .npz must hold x_train, y_train, x_test, y_test")
    return {k: z[k] for k in _NPZ_KEYS}


_IDX_PATTERNS = {
    "x_train": (r"train[-_.]images[-_.]idx3[-_.]ubyte", MAGIC_IMAGES),
    "y_train": (r"train[-_.]labels[-_.]idx1[-_.]ubyte", MAGIC_LABELS),
    "x_test": (r"t10k[-_.]images[-_.]idx3[-_.]ubyte", MAGIC_IMAGES),
    "y_test": (r"t10k[-_.]labels[-_.]idx1[-_.]ubyte", MAGIC_LABELS),
}


def _read_idx_folder(folder: Path) -> dict[str, np.ndarray]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    out: dict[str, np.ndarray] = {}
    for key, (pattern, magic) in _IDX_PATTERNS.items():
        rx = re.compile(rf"^{pattern}(\.gz)?$")
        match = [p for p in files if rx.match(p.name)]
        if not match:
            raise DataError(
                f"no {pattern.replace('[-_.]', '-')}[.gz] file in {folder} "
                f"(found {[p.name for p in files][:10]})",
                hint="the folder needs train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (plain or .gz)",
            )
        out[key] = read_idx(match[0], expect_magic=magic)
    return out


# ---------------------------------------------------------------- generic npz

_NPZ_OPTIONAL = ("bounds", "n_classes", "poison_mask")


def _read_npz_any(path: Path) -> dict[str, np.ndarray]:
    """Every array of a plain ``.npz`` (no pickles), or a one-line DataError."""
    with open(path, "rb") as fh:
        if fh.read(2) != b"PK":  # np.load would take any other file for a pickle
            raise DataError(f"cannot read {path}: not an .npz (zip) file",
                            hint="write it with np.savez(PATH, x=..., y=...)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(f"{path} holds pickled objects, which Bastion will not load",
                            hint="save plain numeric arrays with np.savez") from None
        raise DataError(f"cannot read {path}: {exc}",
                        hint="the file is corrupt or not an .npz; write it again") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"cannot read {path}: {exc}",
                        hint="the file is corrupt, truncated or not an .npz") from None


def _npz_inputs(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype.kind not in "biuf" or x.ndim < 2:
        raise DataError(f"{what} has dtype {x.dtype} and shape {x.shape}; expected numbers "
                        "shaped (n, d), (n, H, W) or (n, C, H, W)",
                        hint="save the inputs as a numeric array, one row per sample")
    if x.ndim == 3:  # (n, H, W) grey images
        x = x[:, None]
    xf = x.astype(np.float32)
    _check_finite(xf, what)
    return xf


def _npz_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise DataError(f"{what} has {len(y)} labels for {n} inputs",
                        hint="the arrays do not belong together")
    if y.dtype.kind == "f" and np.isfinite(y).all() and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu" or (len(y) and y.min() < 0):
        raise DataError(f"{what} must hold class indices (integers >= 0), got {y.dtype}",
                        hint="encode the labels as 0..K-1")
    return y.astype(np.int64)


def _load_npz(arg: str, *, test_size: float, seed: int, whole_file: bool = False) -> Dataset:
    path = Path(arg).expanduser()
    if not path.is_file():
        raise DataError(f"npz file not found: {path}", hint="check the path")
    z = _read_npz_any(path)
    mask = None
    if all(k in z for k in _NPZ_KEYS):
        x_tr = _npz_inputs(z["x_train"], f"{path.name} x_train")
        x_te = _npz_inputs(z["x_test"], f"{path.name} x_test")
        y_tr = _npz_labels(z["y_train"], len(x_tr), f"{path.name} y_train")
        y_te = _npz_labels(z["y_test"], len(x_te), f"{path.name} y_test")
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise DataError(f"{path.name}: x_train inputs are {x_tr.shape[1:]} but x_test "
                            f"inputs are {x_te.shape[1:]}", hint="the splits do not match")
        if "poison_mask" in z and len(z["poison_mask"]) == len(y_tr):
            mask = z["poison_mask"].astype(bool)
        split_meta: dict[str, Any] = {}
    elif "x" in z and "y" in z:
        x = _npz_inputs(z["x"], f"{path.name} x")
        y = _npz_labels(z["y"], len(x), f"{path.name} y")
        if whole_file:  # every row, in file order (audits)
            x_tr, y_tr, x_te, y_te = x, y, x, y
            split_meta = {"rows": np.arange(len(y)), "whole_file": True}
        else:
            x_tr, y_tr, x_te, y_te = _split(x, y, test_size=test_size, seed=seed)
            split_meta = {"test_size": test_size, "seed": seed}
    else:
        raise DataError(f"{path} lacks the arrays x_train, y_train, x_test, y_test (or x, y); "
                        f"it has {sorted(z)}",
                        hint="save them with np.savez(PATH, x_train=..., y_train=..., "
                        "x_test=..., y_test=...)")
    if len(x_tr) == 0 or len(x_te) == 0:
        raise DataError(f"{path.name} has an empty train or test split",
                        hint="both splits need samples")
    if z.get("n_classes") is not None and z["n_classes"].size == 1:
        n_classes = int(z["n_classes"])
    else:
        n_classes = int(max(y_tr.max(), y_te.max())) + 1
    if max(y_tr.max(), y_te.max()) >= n_classes or n_classes < 2:
        raise DataError(f"{path.name}: labels reach {int(max(y_tr.max(), y_te.max()))} but "
                        f"n_classes is {n_classes}", hint="labels must be in 0..n_classes-1")
    if z.get("bounds") is not None and z["bounds"].size == 2:
        bounds = (float(z["bounds"].ravel()[0]), float(z["bounds"].ravel()[1]))
    elif z["x_train" if "x_train" in z else "x"].dtype == np.uint8:
        x_tr, x_te, bounds = x_tr / np.float32(255), x_te / np.float32(255), (0.0, 1.0)
    else:
        lo = float(min(x_tr.min(), x_te.min()))
        hi = float(max(x_tr.max(), x_te.max()))
        bounds = (0.0, 1.0) if lo >= 0.0 and hi <= 1.0 else (lo, hi if hi > lo else lo + 1.0)
    kind = "image" if x_tr.ndim == 4 else "tabular"
    meta: dict[str, Any] = {"source": f"npz:{path}", **split_meta}
    if mask is not None:
        meta["poison_mask"] = mask  # ground truth of a poisoned.npz, for the data audit
    return Dataset(
        name=path.stem, x_train=x_tr.astype(np.float32), y_train=y_tr,
        x_test=x_te.astype(np.float32), y_test=y_te, n_classes=n_classes, bounds=bounds,
        kind=kind, class_names=[str(i) for i in range(n_classes)], meta=meta,
    )


# ---------------------------------------------------------------- CSV / Parquet


def _load_table(
    arg: str, *, fmt: str, label_column: str, test_size: float, seed: int,
    id_column: str | None = None, whole_file: bool = False,
) -> Dataset:
    import pandas as pd

    path = Path(arg).expanduser()
    if not path.is_file():
        raise DataError(f"{fmt} file not found: {path}", hint="check the path")
    try:
        df = pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty", hint="the file has no rows or header") from None
    except Exception as exc:
        raise DataError(f"cannot read {fmt} file {path}: {type(exc).__name__}: {exc}",
                        hint=f"the file is corrupt or not {fmt}") from None
    if label_column not in df.columns:
        raise DataError(
            f"label column {label_column!r} not in {path.name}; columns: "
            f"{[str(c) for c in df.columns]}",
            hint="name the label column with label_column= (--label-column)",
        )
    if len(df) == 0:
        raise DataError(f"{path} has no rows", hint="the file holds only a header")
    ids: list[str] | None = None
    if id_column is not None:
        if id_column not in df.columns or id_column == label_column:
            raise DataError(
                f"id column {id_column!r} not in {path.name} (or it is the label column); "
                f"columns: {[str(c) for c in df.columns]}",
                hint="name the id column with --id-column")
        ids = [str(v) for v in df[id_column].tolist()]
    feats = df.drop(columns=[label_column] + ([id_column] if id_column else []))
    if feats.shape[1] == 0:
        raise DataError(f"{path} has no feature columns besides {label_column!r}",
                        hint="add numeric feature columns")
    non_numeric = [
        str(c) for c in feats.columns
        if not (pd.api.types.is_numeric_dtype(feats[c]) or pd.api.types.is_bool_dtype(feats[c]))
    ]
    if non_numeric:
        raise DataError(f"non-numeric feature columns in {path.name}: {non_numeric}",
                        hint="encode them as numbers or drop them; an id column: "
                        "name it with --id-column")
    x = feats.to_numpy(dtype=np.float64)
    _check_finite(x, f"{path.name} features")
    labels = df[label_column]
    if labels.isna().any():
        raise DataError(f"{int(labels.isna().sum())} missing labels in column {label_column!r}",
                        hint="drop the unlabelled rows")
    if pd.api.types.is_numeric_dtype(labels) and not pd.api.types.is_bool_dtype(labels):
        lv = labels.to_numpy()
        if np.issubdtype(lv.dtype, np.floating) and not np.all(lv == np.round(lv)):
            raise DataError(f"label column {label_column!r} holds non-integer numbers",
                            hint="labels must be class indices or class names")
        lv = lv.astype(np.int64)
        uniq = np.unique(lv)
        # labels 0..k-1 stay as they are; any other integers map to their rank
        y = lv if np.array_equal(uniq, np.arange(len(uniq))) else np.searchsorted(
            uniq, lv).astype(np.int64)
        class_names = [str(int(u)) for u in uniq]
    else:
        sv = labels.astype(str).to_numpy()
        uniq_s = np.unique(sv)
        y = np.searchsorted(uniq_s, sv).astype(np.int64)
        class_names = [str(u) for u in uniq_s]
    n_classes = len(class_names)
    if n_classes < 2:
        raise DataError(f"label column {label_column!r} has only one class",
                        hint="a classifier needs at least two classes")
    meta: dict[str, Any] = {"source": f"{fmt}:{path}", "test_size": test_size, "seed": seed,
                            "label_column": label_column}
    if whole_file:  # every row, in file order
        x_tr, y_tr, x_te, y_te = x, y, x, y
        meta.update({"rows": np.arange(len(y)), "whole_file": True})
        meta.pop("test_size")
        if ids is not None:
            meta["ids"] = ids
    else:
        x_tr, y_tr, x_te, y_te = _split(x, y, test_size=test_size, seed=seed)
    x_tr, x_te = x_tr.astype(np.float32), x_te.astype(np.float32)  # bounds from what we return
    if x_tr.min() >= 0.0 and x_tr.max() <= 1.0:
        bounds = (0.0, 1.0)
    else:
        lo, hi = float(x_tr.min()), float(x_tr.max())
        bounds = (lo, hi if hi > lo else lo + 1.0)
    n_clipped = int(((x_te < bounds[0]) | (x_te > bounds[1])).sum())
    meta["n_test_values_clipped"] = n_clipped
    x_te = np.clip(x_te, np.float32(bounds[0]), np.float32(bounds[1]))
    return Dataset(
        name=path.stem, x_train=x_tr.astype(np.float32), y_train=y_tr,
        x_test=x_te.astype(np.float32), y_test=y_te, n_classes=n_classes, bounds=bounds,
        kind="tabular", feature_names=[str(c) for c in feats.columns],
        class_names=class_names, meta=meta,
    )
