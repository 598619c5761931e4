"""The ``harden`` job: harden a model, evaluate it before and after, save both, record an
MLflow run (``bastion harden``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from bastion.errors import BastionError
from bastion.jobs.deadline import run_with_deadline
from bastion.jobs.spec import DeadlineSpec, JobResult, Names, Numbers, engine_of, ray_engine


class HardenSpec(DeadlineSpec):
    """What ``bastion harden`` runs. Defaults are the CLI's."""

    model: str
    """Model folder, TorchScript, ``.skops`` or ``builtin:NAME`` (``--model``)."""
    data: str
    """Data spec, e.g. ``builtin:digits``: trained on its train split, evaluated on the
    first :attr:`limit` test points (``--data``)."""
    out: Path
    """Output folder: ``model/``, ``report.json``, ``report.html``, ``checkpoints/``
    (a rerun resumes; ``--out``)."""
    method: str
    """``pgd-at``, ``fast-at``, ``trades``, ``distill``, ``ensemble``, ``squeeze`` or
    ``smooth`` (``--method``)."""
    eps: float | None = None
    """Training budget (default 0.1 of the input range; ``--eps``)."""
    norm: str = "linf"
    """``linf`` or ``l2`` (``--norm``)."""
    epochs: int = Field(default=5, ge=0)
    """Training epochs (``--epochs``)."""
    epsilons: Numbers | None = None
    """Evaluation budgets (default eps/2, eps, 1.5 eps; ``--eval-eps``)."""
    limit: int | None = 200
    """Evaluation points, the first N of the test split (``--limit``)."""
    attacks: Names | None = None
    """Evaluation cascade (default apgd-ce, apgd-t, square; ``--attacks``)."""
    attack_options: dict[str, dict[str, Any]] = {}
    """Per-attack options of the evaluation (``--set ATTACK.PARAM=VALUE``)."""
    options: dict[str, Any] = {}
    """Method options, e.g. ``{"lr": 0.01, "steps": 10, "guard": False}`` (``--lr``,
    ``--steps``, ``--no-guard``, ``--opt KEY=VALUE`` ...; see :mod:`bastion.defend`)."""
    label_column: str = "label"
    """Label column of CSV/Parquet data (``--label-column``)."""
    workers: int = Field(2, ge=1)
    """Ray Train workers (data-parallel CPU workers) with ``engine="ray"`` (``--workers``).
    Ignored by the local engine."""

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise BastionError(f"--limit must be at least 1, got {v}")
        return v


def _arch_hint(model_spec: str) -> tuple[str, dict[str, Any]] | None:
    """The zoo architecture of a model folder or built-in model, when known."""
    try:
        if model_spec.startswith("builtin:"):
            from bastion.models.resolve import BUILTIN_MODELS

            return BUILTIN_MODELS[model_spec.split(":", 1)[1]][1], {}
        from bastion.models.persist import is_model_folder, read_model_meta

        if is_model_folder(model_spec):
            meta = read_model_meta(model_spec)
            return str(meta["arch"]), dict(meta.get("arch_kwargs") or {})
    except Exception:
        return None
    return None


def harden(spec: HardenSpec, *, progress: bool = False,
           on_epoch: Callable[[Any], None] | None = None) -> JobResult[Any]:
    """Resolve the specs, harden, write ``spec.out`` and record an MLflow run.

    Returns ``JobResult(report, paths, warnings)``: the
    :class:`~bastion.defend.report.HardenReport`, ``paths`` with keys ``model``, ``json``
    and ``html``, and the MLflow warnings. ``on_epoch`` gets each training epoch's
    :class:`~bastion.defend.training.EpochLog` (for a progress display). Bad input raises
    a :class:`~bastion.errors.BastionError` before anything is written.
    """
    fit: Any = None
    if spec.engine == "ray":
        # adversarial training on Ray Train; evaluation stays in this process. The
        # address is checked (and probed) here, before anything is written.
        from bastion.defend.ray_train import RayFit

        ray_engine(spec)

        fit = RayFit(workers=spec.workers, address=spec.ray_address)
    else:
        engine_of(spec)  # local: training and evaluation run in this process
    return run_with_deadline(lambda: _harden(spec, progress, on_epoch, fit),
                             timeout=spec.timeout, what="harden", out_dir=spec.out)


