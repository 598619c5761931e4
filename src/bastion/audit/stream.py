"""The data audit streamed over Parquet shards, for training sets larger than memory.

:func:`audit_data_stream` reads a Parquet file or a folder of Parquet shards batch by
batch through an engine (:mod:`bastion.engine`; Ray Data on a Ray cluster, a loop over
``pyarrow`` batches locally): each batch becomes compact per-sample features (the model's
penultimate features, or the raw row without a model) and its labels. Input memory is
one batch per worker; only the features (``n x d`` float32) and labels are kept. Then:

- **spectral signatures** (Tran et al. 2018): per-class top singular vector of the
  features, score = squared robust z of the projection (fitted on the driver);
- **kNN label agreement**: the share of a sample's ``k`` nearest neighbours (in feature
  space) with another label, scored over fixed row shards on the engine's workers (the
  features go once into the object store).

The shards are the same on every engine and every computation is deterministic, so a
local and a Ray run give the same report. Confident learning (cross-validated training
on all rows), STRIP (random overlays drawn from the whole set) and activation clustering
need the whole set in memory: use the in-memory ``bastion audit data`` for them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from bastion.audit.reports import DataAuditReport, DetectorSummary
from bastion.errors import DataError

#: rows per kNN scoring task: fixed, so the shards are the same on every engine
KNN_SHARD_ROWS = 2048
STREAM_DETECTORS = ("spectral", "knn")


def parquet_files(source: str | Path) -> list[str]:
    """A Parquet file, or the ``*.parquet`` shards of a folder (sorted by name)."""
    p = Path(source).expanduser()
    if p.is_symlink():
        raise DataError(f"{p} is a symbolic link", hint="give the real path")
    if p.is_dir():
        files = sorted(f for f in p.iterdir()
                       if f.suffix.lower() in (".parquet", ".pq") and not f.is_symlink()
                       and f.is_file())
        if not files:
            raise DataError(f"no .parquet files in {p}", hint="give a Parquet file or a "
                            "folder of Parquet shards")
        return [str(f) for f in files]
    if not p.is_file():
        raise DataError(f"{p} does not exist", hint="give a Parquet file or a folder of shards")
    return [str(p)]


def _columns(paths: list[str], label_column: str, id_column: str | None) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schemas = [pq.read_schema(f) for f in paths]
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"cannot read the Parquet files: {exc}",
                        hint="check that every shard is a Parquet file") from None
    names = schemas[0].names
    for f, s in zip(paths, schemas, strict=True):
        if s.names != names:
            raise DataError(f"{Path(f).name} has other columns than {Path(paths[0]).name}",
                            hint="every shard needs the same columns")
    if label_column not in names:
        raise DataError(f"no label column {label_column!r} in the Parquet data",
                        hint=f"pass --label-column; columns: {', '.join(names[:10])}")
    cols = [n for n in names if n not in (label_column, id_column)
            and (pa.types.is_integer(schemas[0].field(n).type)
                 or pa.types.is_floating(schemas[0].field(n).type))]
    if not cols:
        raise DataError("the Parquet data has no numeric feature columns")
    return cols


def table_info(source: str | Path, label_column: str = "label",
               id_column: str | None = None) -> dict[str, Any]:
    """What a model loader needs to know of Parquet data without loading its rows: the
    feature columns, the number of classes (reads the label column only) and the value
    range (from the files' column statistics, else 0..1)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    paths = parquet_files(source)
    cols = _columns(paths, label_column, id_column)
    n_classes, lo, hi = 2, np.inf, -np.inf
    for f in paths:
        pf = pq.ParquetFile(f)
        labels = pf.read(columns=[label_column]).column(0)
        mx = pc.max(labels).as_py()
        n_classes = max(n_classes, int(mx) + 1 if mx is not None else 2)
        names = pf.schema_arrow.names
        for g in range(pf.metadata.num_row_groups):
            rg = pf.metadata.row_group(g)
            for c in cols:
                st = rg.column(names.index(c)).statistics
                if st is not None and st.has_min_max:
                    lo, hi = min(lo, float(st.min)), max(hi, float(st.max))
    bounds = (lo, hi) if np.isfinite(lo) and np.isfinite(hi) and hi > lo else (0.0, 1.0)
    return {"paths": paths, "columns": cols, "n_classes": n_classes, "bounds": bounds,
            "input_shape": (len(cols),)}


def _featurize(batch: dict[str, Any], *, model: Any, columns: list[str],
               label_column: str) -> dict[str, Any]:
    """One batch of rows -> features and labels (runs on an engine worker)."""
    x = np.column_stack([np.asarray(batch[c], dtype=np.float32) for c in columns])
    y = np.asarray(batch[label_column])
    if not np.isfinite(x).all():
        raise DataError("the Parquet data has NaN or infinite feature values",
                        hint="drop or impute those rows first")
    if model is not None:
        from bastion.detect.poison import extract_features

        shape = tuple(int(s) for s in model.input_shape)
        if int(np.prod(shape)) != x.shape[1]:
            raise DataError(f"the rows have {x.shape[1]} features but the model takes "
                            f"inputs of shape {shape}", hint="use the model the data is for")
        f = extract_features(model, x.reshape(len(x), *shape), what="the streamed audit")
    else:
        f = x
    return {"f": np.asarray(f, dtype=np.float32), "y": y.astype(np.int64)}


def _knn_shard(rows: tuple[int, int], *, ref: np.ndarray, y: np.ndarray,
               k: int) -> np.ndarray:
    """kNN label disagreement of rows ``[a, b)`` against every sample (one engine task)."""
    from sklearn.neighbors import NearestNeighbors

    a, b = rows
    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(ref)
    idx = nn.kneighbors(ref[a:b], return_distance=False)[:, 1:]
    return (y[idx] != y[a:b, None]).mean(1)


def audit_data_stream(
    source: str | Path,
    model: Any = None,
    *,
    engine: Any = None,
    label_column: str = "label",
    id_column: str | None = None,
    k: int = 10,
    batch_size: int = 4096,
    seed: int = 0,
    model_name: str | None = None,
    data_name: str | None = None,
) -> tuple[DataAuditReport, str, dict[str, np.ndarray]]:
    """Audit the rows of Parquet ``source`` (a file or a folder of shards) for poisons and
    label noise, streamed through ``engine`` (local by default). Returns ``(report, html,
    scores)`` with ``scores`` per detector, one per row in file order."""
    from bastion.audit.core import CLEAN_FLAG_RATE, _data_verdict, _decide, _rank01
    from bastion.detect.poison import SpectralSignatureDetector

    if engine is None:
        from bastion.engine import LocalEngine

        engine = LocalEngine()
    if int(k) < 1 or int(batch_size) < 1:
        raise DataError("k and the batch size must be at least 1")
    t0 = time.perf_counter()
    paths = parquet_files(source)
    cols = _columns(paths, label_column, id_column)
    feats = engine.map_batches(_featurize, paths, columns=[*cols, label_column],
                               batch_size=int(batch_size),
                               shared={"model": model, "columns": cols,
                                       "label_column": label_column})
    f, y = feats.get("f"), feats.get("y")
    if f is None or len(f) < 2:
        raise DataError("the Parquet data has fewer than two rows")
    if (y < 0).any():
        raise DataError("labels must be integers >= 0")
    n = len(y)
    n_classes = int(max(int(y.max()) + 1, getattr(model, "n_classes", 0) or 0))
    summaries: list[DetectorSummary] = []
    scores: dict[str, np.ndarray] = {}

    t = time.perf_counter()
    scores["spectral"] = SpectralSignatureDetector(model=None).fit_score(f, y)
    summaries.append(DetectorSummary(detector="spectral", needs=(
        "white-box features" if model is not None else "data only"),
        flagged=int(_decide("spectral", None, scores["spectral"]).sum()),
        time_s=time.perf_counter() - t))

    t = time.perf_counter()
    ref = f.astype(np.float64)
    if model is None:  # tabular rows: scale each column (as the in-memory kNN does)
        ref = (ref - ref.mean(0)) / (ref.std(0) + 1e-8)
    kk = min(int(k), n - 1)
    shards = [(a, min(a + KNN_SHARD_ROWS, n)) for a in range(0, n, KNN_SHARD_ROWS)]
    scores["knn"] = np.concatenate(engine.map(_knn_shard, shards,
                                              shared={"ref": ref, "y": y, "k": kk}))
    summaries.append(DetectorSummary(detector="knn", needs="data only",
                                     flagged=int(_decide("knn", None, scores["knn"]).sum()),
                                     time_s=time.perf_counter() - t))
    for s in summaries:
        order = np.argsort(-scores[s.detector], kind="stable")
        s.top_indices = [int(i) for i in order[: min(50, s.flagged)]]

    flags = _decide("spectral", None, scores["spectral"]) | _decide("knn", None, scores["knn"])
    combined = np.mean([_rank01(s) for s in scores.values()], axis=0)
    n_flagged = int(flags.sum())
    verdict, abnormal = _data_verdict(n_flagged, n)
    flagged_idx = np.flatnonzero(flags)
    flagged_idx = flagged_idx[np.argsort(-combined[flagged_idx], kind="stable")]
    report = DataAuditReport(
        command="audit data (streamed)", model=model_name, data=data_name or str(source),
        seed=seed, n_train=n, n_classes=n_classes,
        class_counts=[int(c) for c in np.bincount(y, minlength=n_classes)],
        detectors=summaries, combined_detector="combined", mode="report", n_removed=0,
        n_relabelled=0, verdict=verdict, abnormal=abnormal, n_flagged=n_flagged,
        clean_flag_rate=CLEAN_FLAG_RATE, whole_file=True,
        skipped={d: "needs the whole set in memory: run the in-memory audit (no --engine)"
                 for d in ("confident-learning", "strip", "activation-clustering")},
        flagged_rows=[{"index": int(i), "row": int(i), "label": int(y[i]),
                       "score": round(float(combined[i]), 6),
                       "spectral": round(float(scores["spectral"][i]), 4),
                       "knn": round(float(scores["knn"][i]), 4)} for i in flagged_idx[:1000]],
        time_s=time.perf_counter() - t0,
    )
    return report, _html(report, getattr(engine, "name", "local"), len(paths)), scores


def _html(report: DataAuditReport, engine: str, n_files: int) -> str:
    from bastion.reporting.html import HtmlPage

    page = HtmlPage("Data audit (streamed)",
                    subtitle=f"{report.data} - {report.n_train} rows in {n_files} file(s) - "
                             f"engine {engine}")
    page.heading("Verdict")
    (page.bad if report.abnormal else page.good)(report.verdict)
    page.heading("Detectors")
    page.table([[d.detector, d.needs, d.flagged, f"{d.time_s:.2f}"] for d in report.detectors],
               ["detector", "needs", "flagged", "time (s)"])
    if report.flagged_rows:
        page.heading("Flagged rows (most suspicious first)")
        page.table([[r["row"], r["label"], r["spectral"], r["knn"]]
                    for r in report.flagged_rows[:100]],
                   ["row", "label", "spectral (z^2)", "kNN disagreement"])
    page.heading("Not run")
    page.table([[k, v] for k, v in report.skipped.items()], ["detector", "why"])
    return page.render()
