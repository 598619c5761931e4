"""Whole jobs from specs to files: what the CLI commands call, usable from Python too.

A job resolves a model and data from their specs, runs a library function, writes the
report atomically and records an MLflow run. This module sits at the top of the layer
stack, beside ``cli`` and ``service``: it may import everything below.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bastion.errors import BastionError


def load_any_model(spec: str, **kwargs: Any) -> Any:
    """Resolve ``spec`` like :func:`bastion.models.resolve_model`, and also load the
    wrapper folders that ``bastion harden`` writes for squeezing, smoothing and ensembles
    (they live in ``bastion.defend``, which the models layer may not import)."""
    from bastion.defend.persist import is_hardened_folder, load_hardened
    from bastion.models import resolve_model

    if is_hardened_folder(Path(spec).expanduser()):
        return load_hardened(spec)
    return resolve_model(spec, **kwargs)


def run_scan(
    *,
    model_spec: str,
    data_spec: str,
    out_dir: str | Path,
    norm: str = "linf",
    epsilons: Sequence[float] = (0.05, 0.1, 0.2),
    attacks: Sequence[str] | None = None,
    limit: int | None = None,
    weights: str | None = None,
    label_column: str = "label",
    attack_options: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
    track: bool = True,
    progress: bool = False,
    preset: str = "standard",
) -> tuple[Any, dict[str, Path], list[str]]:
    """Scan ``model_spec`` on the test split of ``data_spec`` and write the report.

    Returns ``(report, paths, tracking_warnings)`` where ``paths`` has keys ``json`` and
    ``html``. Everything is validated before anything is written: on a bad model, bad data
    or bad options a :class:`BastionError` is raised and ``out_dir`` is left untouched. A
    failing MLflow store only adds to ``tracking_warnings``; the report is written first.
    """
    from bastion._util import set_seed
    from bastion.attacks.base import check_epsilons, check_norm
    from bastion.data import load_data
    from bastion.data.validate import check_dataset_for_model
    from bastion.evaluate import scan, write_scan_report
    from bastion.evaluate.presets import check_preset
    from bastion.registry.tracking import track_run

    preset = check_preset(preset)
    norm = check_norm(norm)
    epsilons = check_epsilons(epsilons)
    if limit is not None and limit < 1:
        raise BastionError(f"--limit must be at least 1, got {limit}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BastionError(f"output path {out} is a file", hint="give a folder path")
    set_seed(seed)
    ds = load_data(data_spec, label_column=label_column, seed=seed)
    model = load_any_model(
        model_spec,
        weights=weights,
        input_shape=ds.input_shape,
        n_classes=ds.n_classes,
        bounds=ds.bounds,
        seed=seed,
        progress=progress,
    )
    check_dataset_for_model(ds, model)
    x, y = ds.x_test, ds.y_test
    if limit is not None:
        x, y = x[:limit], y[:limit]
    params = {
        "model": model_spec,
        "data": data_spec,
        "norm": norm,
        "epsilons": ",".join(str(e) for e in epsilons),
        "attacks": ",".join(attacks) if attacks else "default",
        "preset": preset,
        "limit": limit,
        "n_points": len(x),
        "seed": seed,
    }
    report = scan(
        model,
        x,
        y,
        norm=norm,
        epsilons=epsilons,
        attacks=list(attacks) if attacks else None,
        seed=seed,
        attack_options=attack_options,
        progress=progress,
        preset=preset,
    )
    report.data = {**dict(report.data or {}), "spec": data_spec, "split": "test", "name": ds.name}
    report.model = {**dict(report.model or {}), "spec": model_spec}
    paths = write_scan_report(report, out)
    warnings: list[str] = []
    with track_run("scan", params=params, tracking_uri=tracking_uri, enabled=track) as run:
        metrics: dict[str, float] = {"clean_accuracy": report.clean_accuracy}
        for k, v in report.robust_accuracy.items():
            metrics[f"robust_accuracy_eps_{k}"] = v
        run.log_metrics(metrics)
        run.set_tags({"bastion.n_warnings": len(report.warnings)})
        for p in paths.values():
            run.log_artifact(p, artifact_path="report")
    warnings.extend(run.warnings)
    return report, {k: Path(v) for k, v in paths.items()}, warnings
