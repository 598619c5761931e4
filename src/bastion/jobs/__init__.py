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
exits 2). Heavy imports happen inside the jobs, so importing the specs is cheap.
"""

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
from bastion.jobs.deadline import STORE_INIT_GRACE_S, JobTimeout, check_timeout, run_with_deadline
from bastion.jobs.harden import HardenSpec, harden
from bastion.jobs.heal import HealSpec, heal
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
from bastion.jobs.scan import ScanSpec, load_any_model, run_scan, scan
from bastion.jobs.spec import JobResult, JobSpec, SpecError, engine_of
from bastion.jobs.train import TrainSpec, train

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
