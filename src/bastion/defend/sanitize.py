"""Sanitise a training set from per-sample suspicion scores: remove or relabel.

:func:`sanitize` picks the suspicious samples (the top ``budget`` share, or every score
above ``threshold``) and returns a cleaned :class:`~bastion.data.dataset.Dataset` and a
log saying, for every sample it touched, its index, score, detector and reason.
:func:`write_sanitized` writes the cleaned data as a new ``.npz`` (atomically, inside the
output folder) plus ``removed.csv`` and ``removed.json``. Neither function ever writes to,
moves or deletes the user's original data file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bastion._util import atomic_path, write_json_atomic, write_text_atomic
from bastion.data.dataset import Dataset
from bastion.errors import BastionError, DataError


@dataclass
class RemovalEntry:
    """One sample the sanitiser removed or relabelled."""

    index: int
    score: float
    detector: str
    reason: str
    label: int
    new_label: int | None = None

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass
class SanitizeResult:
    """The cleaned dataset, the log, and which original training samples were kept."""

    dataset: Dataset
    log: list[RemovalEntry]
    kept: np.ndarray
    flagged: np.ndarray
    mode: str
    threshold: float
    params: dict[str, object] = field(default_factory=dict)

    @property
    def n_flagged(self) -> int:
        return int(self.flagged.sum())


def select(scores: np.ndarray, *, budget: float | None = None,
           threshold: float | None = None) -> tuple[np.ndarray, float]:
    """Boolean mask of the samples to act on, and the effective threshold."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or len(s) == 0:
        raise DataError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise DataError("scores contain NaN or Inf")
    if budget is not None and threshold is not None:
        raise BastionError("give a removal budget or a threshold, not both")
    if threshold is not None:
        return s > float(threshold), float(threshold)
    b = 0.05 if budget is None else float(budget)
    if not 0.0 < b < 1.0:
        raise BastionError(f"the removal budget must be in (0, 1), got {budget}",
                           hint="e.g. 0.05 removes at most 5% of the training set")
    n = int(np.floor(b * len(s)))
    mask = np.zeros(len(s), dtype=bool)
    if n == 0:
        return mask, float("inf")
    order = np.argsort(-s, kind="stable")[:n]
    mask[order] = True
    return mask, float(s[order[-1]])


