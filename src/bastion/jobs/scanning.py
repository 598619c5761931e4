"""The ``scan`` job: a worst-case robustness scan from a model spec and a data spec to
``report.json`` / ``report.html`` and an MLflow run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import field_validator

from bastion.errors import BastionError
from bastion.jobs.deadline import run_with_deadline
from bastion.jobs.spec import DeadlineSpec, JobResult, Names, Numbers, ray_engine


def load_any_model(spec: str, **kwargs: Any) -> Any:
    """Resolve ``spec`` like :func:`bastion.models.resolve_model`, and also load the
    wrapper folders that ``bastion harden`` writes for squeezing, smoothing and ensembles
    (they live in ``bastion.defend``, which the models layer may not import)."""
    from bastion.defend.persist import is_hardened_folder, load_hardened
    from bastion.models import resolve_model

    if is_hardened_folder(Path(spec).expanduser()):
        return load_hardened(spec)
    return resolve_model(spec, **kwargs)


class ScanSpec(DeadlineSpec):
    """What ``bastion scan`` runs. Defaults are the CLI's."""

    model: str
    """Model folder, TorchScript, ``.skops``, ``python:FILE.py:FUNCTION`` or
    ``builtin:NAME`` (``--model``); also the wrapper folders ``bastion harden`` writes."""
    data: str
    """Data spec, e.g. ``builtin:digits``, ``mnist:PATH``, ``csv:PATH``, ``parquet:PATH``;
    the test split is scanned (``--data``)."""
    out: Path
    """Output folder for ``report.json`` and ``report.html`` (created if missing;
    ``--out``)."""
    preset: str = "standard"
    """``quick``, ``standard`` (AutoAttack's cascade) or ``thorough`` (``--preset``)."""
    norm: str = "linf"
    """Threat model: ``linf`` or ``l2`` (``--norm``)."""
    epsilons: Numbers = (0.05, 0.1, 0.2)
    """Budgets, in input units; sorted ascending (``--eps``)."""
    attacks: Names | None = None
    """Attacks run as a cascade instead of the preset's (``--attacks``)."""
    limit: int | None = None
    """Scan the first N test points only (``--limit``)."""
    weights: str | None = None
    """State dict for a ``python:FILE:FN`` model (``--weights``)."""
    label_column: str = "label"
    """Label column of CSV/Parquet data (``--label-column``)."""
    attack_options: dict[str, dict[str, Any]] = {}
    """Per-attack options, ``{"apgd-ce": {"steps": 50}}`` (``--set apgd-ce.steps=50``)."""

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str) -> str:
        from bastion.evaluate.presets import check_preset

        return check_preset(v)

    @field_validator("norm")
    @classmethod
    def _norm(cls, v: str) -> str:
        from bastion.attacks.base import check_norm

        return check_norm(v)

    @field_validator("epsilons")
    @classmethod
    def _epsilons(cls, v: Sequence[float]) -> tuple[float, ...]:
        from bastion.attacks.base import check_epsilons

        return tuple(check_epsilons(v))

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise BastionError(f"--limit must be at least 1, got {v}")
        return v


def scan(spec: ScanSpec, *, progress: bool = False) -> JobResult[Any]:
    """Scan ``spec.model`` on the test split of ``spec.data`` and write the report.

    Returns ``JobResult(report, paths, warnings)``: the
    :class:`~bastion.evaluate.report.ScanReport`, ``paths`` with keys ``json`` and
    ``html``, and the MLflow warnings. Everything is validated before anything is written:
    on a bad model, bad data or bad options a :class:`~bastion.errors.BastionError` is
    raised and ``spec.out`` is left untouched. A failing MLflow store only adds to the
    warnings; the report is written first. ``progress`` draws Rich progress bars (a terminal).
    """
    connect = ray_engine(spec)  # None: the scan runs in this process
    return run_with_deadline(lambda: _scan(spec, progress, connect), timeout=spec.timeout,
                             what="scan", out_dir=spec.out)


