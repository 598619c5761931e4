"""The ``audit`` jobs, one per ``bastion audit`` command: load the data (and model) from
specs, run the audit of :mod:`bastion.audit`, write ``report.json`` / ``report.html``
(and, for ``data``, the cleaned data) and record an MLflow run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from bastion.errors import BastionError
from bastion.jobs.deadline import run_with_deadline
from bastion.jobs.spec import DeadlineSpec, JobResult, JobSpec, Names, engine_of, ray_engine

Progress = Callable[[str], None] | None


class _AuditSpec(DeadlineSpec):
    data: str
    """Data spec, e.g. ``builtin:digits``, ``mnist:PATH``, ``csv:PATH`` (``--data``)."""
    out: Path
    """Output folder for ``report.json`` and ``report.html`` (created if missing;
    ``--out``)."""
    label_column: str = "label"
    """Label column of CSV/Parquet data (``--label-column``)."""


class AuditDataSpec(_AuditSpec):
    """What ``bastion audit data`` runs: poison / label-noise scores for every training
    sample (every row of a CSV, Parquet or npz file), sanitising, the cleaned data."""

    model: str | None = None
    """Model trained on the data; a white-box one enables spectral signatures and
    activation clustering (``--model``)."""
    detectors: Names | None = None
    """Subset of spectral, activation-clustering, confident-learning, knn, strip (default:
    all that fit the model; ``--detectors``)."""
    use: str = "auto"
    """Which detector decides: a detector name, or ``auto`` / ``combined`` (``--use``)."""
    budget: float | None = None
    """Remove this share of the samples, the most suspicious first (``--budget``; a
    :attr:`threshold` overrides it)."""
    threshold: float | None = None
    """Score threshold instead of a budget (``--threshold``)."""
    mode: str = "remove"
    """``remove`` or ``relabel`` the flagged samples (``--mode``)."""
    id_column: str | None = None
    """CSV/Parquet column of row ids, reported with each flagged row (``--id-column``)."""


class AuditBackdoorSpec(_AuditSpec):
    """What ``bastion audit backdoor`` runs: STRIP and a Neural-Cleanse scan."""

    model: str
    """Model folder, ``.skops`` or ``builtin:NAME`` (``--model``)."""
    checks: Names | None = None
    """``strip``, ``neural-cleanse`` (default: all the model allows; ``--checks``)."""
    fpr: float = Field(default=0.01, gt=0, lt=1)
    """STRIP false-positive rate (``--fpr``)."""
    overlays: int = Field(default=20, ge=1)
    """STRIP overlays per input (``--overlays``)."""
    nc_steps: int = Field(default=200, ge=1)
    """Neural Cleanse steps per class (``--nc-steps``)."""
    limit: int = Field(default=500, ge=1)
    """Test inputs used (``--limit``)."""


class AuditExtractionSpec(_AuditSpec):
    """What ``bastion audit extraction`` runs: how much of the model a query budget
    steals, and what output hardening and PRADA change."""

    model: str
    """Model folder, ``.skops`` or ``builtin:NAME`` (``--model``)."""
    budget: int
    """The attacker's query budget (``--budget``)."""
    epochs: int = Field(default=20, ge=1)
    """Surrogate training epochs (``--epochs``)."""
    prada_delta: float | None = None
    """PRADA alarm threshold on Shapiro-Wilk W (default: calibrated on benign streams;
    ``--prada-delta``)."""


class AuditPrivacySpec(_AuditSpec):
    """What ``bastion audit privacy`` runs: membership inference and model inversion."""

    model: str
    """Model folder, ``.skops`` or ``builtin:NAME``, trained on :attr:`data`'s train split
    (the members; ``--model``)."""
    targets: int = Field(default=500, ge=1)
    """Members and non-members each (``--targets``)."""
    shadows: int = Field(default=4, ge=1)
    """Shadow models (``--shadows``)."""
    shadow_epochs: int = Field(default=20, ge=1)
    """Training epochs per shadow model (``--shadow-epochs``)."""
    attacks: Names | None = None
    """loss-threshold, shadow-models, lira-offline, inversion (default: all that fit;
    ``--attacks``)."""


