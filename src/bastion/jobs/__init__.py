"""The job layer: one function per CLI command, from a typed spec to a report.

Each job takes a frozen, validated spec whose defaults equal the CLI's, resolves the model
and data, runs the library, writes the report files (atomically), records the MLflow run
and returns a :class:`JobResult` ``(report, paths, warnings)``. The CLI only parses its
options into the spec, calls the job and renders; a Python user calls the same job::

    from bastion.jobs import ScanSpec, scan
    report, paths, warnings = scan(ScanSpec(model="builtin:digits-cnn",
                                            data="builtin:digits", out="scan-out"))

This package sits at the top of the layer stack, beside ``cli`` and ``service``: it may
import everything below. A bad spec value raises :class:`SpecError` (one line; the CLI
exits 2). Names are imported on first use and heavy imports happen inside the jobs, so
``import bastion.jobs`` is cheap.
"""

import importlib
from typing import TYPE_CHECKING, Any

#: name -> the module of this package defining it; imported on first use, so the CLI's
#: start (and ``--timeout``'s check) does not pay for pydantic and every spec class.
_LAZY = {
    **dict.fromkeys(["AuditBackdoorSpec", "AuditDataSpec", "AuditExtractionSpec",
                     "AuditPoisonSpec", "AuditPrivacySpec", "audit_backdoor", "audit_data",
                     "audit_extraction", "audit_poison", "audit_privacy"], "audit"),
    **dict.fromkeys(["JobTimeout", "STORE_INIT_GRACE_S", "check_timeout",
                     "run_with_deadline"], "deadline"),
    **dict.fromkeys(["HardenSpec", "harden"], "hardening"),
    **dict.fromkeys(["HealSpec", "heal"], "healing"),
    **dict.fromkeys(["LlmEvaluateDetectorSpec", "LlmHardenDetectorSpec",
                     "LlmTrainDetectorSpec", "RedteamSpec", "llm_evaluate_detector",
                     "llm_harden_detector", "llm_train_detector", "redteam"], "llm"),
    **dict.fromkeys(["ScanSpec", "load_any_model", "run_scan", "scan"], "scanning"),
    **dict.fromkeys(["JobResult", "JobSpec", "SpecError", "engine_of"], "spec"),
    **dict.fromkeys(["TrainSpec", "train"], "training"),
}

__all__ = [
    "AuditBackdoorSpec",
    "AuditDataSpec",
    "AuditExtractionSpec",
    "AuditPoisonSpec",
    "AuditPrivacySpec",
    "STORE_INIT_GRACE_S",
    "HardenSpec",
    "HealSpec",
    "JobResult",
    "JobSpec",
    "JobTimeout",
    "LlmEvaluateDetectorSpec",
    "LlmHardenDetectorSpec",
    "LlmTrainDetectorSpec",
    "RedteamSpec",
    "ScanSpec",
    "SpecError",
    "TrainSpec",
    "audit_backdoor",
    "audit_data",
    "audit_extraction",
    "audit_poison",
    "audit_privacy",
    "check_timeout",
    "engine_of",
    "harden",
    "heal",
    "llm_evaluate_detector",
    "llm_harden_detector",
    "llm_train_detector",
    "load_any_model",
    "redteam",
    "run_scan",
    "run_with_deadline",
    "scan",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'bastion.jobs' has no attribute {name!r}")
    mod = importlib.import_module(f"bastion.jobs.{_LAZY[name]}")
    # bind every name of that module at once (modules are named apart from the jobs:
    # ``scanning`` holds ``scan``, so a submodule import never shadows a job function)
    globals().update({n: getattr(mod, n) for n, m in _LAZY.items() if m == _LAZY[name]})
    return globals()[name]


if TYPE_CHECKING:  # what type checkers and IDEs see
    from bastion.jobs.audit import (
        AuditBackdoorSpec,
        AuditDataSpec,
        AuditExtractionSpec,
        AuditPoisonSpec,
        AuditPrivacySpec,
        audit_backdoor,
        audit_data,
        audit_extraction,
        audit_poison,
        audit_privacy,
    )
    from bastion.jobs.deadline import (
        STORE_INIT_GRACE_S,
        JobTimeout,
        check_timeout,
        run_with_deadline,
    )
    from bastion.jobs.hardening import HardenSpec, harden
    from bastion.jobs.healing import HealSpec, heal
    from bastion.jobs.llm import (
        LlmEvaluateDetectorSpec,
        LlmHardenDetectorSpec,
        LlmTrainDetectorSpec,
        RedteamSpec,
        llm_evaluate_detector,
        llm_harden_detector,
        llm_train_detector,
        redteam,
    )
    from bastion.jobs.scanning import ScanSpec, load_any_model, run_scan, scan
    from bastion.jobs.spec import JobResult, JobSpec, SpecError, engine_of
    from bastion.jobs.training import TrainSpec, train
