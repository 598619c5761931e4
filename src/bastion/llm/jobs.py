"""Glue for the hardening command: data preparation, MLflow model versions, HTML report
(of a typed :class:`~bastion.llm.reports.DetectorHardenReport`)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from bastion.errors import DataError
from bastion.llm.datasets import load_prompt_jsonl
from bastion.llm.detector import PromptInjectionDetector
from bastion.llm.reports import DetectorHardenReport
from bastion.llm.training import split_calibration
from bastion.registry.tracking import TrackedRun
from bastion.reporting.html import HtmlPage

__all__ = ["prepare_harden_data", "register_round", "harden_report_html"]


def prepare_harden_data(
    data: str | os.PathLike[str], *, limit: int | None = None, seed: int = 0
) -> dict[str, list[Any]]:
    """Training texts/labels (``split=train``), held-out attacks and hard negatives
    (``split=test``) from a labelled JSONL file. ``limit`` subsamples the training rows
    (stratified) for quick runs."""
    rows = load_prompt_jsonl(data)
    train = [r for r in rows if r.split in (None, "train")]
    test = [r for r in rows if r.split == "test"]
    if not test:
        raise DataError(f"{data} has no split=test rows", hint="hardening needs held-out attacks")
    rng = random.Random(seed)
    if limit is not None and len(train) > limit:
        pos = [r for r in train if r.y == 1]
        neg = [r for r in train if r.y == 0]
        k = max(2, round(limit * len(pos) / len(train)))
        train = rng.sample(pos, min(k, len(pos))) + rng.sample(neg, min(limit - k, len(neg)))
        test_pos = [r for r in test if r.y == 1]
        test_hn = [r for r in test if r.y == 0 and r.hard_negative]
        test = rng.sample(test_pos, min(len(test_pos), max(5, limit // 4))) + rng.sample(
            test_hn, min(len(test_hn), max(5, limit // 4))
        )
    fit_rows, cal_rows = split_calibration(train)
    if not cal_rows:
        cal_rows = [r for r in train if r.y == 0]
        fit_rows = train
    heldout = [r.text for r in test if r.y == 1]
    hard = [r.text for r in test if r.y == 0 and r.hard_negative]
    if not heldout:
        raise DataError("no held-out attacks (split=test, label injection/jailbreak)")
    return {
        "train_texts": [r.text for r in fit_rows],
        "train_y": [r.y for r in fit_rows],
        "calibration_benign": [r.text for r in cal_rows],
        "heldout_attacks": heldout,
        "hard_negatives": hard,
    }


def register_round(
    run: TrackedRun,
    det: PromptInjectionDetector,
    k: int,
    out_dir: str | os.PathLike[str],
    name: str,
) -> str | None:
    """Log round ``k``'s detector folder to the run and register it as a new version of
    ``name``; return the version (``None`` and a run warning when the registry fails)."""
    folder = Path(out_dir) / f"round_{k}"
    if not folder.exists():
        det.save(folder)
    art = f"detector_round_{k}"
    run.log_artifact(folder, artifact_path=art)
    if not run.active:
        return None
    try:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        c = MlflowClient(tracking_uri=run.tracking_uri, registry_uri=run.tracking_uri)
        try:
            c.get_registered_model(name)
        except MlflowException:
            c.create_registered_model(name, tags={"bastion": "llm-detector"})
        source = f"{c.get_run(str(run.run_id)).info.artifact_uri.rstrip('/')}/{art}"
        mv = c.create_model_version(
            name, source=source, run_id=run.run_id, tags={"bastion.round": str(k)}
        )
        return str(mv.version)
    except Exception as exc:  # tracking is best effort
        run.warnings.append(f"registering round {k} failed: {type(exc).__name__}: {exc}")
        return None


def harden_report_html(report: DetectorHardenReport) -> str:
    """One HTML page for a detector-hardening report: the rounds, the evasion goal, and
    evasion by operation in the last round."""
    page = HtmlPage("Detector hardening", subtitle=report.data)
    rounds = report.rounds
    page.heading("Per round")
    page.table(
        [
            [
                r.round,
                r.evasion_rate,
                r.variant_miss_rate,
                r.tpr_heldout,
                r.fpr_hard_negatives,
                r.fpr_benign_calibration,
                r.n_added,
                r.n_added_benign or 0,
                r.model_version or "",
            ]
            for r in rounds
        ],
        [
            "round",
            "evasion (fresh variants of caught attacks)",
            "missed (all fresh variants)",
            "TPR held-out",
            "FPR hard neg.",
            "FPR benign",
            "added",
            "benign added",
            "version",
        ],
    )
    first, last = rounds[0], rounds[-1]
    if last.fpr_hard_negatives > first.fpr_hard_negatives:
        page.warning("the hard-negative false-positive rate rose during hardening")
    if last.evasion_rate <= 0.05:
        page.good(f"evasion of fresh variants {100 * last.evasion_rate:.1f}% (goal: under 5%)")
    else:
        page.bad(f"evasion of fresh variants {100 * last.evasion_rate:.1f}% (goal: under 5%)")
    page.paragraph(
        "Evasion counts the variants of held-out attacks the detector catches in plain form "
        "that it misses once obfuscated or reframed; 'missed' counts all variants, including "
        "those of attacks it misses with no obfuscation (see the TPR column)."
    )
    page.heading("Evasion by operation (last round)")
    page.table([[k, v] for k, v in last.evasion_by_op.items()], ["operation", "evasion"])
    return page.render()
