"""The scan report: pydantic models that serialise to JSON (with a schema) and HTML.

Epsilons are used as JSON object keys as ``str(float(eps))`` (``"0.1"``, ``"0.0"``), a
form that reads back exactly with ``float(key)``; see :func:`eps_key`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bastion._util import check_output_dir, write_json_atomic, write_text_atomic


def eps_key(eps: float) -> str:
    """The JSON key for an epsilon: ``str(float(eps))``, exact on the way back."""
    return str(float(eps))


class AttackSummary(BaseModel):
    """What one stage of the cascade did.

    Per-epsilon maps use :func:`eps_key` keys. ``success_rate`` is the attack's own
    success among the points it attacked at that epsilon (``None`` when it attacked none);
    ``robust_accuracy_after`` is the cascade's worst-case robust accuracy after this stage.
    """

    model_config = ConfigDict(extra="forbid")

    stage: int = Field(description="position in the cascade, from 1")
    name: str
    kind: Literal["fixed", "minimal"]
    white_box: bool = Field(description="whether the attack uses the model's gradients")
    params: str = Field(description="the attack's configuration, as its repr")
    points_attacked: int = Field(description="distinct points attacked at any epsilon")
    points_attacked_per_eps: dict[str, int]
    newly_broken: dict[str, int] = Field(
        description="points this stage broke that earlier stages left standing, per epsilon"
    )
    points_broken: int = Field(
        default=0, description="distinct points this stage newly broke at any epsilon"
    )
    success_rate: dict[str, float | None]
    robust_accuracy_after: dict[str, float]
    queries_total: int
    queries_mean: float = Field(description="queries per attacked point")
    time_s: float
    grad_norm_mean: float | None = Field(
        default=None, description="mean input-gradient norm the attack saw (white-box only)"
    )
    non_monotone_points: int = Field(
        default=0,
        description="points this attack broke at a smaller epsilon but not at a larger one",
    )
    rejected: int = Field(
        default=0,
        description="claimed successes that failed re-verification (label, budget or bounds)",
    )
    error: str | None = Field(default=None, description="why the stage failed, if it did")
    phase: Literal["pilot", "main", "escalation"] = Field(
        default="main",
        description="pilot: the stage alone on the first points, to measure its cost per "
        "removal; main: the cascade; escalation: a round run because the gradients lied",
    )
    round: int = Field(default=0, description="escalation round (0 outside escalation)")


class Example(BaseModel):
    """One point the cascade broke, for the report's example gallery.

    ``x_clean``/``x_adv`` are nested lists (image data only, rounded to 4 decimals);
    ``feature_changes`` lists the largest changes for tabular data.
    """

    model_config = ConfigDict(extra="forbid")

    index: int = Field(description="position in the scanned data (after limit)")
    true_label: int
    clean_pred: int
    adv_pred: int
    epsilon: float = Field(description="the smallest epsilon at which this point fell")
    attack: str
    perturbation_norm: float
    x_clean: list[Any] | None = None
    x_adv: list[Any] | None = None
    feature_changes: list[dict[str, float | int]] | None = None


class ScanReport(BaseModel):
    """Worst-case robustness of one model on one data set, over a cascade of attacks."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    clean_accuracy: float
    robust_accuracy: dict[str, float] = Field(
        description="worst-case robust accuracy over all attacks, keyed by eps_key(epsilon)"
    )
    per_attack: list[AttackSummary]
    n_points: int
    norm: Literal["linf", "l2"]
    epsilons: list[float]
    seed: int
    warnings: list[str] = Field(default_factory=list)
    model: dict[str, Any] = Field(
        description="name, input_shape, n_classes, bounds, white_box"
    )
    data: dict[str, Any]
    attacks: list[str] = Field(description="the cascade, in order")
    preset: str = Field(default="custom",
                        description="quick, standard, thorough, or custom (an attack list)")
    lower_bound: bool = Field(
        default=False,
        description="true for the quick preset: a cheap cascade whose robust accuracy is "
        "only an upper bound on the true one (a lower bound on the attack's strength)",
    )
    robust_interval: dict[str, list[float]] = Field(
        default_factory=dict,
        description="95% Wilson interval of the robust accuracy per epsilon (sampling "
        "uncertainty over the scanned points only, not attack weakness)",
    )
    stage_order: dict[str, Any] = Field(
        default_factory=dict, description="how the stage order was chosen (the pilot's "
        "measurement of each stage's cost per removed point)")
    escalations: list[dict[str, Any]] = Field(
        default_factory=list, description="every escalation round: attack, budget, removed")
    masking_evidence: dict[str, Any] = Field(
        default_factory=dict,
        description="points gradient-free stages broke after the gradient stages, per stage, "
        "and the share of points with a zero input gradient")
    sanity: dict[str, Any] = Field(
        default_factory=dict, description="the numbers the sanity checks measured"
    )
    duration_s: float
    bastion_version: str
    created_at: str = Field(description="ISO 8601, UTC")
    examples: list[Example] = Field(default_factory=list)
    first_broken_by: list[str | None] = Field(
        default_factory=list,
        description="per point: the attack that broke it at the smallest epsilon (the "
        "earliest stage on a tie), 'clean' if misclassified without attack, null if robust",
    )
    first_broken_eps: list[float | None] = Field(
        default_factory=list, description="per point: the smallest epsilon at which it fell"
    )

    def robust_accuracy_at(self, eps: float) -> float:
        """Worst-case robust accuracy at ``eps`` (which must be one of ``epsilons``)."""
        return self.robust_accuracy[eps_key(eps)]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> ScanReport:
        return cls.model_validate_json(text)


def write_scan_report(
    report: ScanReport,
    out_dir: str | os.PathLike[str],
    *,
    json_name: str = "report.json",
    html_name: str | None = "report.html",
) -> dict[str, Path]:
    """Write ``report.json``, ``report.schema.json`` and ``report.html`` into ``out_dir``.

    Each file is written atomically. Pass ``html_name=None`` to skip the HTML.
    Returns the paths written, keyed ``"json"``, ``"schema"`` and ``"html"``.
    """
    from bastion.evaluate.render import render_scan_html

    out = Path(out_dir)
    check_output_dir(out)  # never write through a link
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["json"] = out / json_name
    write_json_atomic(paths["json"], json.loads(report.model_dump_json()))
    stem = Path(json_name).stem
    paths["schema"] = out / f"{stem}.schema.json"
    write_json_atomic(paths["schema"], ScanReport.model_json_schema())
    if html_name:
        paths["html"] = out / html_name
        write_text_atomic(paths["html"], render_scan_html(report))
    return paths