class AuditPoisonSpec(JobSpec):
    """What ``bastion audit poison`` runs: a poisoned copy of the data (red team)."""

    data: str
    """Data spec to poison, its train part (``--data``)."""
    attack: str
    """``label-flip``, ``badnets`` or ``feature-trigger`` (``--attack``)."""
    rate: float
    """Poison rate, strictly between 0 and 1 (``--rate``)."""
    out: Path
    """Output folder for ``poisoned.npz`` (with ``poison_mask``) and ``poison.json``
    (``--out``)."""
    target: int | None = None
    """Target class (``--target``)."""
    source: int | None = None
    """Source class, optional (``--source``)."""
    patch_size: int = 3
    """BadNets patch side (``--patch-size``)."""
    label_column: str = "label"
    """Label column of CSV/Parquet data (``--label-column``)."""


def _out_dir(out: Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BastionError(f"--out {out} is a file", hint="give a folder path")
    out.mkdir(parents=True, exist_ok=True)
    return out


def audit_data(spec: AuditDataSpec, *, progress: Progress = None) -> JobResult[Any]:
    """Run ``bastion audit data``; returns ``JobResult(DataAuditReport, paths, warnings)``
    (``paths``: ``json``, ``html``; the cleaned data is named in the report)."""
    options = {"detectors": list(spec.detectors) if spec.detectors else None, "use": spec.use,
               "budget": None if spec.threshold is not None else spec.budget,
               "threshold": spec.threshold, "mode": spec.mode, "id_column": spec.id_column}
    return _audit("data", spec, spec.model, options, progress)


def audit_backdoor(spec: AuditBackdoorSpec, *, progress: Progress = None) -> JobResult[Any]:
    """Run ``bastion audit backdoor``; returns ``JobResult(BackdoorAuditReport, ...)``."""
    options = {"checks": list(spec.checks) if spec.checks else None, "fpr": spec.fpr,
               "n_overlays": spec.overlays, "nc_steps": spec.nc_steps, "limit": spec.limit}
    return _audit("backdoor", spec, spec.model, options, progress)


def audit_extraction(spec: AuditExtractionSpec, *,
                     progress: Progress = None) -> JobResult[Any]:
    """Run ``bastion audit extraction``; returns ``JobResult(ExtractionAuditReport, ...)``."""
    options = {"budget": spec.budget, "epochs": spec.epochs, "prada_delta": spec.prada_delta}
    return _audit("extraction", spec, spec.model, options, progress)


def audit_privacy(spec: AuditPrivacySpec, *, progress: Progress = None) -> JobResult[Any]:
    """Run ``bastion audit privacy``; returns ``JobResult(PrivacyAuditReport, ...)``."""
    options = {"n_targets": spec.targets, "n_shadows": spec.shadows,
               "shadow_epochs": spec.shadow_epochs,
               "attacks": list(spec.attacks) if spec.attacks else None}
    return _audit("privacy", spec, spec.model, options, progress)


def audit_poison(spec: AuditPoisonSpec) -> JobResult[Any]:
    """Run ``bastion audit poison``: write ``poisoned.npz`` and ``poison.json``; returns
    ``JobResult(PoisonResult, paths, [])`` (``paths``: ``data``, ``json``; not tracked)."""
    from bastion.audit import poison_dataset
    from bastion.data.loaders import load_data

    engine_of(spec)
    ds = load_data(spec.data, label_column=spec.label_column, seed=spec.seed)
    out = _out_dir(spec.out)
    pr, _, paths = poison_dataset(ds, attack=spec.attack, rate=spec.rate, target=spec.target,
                                  source=spec.source, patch_size=spec.patch_size, out_dir=out,
                                  seed=spec.seed)
    return JobResult(pr, paths, [])


def _metrics(kind: str, report: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    if kind == "data":
        out["n_removed"] = report.n_removed
        out["n_relabelled"] = report.n_relabelled
        for dsum in report.detectors:
            if dsum.recall is not None:
                out[f"recall.{dsum.detector}"] = dsum.recall
    elif kind == "backdoor":
        out["clean_accuracy"] = report.clean_accuracy
        if report.strip:
            out["strip.flagged_share"] = report.strip.flagged_share_test
        if report.neural_cleanse:
            out["nc.max_anomaly_index"] = max(report.neural_cleanse.anomaly_index)
    elif kind == "extraction":
        out["victim_accuracy"] = report.victim_accuracy
        if report.surrogate_curve:
            out["surrogate.fidelity"] = report.surrogate_curve[-1].fidelity
        if report.equation_solving:
            out["equation_solving.fidelity"] = report.equation_solving["fidelity"]
    elif kind == "privacy":
        for a in report.attacks:
            out[f"{a.attack}.auc"] = a.auc
            out[f"{a.attack}.tpr_at_1pct_fpr"] = a.tpr_at_1pct_fpr
    return out


def _audit(kind: str, spec: _AuditSpec, model_spec: str | None, options: dict[str, Any],
           progress: Progress) -> JobResult[Any]:
    # the data audit (streamed Parquet shards) and the privacy audit (shadow models) run
    # on an engine; the others in this process
    connect = ray_engine(spec) if kind in ("data", "privacy") else engine_of(spec)
    if kind == "data" and connect is None and "engine" in spec.model_fields_set:
        # an explicit engine="local" (--engine local): the streamed audit in this process
        def connect() -> Any:
            from bastion.engine.base import get_engine

            return get_engine("local")
    if connect is not None and kind == "data":
        _check_streamable(spec.data, options)  # before anything is written
    return run_with_deadline(
        lambda: _run_audit(kind, spec, model_spec, options, progress, connect),
        timeout=spec.timeout, what=f"audit {kind}", out_dir=spec.out)


def _check_streamable(data_spec: str, options: dict[str, Any]) -> None:
    from bastion.audit.stream import STREAM_DETECTORS

    scheme, _, path = data_spec.partition(":")
    if scheme.strip().lower() != "parquet" or not path:
        raise BastionError(
            f"the data audit on an engine streams Parquet, not {data_spec!r}",
            hint="give parquet:FILE or parquet:FOLDER (of shards), or drop --engine for the "
                 "in-memory audit")
    extra = {k for k, v in options.items()
             if v not in (None, "auto", "remove") and k not in ("id_column", "detectors")}
    wanted = [d for d in (options.get("detectors") or []) if d not in STREAM_DETECTORS]
    if extra or wanted:
        raise BastionError(
            f"the streamed data audit runs spectral signatures and kNN only; "
            f"{', '.join(sorted(extra | set(wanted)))} need the in-memory audit",
            hint="drop those options, or drop --engine")


def _run_streamed_audit(spec: _AuditSpec, model_spec: str | None, options: dict[str, Any],
                        engine: Any) -> JobResult[Any]:
    """``audit data`` on an engine: spectral signatures and kNN over Parquet shards,
    streamed (memory bounded by the batch); a report, no cleaned copy."""
    from bastion._util import model_digest_tag
    from bastion.audit import write_report
    from bastion.audit.stream import audit_data_stream, table_info
    from bastion.models.resolve import resolve_model
    from bastion.registry.tracking import track_run

    out = _out_dir(spec.out)
    path = spec.data.partition(":")[2]
    id_column = options.get("id_column")
    model = None
    if model_spec is not None:
        info = table_info(path, spec.label_column, id_column)
        model = resolve_model(model_spec, input_shape=info["input_shape"],
                              n_classes=info["n_classes"], bounds=info["bounds"],
                              seed=spec.seed)
    params = {"audit": "data", "data": spec.data, "model": model_spec, "seed": spec.seed,
              "engine": getattr(engine, "name", str(engine))}
    with track_run("audit-data", params=params, tracking_uri=spec.tracking_uri,
                   enabled=spec.track) as run:
        report, html, _ = audit_data_stream(path, model, engine=engine,
                                            label_column=spec.label_column,
                                            id_column=id_column, seed=spec.seed,
                                            model_name=model_spec, data_name=spec.data)
        report.warnings.extend(run.warnings)
        paths = write_report(report, html, out)
        run.log_metrics({"n_flagged": float(report.n_flagged), "n_rows": float(report.n_train)})
        run.set_tags(model_digest_tag(model_spec))
        run.log_artifact(out, artifact_path="audit")
    return JobResult(report, {k: Path(v) for k, v in paths.items()}, list(run.warnings))


def _run_audit(kind: str, spec: _AuditSpec, model_spec: str | None, options: dict[str, Any],
               progress: Progress, connect: Any = None) -> JobResult[Any]:
    """Load from specs, run one audit, write the report, track an MLflow run."""
    import numpy as np

    from bastion._util import model_digest_tag, set_seed
    from bastion.audit import (
        audit_backdoor,
        audit_data,
        audit_extraction,
        audit_privacy,
        write_report,
    )
    from bastion.data.loaders import load_data
    from bastion.models.resolve import resolve_model
    from bastion.registry.tracking import track_run

    engine = connect() if connect is not None else None
    if engine is not None and kind == "data":
        return _run_streamed_audit(spec, model_spec, options, engine)
    if engine is not None and kind == "privacy":
        options = {**options, "engine": engine}  # shadow models trained in parallel there
    out = _out_dir(spec.out)
    seed, data_spec = spec.seed, spec.data
    set_seed(seed)
    id_column = options.pop("id_column", None)
    table = data_spec.split(":", 1)[0].strip().lower() in ("csv", "parquet", "npz")
    if kind == "data" and table:  # audit every row of the user's file
        ds = load_data(data_spec, label_column=spec.label_column, seed=seed,
                       id_column=id_column, whole_file=True)
    else:
        ds = load_data(data_spec, label_column=spec.label_column, seed=seed,
                       id_column=id_column)
    model = None
    if model_spec is not None:
        model = resolve_model(model_spec, input_shape=ds.input_shape, n_classes=ds.n_classes,
                              bounds=ds.bounds, seed=seed)
    source = None
    if ":" in data_spec and not data_spec.startswith("builtin:"):
        source = data_spec.split(":", 1)[1]
    params = {"audit": kind, "data": data_spec, "model": model_spec, "seed": seed,
              **{k: v for k, v in options.items() if isinstance(v, int | float | str)}}
    with track_run(f"audit-{kind}", params=params, tracking_uri=spec.tracking_uri,
                   enabled=spec.track) as run:
        common: dict[str, Any] = {"seed": seed, "model_name": model_spec,
                                  "data_name": data_spec, "progress": progress}
        report: Any
        if kind == "data":
            truth = ds.meta.get("poison_mask")  # a poisoned.npz knows its poisons
            if options.get("poison_mask") is None and isinstance(truth, np.ndarray) and \
                    len(truth) == len(ds.y_train):
                options["poison_mask"] = truth
            report, html, _ = audit_data(ds, model, out_dir=out, source_path=source,
                                         **common, **options)
        elif kind == "backdoor":
            report, html = audit_backdoor(model, ds, **common, **options)
        elif kind == "extraction":
            report, html = audit_extraction(model, ds, **common, **options)
        else:
            report, html = audit_privacy(model, ds, **common, **options)
        report.warnings.extend(run.warnings)
        paths = write_report(report, html, out)
        run.log_metrics(_metrics(kind, report))
        run.set_tags(model_digest_tag(model_spec))
        run.log_artifact(out, artifact_path="audit")
    return JobResult(report, {k: Path(v) for k, v in paths.items()}, list(run.warnings))