def sanitize(
    ds: Dataset,
    scores: np.ndarray,
    *,
    budget: float | None = None,
    threshold: float | None = None,
    mode: str = "remove",
    detector: str = "detector",
    new_labels: np.ndarray | None = None,
    reason: str | None = None,
    flags: np.ndarray | None = None,
) -> SanitizeResult:
    """Remove (or relabel) the suspicious training samples of ``ds``.

    Args:
        ds: the dataset; only its training part is cleaned.
        scores: one suspicion score per training sample (higher = more suspicious).
        budget: act on the top ``budget`` share of samples (default 0.05), or
        threshold: act on every sample scoring above it.
        mode: ``"remove"`` or ``"relabel"`` (needs ``new_labels``, e.g. a label-noise
            detector's ``suggested_labels_``).
        detector: the detector's name, for the log.
        new_labels: labels to assign in relabel mode.
        reason: why, for the log (default: the score vs the threshold).
        flags: act on exactly these samples (a boolean mask the detectors decided),
            instead of a budget or threshold.

    Returns:
        A :class:`SanitizeResult`; ``ds`` itself is not modified.
    """
    if mode not in ("remove", "relabel"):
        raise BastionError(f"unknown sanitise mode {mode!r}", hint="use remove or relabel")
    s = np.asarray(scores, dtype=np.float64)
    if len(s) != len(ds.y_train):
        raise DataError(f"{len(s)} scores for {len(ds.y_train)} training samples")
    if flags is not None:
        flagged = np.asarray(flags, dtype=bool)
        if flagged.shape != s.shape:
            raise DataError(f"flags has shape {flagged.shape}; expected {s.shape}")
        thr = float(s[flagged].min()) if flagged.any() else float("inf")
        how = "flagged by the detectors' own decision"
    else:
        flagged, thr = select(s, budget=budget, threshold=threshold)
        how = f"budget {budget if budget is not None else 0.05}" if threshold is None else (
            f"threshold {threshold}")
    idx = np.flatnonzero(flagged)
    log: list[RemovalEntry] = []
    y_tr = ds.y_train.copy()
    if mode == "relabel":
        if new_labels is None:
            raise BastionError("relabel mode needs new_labels",
                               hint="use a label-noise detector's suggested_labels_, "
                               "or mode='remove'")
        nl = np.asarray(new_labels).astype(np.int64)
        if nl.shape != y_tr.shape:
            raise DataError(f"new_labels has shape {nl.shape}; expected {y_tr.shape}")
        if (nl < 0).any() or (nl >= ds.n_classes).any():
            raise DataError("new_labels hold classes outside the dataset's range")
    for i in idx:
        why = reason or (f"score {s[i]:.4g}; {how}" if flags is not None else
                         f"score {s[i]:.4g} in the top suspicious samples ({how})")
        if mode == "relabel":
            new = int(nl[i])
            if new == int(y_tr[i]):
                continue  # nothing to change
            log.append(RemovalEntry(int(i), float(s[i]), detector,
                                    f"{why}; relabelled {int(y_tr[i])} -> {new}",
                                    int(y_tr[i]), new))
            y_tr[i] = new
        else:
            log.append(RemovalEntry(int(i), float(s[i]), detector, why, int(y_tr[i])))
    if mode == "remove":
        kept = ~flagged
        x_new, y_new = ds.x_train[kept], ds.y_train[kept]
    else:
        kept = np.ones(len(y_tr), dtype=bool)
        x_new, y_new = ds.x_train.copy(), y_tr
    if len(y_new) == 0:
        raise BastionError("sanitising would remove every training sample",
                           hint="use a smaller budget or a higher threshold")
    meta = dict(ds.meta)
    meta["sanitized"] = {"detector": detector, "mode": mode, "n_changed": len(log),
                         "threshold": thr}
    clean = dataclasses.replace(ds, name=f"{ds.name}-sanitized", x_train=x_new,
                                y_train=y_new, meta=meta)
    return SanitizeResult(clean, log, kept, flagged, mode, thr,
                          {"budget": budget, "threshold": threshold, "detector": detector})


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def write_sanitized(
    result: SanitizeResult,
    out_dir: str | os.PathLike[str],
    *,
    source_path: str | os.PathLike[str] | None = None,
    name: str = "cleaned.npz",
    rows: np.ndarray | None = None,
    ids: list[str] | None = None,
) -> dict[str, Path]:
    """Write the cleaned data and the log into ``out_dir``.

    Files: ``cleaned.npz`` (``x_train, y_train, x_test, y_test``, ``bounds``,
    ``n_classes``; loadable as ``npz:PATH``), ``removed.csv`` and ``removed.json``. Each
    is written to a temporary file and renamed. ``source_path`` (the user's original
    data file, when there is one) is never written: a target that is, or would
    overwrite, it is refused.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BastionError(f"{out} is a file", hint="give a folder for the cleaned data")
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    if source_path is not None:
        src = Path(source_path)
        if _same_file(target, src) or target.resolve() == src.resolve():
            raise BastionError(
                f"writing {target} would overwrite the original data {src}",
                hint="choose another output folder; the original is never modified",
            )
    ds = result.dataset
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            bounds = np.asarray(ds.bounds, dtype=np.float64)
            n_classes = np.asarray(ds.n_classes)
            if rows is not None:  # every row of a file was audited: x, y, split on reading
                np.savez_compressed(fh, x=ds.x_train, y=ds.y_train, bounds=bounds,
                                    n_classes=n_classes)
            else:
                np.savez_compressed(fh, x_train=ds.x_train, y_train=ds.y_train,
                                    x_test=ds.x_test, y_test=ds.y_test, bounds=bounds,
                                    n_classes=n_classes)
    buf = io.StringIO()
    w = csv.writer(buf)
    head = ["index", "score", "detector", "reason", "label", "new_label"]
    w.writerow(head + (["row"] if rows is not None else []) + (["id"] if ids else []))
    entries = []
    for e in result.log:
        d = e.as_dict()
        if rows is not None:
            d["row"] = int(rows[e.index])
        if ids:
            d["id"] = ids[e.index]
        entries.append(d)
        w.writerow([e.index, f"{e.score:.6g}", e.detector, e.reason, e.label,
                    "" if e.new_label is None else e.new_label]
                   + ([d["row"]] if rows is not None else []) + ([d["id"]] if ids else []))
    write_text_atomic(out / "removed.csv", buf.getvalue())
    write_json_atomic(out / "removed.json", {
        "mode": result.mode, "threshold": result.threshold, "params": result.params,
        "n_train_before": int(len(result.kept)), "n_train_after": int(len(ds.y_train)),
        "entries": entries,
    })
    return {"data": target, "csv": out / "removed.csv", "json": out / "removed.json"}
