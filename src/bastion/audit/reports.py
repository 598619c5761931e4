"""The audit reports: pydantic models (JSON with a schema) and their HTML rendering."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from bastion import __version__
from bastion._util import check_output_dir, write_json_atomic, write_text_atomic


class AuditHeader(BaseModel):
    command: str
    model: str | None = None
    data: str
    seed: int = 0
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat())
    bastion_version: str = __version__
    time_s: float = 0.0
    warnings: list[str] = Field(default_factory=list)


class DetectorSummary(BaseModel):
    detector: str
    needs: str  # "white-box features" or "data only"
    flagged: int
    removal_budget: float | None = None
    threshold: float | None = None
    recall: float | None = None  # only when the ground truth is known
    precision: float | None = None
    time_s: float = 0.0
    top_indices: list[int] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)


class DataAuditReport(AuditHeader):
    n_train: int
    n_classes: int
    class_counts: list[int]
    detectors: list[DetectorSummary]
    combined_detector: str
    mode: str
    n_removed: int
    n_relabelled: int
    cleaned_path: str | None = None
    removed_csv: str | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    skipped: dict[str, str] = Field(default_factory=dict)
    verdict: str = ""
    abnormal: bool = False
    n_flagged: int = 0  # by the detectors' own rules (the verdict's count)
    clean_flag_rate: float | None = None  # what the rules flag on clean data
    whole_file: bool = False  # every row of a CSV/Parquet file, rows are file rows
    cleaned_table: str | None = None
    flagged_rows: list[dict[str, Any]] = Field(default_factory=list)


class StripSummary(BaseModel):
    n_overlays: int
    fpr: float
    threshold: float
    flagged_share_test: float
    entropy_clean_mean: float
    entropy_test: list[float] = Field(default_factory=list)
    entropy_clean: list[float] = Field(default_factory=list)
    auc_triggered: float | None = None
    detection_rate_triggered: float | None = None


class NeuralCleanseSummary(BaseModel):
    mask_l1: list[float]
    anomaly_index: list[float]
    attack_success: list[float]
    flagged: list[int]
    suspected_target: int | None
    time_s: float


class BackdoorAuditReport(AuditHeader):
    white_box: bool
    clean_accuracy: float
    strip: StripSummary | None = None
    neural_cleanse: NeuralCleanseSummary | None = None
    verdict: str
    skipped: dict[str, str] = Field(default_factory=dict)


class CurvePoint(BaseModel):
    queries: int
    fidelity: float
    accuracy: float | None = None


class HardeningRow(BaseModel):
    hardening: str
    accuracy: float
    accuracy_cost: float
    changed_labels: float
    surrogate_fidelity: float | None = None
    equation_solving_fidelity: float | None = None
    note: str | None = None


class StreamSummary(BaseModel):
    stream: str
    kind: str  # "benign" or "attack"
    n_queries: int
    detected: bool
    detected_at: int | None
    min_w: float


class ExtractionAuditReport(AuditHeader):
    budget: int
    victim_accuracy: float
    equation_solving: dict[str, Any] | None = None
    surrogate_curve: list[CurvePoint]
    hardening: list[HardeningRow]
    prada_delta: float
    streams: list[StreamSummary]
    skipped: dict[str, str] = Field(default_factory=dict)


class MIASummary(BaseModel):
    attack: str
    auc: float
    tpr_at_0_1pct_fpr: float
    tpr_at_1pct_fpr: float
    roc_fpr: list[float]
    roc_tpr: list[float]
    time_s: float


class PrivacyAuditReport(AuditHeader):
    n_members: int
    n_nonmembers: int
    train_accuracy: float
    test_accuracy: float
    attacks: list[MIASummary]
    inversion_classes: list[int] = Field(default_factory=list)
    inversion_confidence: list[float] = Field(default_factory=list)
    skipped: dict[str, str] = Field(default_factory=dict)


def write_report(report: BaseModel, html: str, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json`` and ``report.html`` atomically into ``out_dir``."""
    out = Path(out_dir)
    check_output_dir(out)  # never write through a link
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", report.model_dump(mode="json"))
    write_text_atomic(out / "report.html", html)
    return {"json": out / "report.json", "html": out / "report.html"}


def report_schema(kind: str) -> dict[str, Any]:
    """The JSON schema of one audit report kind (data, backdoor, extraction, privacy)."""
    kinds: dict[str, type[BaseModel]] = {"data": DataAuditReport, "backdoor": BackdoorAuditReport,
             "extraction": ExtractionAuditReport, "privacy": PrivacyAuditReport}
    return kinds[kind].model_json_schema()