def _harden(spec: HardenSpec, progress: bool,
            on_epoch: Callable[[Any], None] | None, fit: Any = None) -> JobResult[Any]:
    from bastion._util import set_seed
    from bastion.data import load_data
    from bastion.defend import harden as harden_model
    from bastion.models import resolve_model
    from bastion.registry.tracking import track_run

    out = Path(spec.out)
    if out.exists() and not out.is_dir():
        raise BastionError(f"--out {out} is a file", hint="give a folder path")
    seed = spec.seed
    set_seed(seed)
    ds = load_data(spec.data, label_column=spec.label_column, seed=seed)
    model = resolve_model(spec.model, input_shape=ds.input_shape, n_classes=ds.n_classes,
                          bounds=ds.bounds, seed=seed, progress=progress)
    from bastion.models.text import is_text_model

    if is_text_model(model) or ds.kind == "text":
        return _text_harden(spec, model, ds)
    params = {"model": spec.model, "data": spec.data, "method": spec.method, "eps": spec.eps,
              "norm": spec.norm, "epochs": spec.epochs, "seed": seed, "limit": spec.limit,
              **{f"opt.{k}": v for k, v in spec.options.items()}}
    with track_run("harden", params=params, tracking_uri=spec.tracking_uri,
                   enabled=spec.track) as run:

        def epoch_cb(e: Any) -> None:
            run.log_metrics({"train_loss": e.loss, "guard_clean_accuracy": e.clean_accuracy,
                             "guard_robust_accuracy": e.robust_accuracy}, step=e.epoch)
            if on_epoch is not None:
                on_epoch(e)

        result = harden_model(
            model, ds, method=spec.method, eps=spec.eps, norm=spec.norm, epochs=spec.epochs,
            seed=seed, options=dict(spec.options),
            epsilons=list(spec.epsilons) if spec.epsilons else None, limit=spec.limit,
            attacks=list(spec.attacks) if spec.attacks else None,
            attack_options={k: dict(v) for k, v in spec.attack_options.items()}, out=out,
            arch_hint=_arch_hint(spec.model), on_epoch=epoch_cb, progress=progress,
            model_label=spec.model, fit=fit)
        rep = result.report
        metrics = {"before_clean_accuracy": rep.before.clean_accuracy,
                   "after_clean_accuracy": rep.after.clean_accuracy}
        for k, v in rep.before.robust_accuracy.items():
            metrics[f"before_robust_accuracy_eps_{k}"] = v
        for k, v in rep.after.robust_accuracy.items():
            metrics[f"after_robust_accuracy_eps_{k}"] = v
        for k, v in (rep.after.certified_accuracy or {}).items():
            metrics[f"after_certified_accuracy_r_{k}"] = v
        run.log_metrics(metrics)
        run.set_tags({"bastion.method": spec.method, "bastion.helps": rep.helps})
        for key in ("json", "html"):
            run.log_artifact(result.paths[key])
        run.log_artifact(result.paths["model"], artifact_path="model")
    return JobResult(rep, {k: Path(v) for k, v in result.paths.items()}, list(run.warnings))


def _text_harden(spec: HardenSpec, model: Any, ds: Any) -> JobResult[Any]:
    """The text branch of the harden job (adversarial data augmentation)."""
    from bastion.defend.text_augment import harden_text
    from bastion.models.text import is_text_model
    from bastion.registry.tracking import track_run

    if not (is_text_model(model) and ds.kind == "text"):
        raise BastionError(f"{spec.model} and {spec.data}: a text model needs text data",
                           hint="use a text model with clinc150:, jsonl: or text-csv: data")
    params = {"model": spec.model, "data": spec.data, "method": spec.method,
              "limit": spec.limit, "seed": spec.seed, "kind": "text",
              **{f"opt.{k}": v for k, v in spec.options.items()}}
    with track_run("harden", params=params, tracking_uri=spec.tracking_uri,
                   enabled=spec.track) as run:
        result = harden_text(model, ds, method=spec.method, out=Path(spec.out),
                             limit=spec.limit, seed=spec.seed, options=dict(spec.options),
                             model_label=spec.model)
        rep = result.report
        metrics = {"before_clean_accuracy": rep.before.clean_accuracy,
                   "after_clean_accuracy": rep.after.clean_accuracy}
        for side, s in (("before", rep.before), ("after", rep.after)):
            for k, v in s.success_rate.items():
                metrics[f"{side}_success_rate_{k}"] = v
        run.log_metrics(metrics)
        run.set_tags({"bastion.method": spec.method, "bastion.helps": rep.helps})
        for key in ("json", "html"):
            run.log_artifact(result.paths[key])
    return JobResult(rep, {k: Path(v) for k, v in result.paths.items()}, list(run.warnings))
