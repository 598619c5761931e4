"""Text datasets: ``text-csv:PATH``, ``jsonl:PATH`` and ``clinc150:PATH``.

A text :class:`~bastion.data.dataset.Dataset` has ``kind="text"``; ``x_train``/``x_test``
are 1-d object arrays of strings and the labels are class indices into ``class_names``.

Options follow the path after ``?``, as ``NAME=VALUE`` joined by ``&``:

- ``text-csv:PATH?text=COLUMN&label=COLUMN`` and ``jsonl:PATH?text=KEY&label=KEY``:
  the text and label columns (defaults ``text`` and ``label``; ``label_column=``, the CLI's
  ``--label-column``, sets the label too). The rows are split into train and test
  (stratified, ``test_size``, ``seed``), or by the file's own split column with
  ``?split=COLUMN``: rows whose value is ``train`` or ``test`` go there, other rows (e.g.
  ``validation``) are left out.
- ``clinc150:PATH`` reads CLINC150's ``data_full.json`` (Larson et al., 2019: 150 intents
  plus out-of-scope queries, the job an agent's router does) with its own train and test
  splits; out-of-scope queries are the class ``oos``. ``?oos=0`` drops them;
  ``?intents=K`` keeps the first K intents by name (small runs and tests).

Nothing here evaluates code: CSV through pandas, JSON lines through ``json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from bastion.data.dataset import Dataset
from bastion.errors import DataError

TEXT_SCHEMES = ("text-csv", "jsonl", "clinc150")
MAX_TEXT_FILE = 512 * 1024 * 1024


def _options(arg: str, allowed: tuple[str, ...], scheme: str) -> tuple[str, dict[str, str]]:
    path, _, query = arg.partition("?")
    opts = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    bad = [k for k in opts if k not in allowed]
    if bad:
        raise DataError(f"unknown option {bad[0]!r} for {scheme}:",
                        hint=f"options: {', '.join(allowed)} (e.g. {scheme}:PATH?"
                        f"{allowed[0]}=...)")
    return path, opts


def _file(path: str, scheme: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{scheme} file not found: {p}", hint="check the path")
    if p.stat().st_size > MAX_TEXT_FILE:
        raise DataError(f"{p} is larger than {MAX_TEXT_FILE >> 20} MiB",
                        hint="split the file or sample it")
    return p


def _labels(values: list[Any], column: str) -> tuple[np.ndarray, list[str]]:
    names = sorted({str(v) for v in values})
    if len(names) < 2:
        raise DataError(f"label column {column!r} has only one class",
                        hint="a classifier needs at least two classes")
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[str(v)] for v in values], dtype=np.int64), names


def _texts(values: list[Any], column: str, where: str) -> np.ndarray:
    bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
    if bad:
        raise DataError(f"{where}: {len(bad)} rows have an empty or non-text {column!r} "
                        f"(first at row {bad[0]})", hint="drop or fill those rows")
    return np.array(values, dtype=object)


def _split_text(x: np.ndarray, y: np.ndarray, *, test_size: float, seed: int) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from bastion.data.loaders import _split

    idx = np.arange(len(x))
    i_tr, y_tr, i_te, y_te = _split(idx, y, test_size=test_size, seed=seed)
    return x[i_tr], y_tr, x[i_te], y_te


def _table(rows: list[dict[str, Any]], *, text: str, label: str, where: str, name: str,
           source: str, test_size: float, seed: int, split: str | None = None) -> Dataset:
    if not rows:
        raise DataError(f"{where} has no rows", hint="the file is empty")
    cols = sorted({k for r in rows[:100] for k in r})
    for what, col, opt in (("text", text, "text"), ("label", label, "label")):
        if not all(col in r for r in rows):
            missing = sum(col not in r for r in rows)
            raise DataError(f"{what} column {col!r} missing in {missing} of {len(rows)} rows "
                            f"of {where}; columns: {cols[:20]}",
                            hint=f"name it with ?{opt}=COLUMN after the path"
                            + (" or --label-column" if what == "label" else ""))
    if split is not None:
        rows = _own_split(rows, split, where)
    labels = [r[label] for r in rows]
    if any(v is None or (isinstance(v, float) and v != v) for v in labels):
        raise DataError(f"{where}: missing labels in column {label!r}",
                        hint="drop the unlabelled rows")
    x = _texts([r[text] for r in rows], text, where)
    y, names = _labels(labels, label)
    if split is not None:
        te = np.array([str(r[split]).strip().lower() == "test" for r in rows])
        x_tr, y_tr, x_te, y_te = x[~te], y[~te], x[te], y[te]
    else:
        x_tr, y_tr, x_te, y_te = _split_text(x, y, test_size=test_size, seed=seed)
    return Dataset(name=name, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                   n_classes=len(names), kind="text", class_names=names,
                   meta={"source": source, "text_column": text, "label_column": label,
                         "split_column": split, "test_size": None if split else test_size,
                         "seed": seed})


def _own_split(rows: list[dict[str, Any]], column: str, where: str) -> list[dict[str, Any]]:
    """The rows whose ``column`` says ``train`` or ``test``; one of each at least."""
    missing = sum(column not in r for r in rows)
    if missing:
        raise DataError(f"split column {column!r} missing in {missing} of {len(rows)} rows "
                        f"of {where}", hint="every row needs a split value (train or test), "
                        "or drop ?split= to split at random")
    kept = [r for r in rows if str(r[column]).strip().lower() in ("train", "test")]
    n_test = sum(str(r[column]).strip().lower() == "test" for r in kept)
    if n_test == 0 or n_test == len(kept):
        raise DataError(f"split column {column!r} of {where} has {len(kept) - n_test} train "
                        f"and {n_test} test rows", hint="it needs the values train and test; "
                        "drop ?split= to split at random")
    return kept


def load_text_data(scheme: str, arg: str, *, label_column: str = "label",
                   test_size: float = 0.25, seed: int = 0) -> Dataset:
    """Load a text dataset (see the module docs)."""
    if scheme == "clinc150":
        return _clinc(arg)
    path, opts = _options(arg, ("text", "label", "split"), scheme)
    p = _file(path, scheme)
    text = opts.get("text", "text")
    label = opts.get("label", label_column)
    split = opts.get("split") or None
    source = f"{scheme}:{arg}"
    if scheme == "text-csv":
        import pandas as pd

        try:
            df = pd.read_csv(p, dtype=str, keep_default_na=False, na_values=[])
        except pd.errors.EmptyDataError:
            raise DataError(f"{p} is empty", hint="the file has no rows or header") from None
        except Exception as exc:
            raise DataError(f"cannot read CSV file {p}: {type(exc).__name__}: {exc}",
                            hint="the file is corrupt or not CSV") from None
        for what, col, opt in (("text", text, "text"), ("label", label, "label")):
            if col not in df.columns:
                raise DataError(f"{what} column {col!r} not in {p.name}; columns: "
                                f"{[str(c) for c in df.columns][:20]}",
                                hint=f"name it with ?{opt}=COLUMN after the path"
                                + (" or --label-column" if what == "label" else ""))
        if split is not None and split not in df.columns:
            raise DataError(f"split column {split!r} not in {p.name}; columns: "
                            f"{[str(c) for c in df.columns][:20]}",
                            hint="name it with ?split=COLUMN, or drop ?split= to split at "
                            "random")
        rows = df[[text, label] + ([split] if split else [])].to_dict("records")
        rows = [{k: (None if k == label and v == "" else v) for k, v in r.items()}
                for r in rows]
    else:
        rows = []
        with open(p, encoding="utf-8", errors="strict") as fh:
            try:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{p.name} line {n} is not JSON: {exc.msg}",
                                        hint="one JSON object per line") from None
                    if not isinstance(obj, dict):
                        raise DataError(f"{p.name} line {n} is not a JSON object",
                                        hint="one JSON object per line, e.g. "
                                        '{"text": "...", "label": "..."}')
                    rows.append(obj)
            except UnicodeDecodeError:
                raise DataError(f"{p} is not UTF-8 text", hint="save it as UTF-8") from None
    return _table(rows, text=text, label=label, where=p.name, name=p.stem, source=source,
                  test_size=test_size, seed=seed, split=split)


def _clinc(arg: str) -> Dataset:
    path, opts = _options(arg, ("oos", "intents"), "clinc150")
    p = _file(path, "clinc150")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{p} is not CLINC150 JSON: {exc}",
                        hint="pass data_full.json from clinc/oos-eval") from None
    need = ("train", "test")
    if not isinstance(doc, dict) or any(not isinstance(doc.get(k), list) for k in need):
        raise DataError(f"{p} lacks CLINC150's train and test lists",
                        hint="pass data_full.json from clinc/oos-eval")
    oos = opts.get("oos", "1") not in ("0", "false", "no")
    try:
        k_intents = int(opts["intents"]) if "intents" in opts else None
    except ValueError:
        raise DataError(f"intents={opts['intents']!r} is not a number",
                        hint="e.g. clinc150:PATH?intents=20") from None
    if k_intents is not None and k_intents < 2:
        raise DataError("intents must be at least 2", hint="e.g. ?intents=20")
    splits: dict[str, list[tuple[str, str]]] = {}
    for split in need:
        pairs = list(doc[split]) + (list(doc.get(f"oos_{split}") or []) if oos else [])
        try:
            splits[split] = [(str(q), str(i)) for q, i in pairs]
        except (TypeError, ValueError):
            raise DataError(f"{p}: {split} is not a list of [query, intent] pairs",
                            hint="pass data_full.json from clinc/oos-eval") from None
    names = sorted({i for _, i in splits["train"] if i != "oos"})
    if k_intents is not None:
        names = names[:k_intents]
    if oos:
        names.append("oos")
    index = {n: j for j, n in enumerate(names)}
    parts = {}
    for split, pairs in splits.items():
        kept = [(q, index[i]) for q, i in pairs if i in index]
        parts[split] = (np.array([q for q, _ in kept], dtype=object),
                        np.array([j for _, j in kept], dtype=np.int64))
    return Dataset(name="clinc150", x_train=parts["train"][0], y_train=parts["train"][1],
                   x_test=parts["test"][0], y_test=parts["test"][1], n_classes=len(names),
                   kind="text", class_names=names,
                   meta={"source": f"clinc150:{arg}", "oos": oos,
                         "intents": len(names) - int(oos)})
