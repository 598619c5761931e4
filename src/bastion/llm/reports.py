"""The LLM reports: pydantic models that serialise to JSON (with a schema) and HTML, like
:class:`~bastion.evaluate.report.ScanReport` and :class:`~bastion.defend.report.HardenReport`.

- :class:`RedteamReport` (``bastion redteam``): exploit success rate overall, per probe
  family, per transform and per judge, each with a 95% Wilson interval, and errors by
  kind;
- :class:`DetectorEvalReport` (``bastion llm evaluate-detector``): AUROC, F1, TPR at 1%
  FPR overall and per length slice, flagged rate per subtype, hard negatives, harmful
  requests;
- :class:`DetectorHardenReport` (``bastion llm harden-detector``): one row per round.

Rates that cannot be measured (no judged attempt, one class only) are ``null`` in JSON.
:func:`write_llm_report` writes ``report.json``, ``report.schema.json`` and
``report.html`` into a folder, each atomically.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bastion import __version__
from bastion._util import check_output_dir, write_json_atomic, write_text_atomic

__all__ = [
    "RateSummary",
    "RedteamConfig",
    "RedteamReport",
    "DetectorMetrics",
    "DetectorEvalReport",
    "DetectorHardenReport",
    "HardenRoundSummary",
    "write_llm_report",
    "llm_report_schema",
]


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class RateSummary(BaseModel):
    """Exploit success over a set of attempts. ``exploit_success_rate`` is
    ``successes / judged`` (judged = success + defended + blocked), ``None`` when nothing
    was judged; ``ci95`` is its 95% Wilson interval (``[0, 1]`` when nothing was judged)."""

    model_config = ConfigDict(extra="forbid")

    attempts: int
    judged: int
    successes: int
    exploit_success_rate: float | None
    ci95: tuple[float, float]
    blocked: int = Field(description="refused by a guard (counted as defended)")
    errors: int = Field(description="the target failed; not judged")
    unjudged: int = Field(description="no deterministic judge and no LLM judge")


class RedteamConfig(BaseModel):
    """How the red team ran."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int
    timeout: float
    retries: int
    rate_limit: float | None
    stream: bool
    llm_judge: bool
    seed: int


class RedteamReport(BaseModel):
    """What ``bastion redteam`` measured against one chat endpoint."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: Literal["bastion.llm.redteam"] = "bastion.llm.redteam"
    target: str = Field(description="the endpoint, credentials removed")
    model: str
    n_probes: int
    resumed_from_previous: int = Field(description="probes judged in an earlier run, reused")
    duration_s: float
    config: RedteamConfig
    overall: RateSummary
    by_family: dict[str, RateSummary]
    by_transform: dict[str, RateSummary]
    by_judge: dict[str, RateSummary]
    errors_by_kind: dict[str, int] = Field(default_factory=dict)
    bastion_version: str = __version__
    created_at: str = Field(default_factory=_now, description="ISO 8601, UTC")

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> RedteamReport:
        return cls.model_validate_json(text)


class DetectorMetrics(BaseModel):
    """A detector's quality on one labelled set, at its threshold (``tpr_at_1pct_fpr``
    uses the threshold that flags 1% of this set's negatives)."""

    model_config = ConfigDict(extra="forbid")

    n: int
    n_attack: int
    auroc: float | None
    f1: float
    precision: float
    recall: float
    fpr: float | None
    tpr_at_1pct_fpr: float | None
    threshold_at_1pct_fpr: float | None

    @field_validator("auroc", "fpr", "tpr_at_1pct_fpr", "threshold_at_1pct_fpr",
                     mode="before")
    @classmethod
    def _nan_is_none(cls, v: Any) -> Any:
        return _finite(v)


class SubtypeRate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int
    label: int = Field(description="1 attack, 0 benign")
    flagged_rate: float


class HardNegatives(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int
    fpr: float
    vs_attacks: DetectorMetrics


class HarmfulRequests(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int
    flagged_rate: float = Field(description="plain harmful requests are not injections")
    mean_score: float


class DetectorEvalReport(BaseModel):
    """What ``bastion llm evaluate-detector`` measured."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: Literal["bastion.llm.evaluate_detector"] = "bastion.llm.evaluate_detector"
    data: str
    detector: str
    split: str | None
    threshold: float
    overall: DetectorMetrics
    length_slices: dict[str, DetectorMetrics] = Field(
        description="by text length in characters, e.g. '0-100', '1000-inf'")
    by_subtype: dict[str, SubtypeRate] | None = None
    hard_negatives: HardNegatives | None = None
    harmful_requests: HarmfulRequests | None = None
    languages: dict[str, Any] | None = Field(
        None, description="benign flagged rate by language and by script")
    loso: dict[str, Any] | None = Field(
        None, description="leave-one-source-out: per held-out repository and macro")
    bastion_version: str = __version__
    created_at: str = Field(default_factory=_now, description="ISO 8601, UTC")


class HardenRoundSummary(BaseModel):
    """One round of adversarial training (round 0 is the starting detector). Fields the
    training loop adds later are kept as they are."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    round: int
    evasion_rate: float = Field(
        description="fresh variants the detector missed, among the variants of held-out "
        "attacks it catches in plain form"
    )
    variant_miss_rate: float | None = Field(
        default=None, description="fresh variants the detector missed, of all of them"
    )
    n_variants: int | None = None
    n_variants_of_caught: int | None = None
    evasion_by_op: dict[str, float]
    tpr_heldout: float
    fpr_hard_negatives: float
    fpr_benign_calibration: float
    threshold: float
    n_train: int
    n_added: int
    n_added_benign: int | None = Field(
        default=None, description="benign counterparts of the added attack variants (the same "
        "operations on benign training text), added as negatives so far")
    model_version: str | None = None


class DetectorHardenReport(BaseModel):
    """What ``bastion llm harden-detector`` did, round by round."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: Literal["bastion.llm.harden"] = "bastion.llm.harden"
    data: str
    settings: dict[str, Any] = Field(default_factory=dict)
    rounds: list[HardenRoundSummary]
    bastion_version: str = __version__
    created_at: str = Field(default_factory=_now, description="ISO 8601, UTC")


_KINDS: dict[str, type[BaseModel]] = {
    "redteam": RedteamReport,
    "evaluate_detector": DetectorEvalReport,
    "harden": DetectorHardenReport,
}


def llm_report_schema(kind: str) -> dict[str, Any]:
    """The JSON schema of one LLM report kind (``redteam``, ``evaluate_detector``,
    ``harden``)."""
    if kind not in _KINDS:
        raise KeyError(f"unknown LLM report kind {kind!r}; use {', '.join(_KINDS)}")
    return _KINDS[kind].model_json_schema()


def write_llm_report(
    report: BaseModel, html: str | None, out_dir: str | os.PathLike[str]
) -> dict[str, Path]:
    """Write ``report.json``, ``report.schema.json`` and (when given) ``report.html``
    into ``out_dir`` atomically; return the paths keyed ``json``, ``schema``, ``html``."""
    out = Path(out_dir)
    check_output_dir(out)  # never write through a link
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "schema": out / "report.schema.json"}
    write_json_atomic(paths["json"], json.loads(report.model_dump_json()))
    write_json_atomic(paths["schema"], type(report).model_json_schema())
    if html is not None:
        paths["html"] = out / "report.html"
        write_text_atomic(paths["html"], html)
    return paths