def _scan(spec: ScanSpec, progress: bool, connect: Any = None) -> JobResult[Any]:
    from bastion._util import model_digest_tag, set_seed
    from bastion.data import load_data
    from bastion.data.validate import check_dataset_for_model
    from bastion.evaluate import scan as scan_model
    from bastion.evaluate import write_scan_report
    from bastion.registry.tracking import track_run

    out = Path(spec.out)
    if out.exists() and not out.is_dir():
        raise BastionError(f"output path {out} is a file", hint="give a folder path")
    eng = connect() if connect is not None else None  # attack shards run there
    seed = spec.seed
    set_seed(seed)
    ds = load_data(spec.data, label_column=spec.label_column, seed=seed)
    model = load_any_model(
        spec.model,
        weights=spec.weights,
        input_shape=ds.input_shape,
        n_classes=ds.n_classes,
        bounds=ds.bounds,
        seed=seed,
        progress=progress,
    )
    from bastion.models.text import is_text_model

    if ds.kind == "text" or is_text_model(model):
        return _text_scan(spec, model, ds)
    check_dataset_for_model(ds, model)
    x, y = ds.x_test, ds.y_test
    if spec.limit is not None:
        x, y = x[:spec.limit], y[:spec.limit]
    params = {
        "model": spec.model,
        "data": spec.data,
        "norm": spec.norm,
        "epsilons": ",".join(str(e) for e in spec.epsilons),
        "attacks": ",".join(spec.attacks) if spec.attacks else "default",
        "preset": spec.preset,
        "limit": spec.limit,
        "n_points": len(x),
        "seed": seed,
        "engine": getattr(eng, "name", "local"),
    }
    report = scan_model(
        model,
        x,
        y,
        norm=spec.norm,
        epsilons=list(spec.epsilons),
        attacks=list(spec.attacks) if spec.attacks else None,
        seed=seed,
        attack_options={k: dict(v) for k, v in spec.attack_options.items()},
        progress=progress,
        preset=spec.preset,
        engine=eng,
    )
    report.data = {**dict(report.data or {}), "spec": spec.data, "split": "test",
                   "name": ds.name}
    report.model = {**dict(report.model or {}), "spec": spec.model}
    paths = write_scan_report(report, out)
    with track_run("scan", params=params, tracking_uri=spec.tracking_uri,
                   enabled=spec.track) as run:
        metrics: dict[str, float] = {"clean_accuracy": report.clean_accuracy}
        for k, v in report.robust_accuracy.items():
            metrics[f"robust_accuracy_eps_{k}"] = v
        run.log_metrics(metrics)
        run.set_tags({"bastion.n_warnings": len(report.warnings),
                      **model_digest_tag(spec.model)})
        for p in paths.values():
            run.log_artifact(p, artifact_path="report")
    return JobResult(report, {k: Path(v) for k, v in paths.items()}, list(run.warnings))


#: texts a text scan attacks when --limit is not given (a seeded sample of the test split)
TEXT_SCAN_DEFAULT_LIMIT = 200


def _text_scan(spec: ScanSpec, model: Any, ds: Any) -> JobResult[Any]:
    """The text branch of the scan job: the text cascade on a seeded sample of the test
    split (``spec.limit`` texts, default :data:`TEXT_SCAN_DEFAULT_LIMIT`)."""
    import numpy as np

    from bastion._util import model_digest_tag
    from bastion.evaluate.text_scan import align_labels, scan_text, write_text_scan_report
    from bastion.models.text import is_text_model
    from bastion.registry.tracking import track_run

    if not is_text_model(model):
        raise BastionError(f"{spec.data} is text data but {spec.model} is not a text model",
                           hint="scan a text model (hf:FOLDER or bastion train --model "
                           "text-intent)")
    if ds.kind != "text":
        raise BastionError(f"{spec.model} is a text model but {spec.data} is not text data",
                           hint="use clinc150:PATH, jsonl:PATH or text-csv:PATH")
    if ds.n_classes > int(model.n_classes) and not getattr(model, "class_names", None):
        raise BastionError(f"the data has {ds.n_classes} classes but the model predicts "
                           f"{model.n_classes}", hint="pick the data the model was made for")
    y_all = align_labels(ds.class_names, model, np.asarray(ds.y_test))
    if int(y_all.max(initial=0)) >= int(model.n_classes):
        raise BastionError(f"the data's labels reach {int(y_all.max())} but the model has "
                           f"{model.n_classes} classes", hint="pick the data the model was "
                           "made for")
    seed = spec.seed
    n = min(len(ds.x_test), spec.limit or TEXT_SCAN_DEFAULT_LIMIT)
    pick = np.sort(np.random.default_rng(seed).choice(len(ds.x_test), n, replace=False))
    texts, y = [str(t) for t in ds.x_test[pick]], y_all[pick]
    report = scan_text(model, texts, y, attacks=list(spec.attacks) if spec.attacks else None,
                       seed=seed,
                       attack_options={k: dict(v) for k, v in spec.attack_options.items()})
    report.data = {"spec": spec.data, "split": "test", "name": ds.name, "sample": n,
                   "of": int(len(ds.x_test)), "seed": seed}
    report.model = {**report.model, "spec": spec.model}
    paths = write_text_scan_report(report, Path(spec.out))
    params = {"model": spec.model, "data": spec.data, "attacks": ",".join(report.attacks),
              "limit": n, "seed": seed, "kind": "text"}
    with track_run("scan", params=params, tracking_uri=spec.tracking_uri,
                   enabled=spec.track) as run:
        metrics = {"clean_accuracy": report.clean_accuracy,
                   "robust_accuracy": report.robust_accuracy["cascade"]}
        for a in report.per_attack:
            metrics[f"success_rate_{a['attack']}"] = a["success_rate"]
        run.log_metrics(metrics)
        run.set_tags(model_digest_tag(spec.model))
        for p in paths.values():
            run.log_artifact(p, artifact_path="report")
    return JobResult(report, {k: Path(v) for k, v in paths.items()}, list(run.warnings))


def run_scan(*, model_spec: str, data_spec: str, out_dir: str | Path, progress: bool = False,
             epsilons: Any = (0.05, 0.1, 0.2), attacks: Any = None,
             attack_options: dict[str, dict[str, Any]] | None = None,
             **options: Any) -> JobResult[Any]:
    """The scan job with keyword arguments (the API before :class:`ScanSpec`): builds the
    spec and calls :func:`scan`. Prefer ``scan(ScanSpec(...))``."""
    spec = ScanSpec(model=model_spec, data=data_spec, out=Path(out_dir),
                    epsilons=tuple(epsilons), attacks=tuple(attacks) if attacks else None,
                    attack_options=attack_options or {}, **options)
    return scan(spec, progress=progress)
