"""The ``train`` job: train a model from the zoo, save it as a Bastion model folder and
record an MLflow run (``bastion train``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from bastion.jobs.deadline import run_with_deadline
from bastion.jobs.spec import DeadlineSpec, JobResult, engine_of


class TrainSpec(DeadlineSpec):
    """What ``bastion train`` runs. Defaults are the CLI's."""

    data: str
    """Data spec, e.g. ``builtin:digits`` or ``mnist:PATH`` (``--data``)."""
    out: Path
    """The Bastion model folder written (``--out``)."""
    model: str = "cnn"
    """Architecture from the zoo: ``cnn``, ``wong-cnn``, ``mlp``, ``logreg``, or
    ``text-intent`` for text data (``--model``)."""
    epochs: int | None = Field(default=None, ge=1)
    """Training epochs (``--epochs``; default 10, text-intent 60 over frozen features)."""
    lr: float | None = Field(default=None, gt=0)
    """Learning rate (``--lr``; default 1e-3, text-intent 1e-2)."""
    batch_size: int = Field(default=128, ge=1)
    """Batch size (``--batch-size``)."""
    label_column: str = "label"
    """Label column of CSV/Parquet data (``--label-column``)."""


def train(spec: TrainSpec, *, progress: bool = False) -> JobResult[dict[str, Any]]:
    """Train and save; returns ``JobResult(metrics, paths, warnings)`` (``metrics``: e.g.
    ``test_accuracy``; ``paths``: ``model``, the saved folder)."""
    engine_of(spec)  # local: training runs in this process
    return run_with_deadline(lambda: _train(spec, progress), timeout=spec.timeout,
                             what="train", out_dir=spec.out)


def _train(spec: TrainSpec, progress: bool) -> JobResult[dict[str, Any]]:
    from bastion.models.train import train_from_spec
    from bastion.registry.tracking import track_run

    params = {"arch": spec.model, "data": spec.data, "epochs": spec.epochs, "lr": spec.lr,
              "batch_size": spec.batch_size, "seed": spec.seed}
    with track_run("train", params=params, tracking_uri=spec.tracking_uri,
                   enabled=spec.track) as run:
        _, metrics = train_from_spec(
            spec.model, spec.data, spec.out,
            batch_size=spec.batch_size, seed=spec.seed, label_column=spec.label_column,
            progress=progress,
            **({"epochs": spec.epochs} if spec.epochs is not None else {}),
            **({"lr": spec.lr} if spec.lr is not None else {}),
        )
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        run.log_artifact(spec.out, artifact_path="model")
    return JobResult(metrics, {"model": Path(spec.out)}, list(run.warnings))
