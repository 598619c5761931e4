"""The before/after report of a hardening run: pydantic models, JSON and one HTML page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bastion._util import check_output_dir, write_json_atomic, write_text_atomic
from bastion.reporting.html import HtmlPage


class Curve(BaseModel):
    """Accuracy of one model (before or after hardening) under the evaluation."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    clean_accuracy: float
    robust_accuracy: dict[str, float] = Field(
        description="worst case over every attack run, keyed by str(float(epsilon))")
    norm: str
    attacks: list[str] = Field(description="the attack cascade, in order")
    per_attack: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="robust accuracy after each cascade stage (cumulative), per epsilon")
    l2_attack: str | None = Field(
        default=None, description="the L2 minimal attack run in addition (C&W)")
    l2_robust_accuracy: dict[str, float] | None = Field(
        default=None, description="robust accuracy under l2_attack, keyed by L2 radius")
    certified_accuracy: dict[str, float] | None = Field(
        default=None, description="randomized smoothing: certified accuracy per L2 radius")
    abstain_rate: float | None = None
    n_points: int
    warnings: list[str] = Field(default_factory=list)


class HardenReport(BaseModel):
    """What ``bastion harden`` did and what it achieved, before and after."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: int = 1
    method: str
    model: str
    data: str
    norm: str
    epsilons: list[float]
    seed: int
    settings: dict[str, Any]
    before: Curve
    after: Curve
    evaluation: list[str] = Field(
        description="which attacks were run against the hardened model, and why")
    verdict: str
    helps: bool | None = Field(description="robust accuracy clearly rose under the "
                               "strongest attack run (None: not measurable)")
    training: list[dict[str, Any]] = Field(default_factory=list,
                                           description="one entry per training epoch")
    stopped_early: bool = False
    recoveries: list[dict[str, Any]] = Field(
        default_factory=list,
        description="catastrophic-overfitting recoveries: epoch, held-out robust accuracy "
        "collapsed and best, epoch restored, lr and step scales from then on")
    ended_on_best: bool = Field(
        default=False, description="the last epoch was worse on the held-out batch than "
        "the best, so the best checkpoint is the model returned")
    seeds: dict[str, Any] | None = Field(
        default=None, description="several seeds: each run, median and spread, the seed "
        "kept (chosen on validation data) - see bastion.defend.seeds")
    environment: dict[str, Any] = Field(
        default_factory=dict, description="CPU model and flags, cores, torch version and "
        "threads: floating-point results change with them (bastion.envinfo)")
    resumed_from_epoch: int = 0
    timings: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    model_dir: str | None = None
    bastion_version: str
    created_at: str


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _curves_figure(report: HardenReport) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, title, c in ((axes[0], "Before", report.before), (axes[1], "After", report.after)):
        eps = [float(k) for k in c.robust_accuracy]
        for name, acc in c.per_attack.items():
            ax.plot([float(k) for k in acc], list(acc.values()), "--", lw=1, alpha=0.7,
                    label=f"after {name}")
        ax.plot(eps, list(c.robust_accuracy.values()), "o-", lw=2, color="black",
                label="worst case")
        if c is report.after:  # the undefended curve, for comparison
            b = report.before.robust_accuracy
            ax.plot([float(k) for k in b], list(b.values()), ":", lw=1.5, color="grey",
                    label="worst case before")
        ax.set_title(f"{title}: {c.model}", fontsize=9)
        ax.set_xlabel(f"epsilon ({c.norm})")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    return fig


def _extra_figure(report: HardenReport) -> Any | None:
    a, b = report.after, report.before
    panels = []
    if a.certified_accuracy:
        panels.append(("certified accuracy (L2 radius)", {"after": a.certified_accuracy}))
    if a.l2_robust_accuracy:
        series = {"after": a.l2_robust_accuracy}
        if b.l2_robust_accuracy:
            series["before"] = b.l2_robust_accuracy
        panels.append((f"{a.l2_attack} (L2 epsilon)", series))
    if report.training:
        ep = [h["epoch"] for h in report.training]
        panels.append(("training (guard batch)", {
            "clean": dict(zip(map(str, ep), [h["clean_accuracy"] for h in report.training],
                              strict=True)),
            "robust": dict(zip(map(str, ep), [h["robust_accuracy"] for h in report.training],
                               strict=True))}))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels, strict=True):
        for name, d in series.items():
            ax.plot([float(k) for k in d], list(d.values()), "o-", label=name)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def render_harden_html(report: HardenReport) -> str:
    """One self-contained HTML page: verdict, before/after curves side by side, tables."""
    page = HtmlPage(f"Hardening: {report.method}",
                    subtitle=f"model {report.model} - data {report.data} - norm {report.norm}"
                    f" - seed {report.seed} - {report.created_at}")
    page.heading("Verdict")
    if report.helps is True:
        page.good(report.verdict)
    elif report.helps is False:
        page.bad(report.verdict)
    else:
        page.warning(report.verdict)
    for w in report.warnings:
        page.warning(w)
    page.heading("Robust accuracy before and after")
    page.figure(_curves_figure(report), alt="robust accuracy curves before and after")
    rows = []
    for k in report.after.robust_accuracy:
        rows.append([k, _fmt(report.before.robust_accuracy.get(k)),
                     _fmt(report.after.robust_accuracy.get(k))])
    page.table([["clean", _fmt(report.before.clean_accuracy),
                 _fmt(report.after.clean_accuracy)]] + rows,
               headers=[f"epsilon ({report.norm})", "before", "after"])
    extra = _extra_figure(report)
    if extra is not None:
        page.heading("Certificates, L2 attack and training")
        page.figure(extra, alt="certified accuracy, L2 attack and training curves")
    if report.after.certified_accuracy:
        page.table([[r, _fmt(v)] for r, v in report.after.certified_accuracy.items()],
                   headers=["L2 radius", "certified accuracy"])
        if report.after.abstain_rate is not None:
            page.paragraph(f"The smoothed classifier abstained on "
                           f"{_fmt(report.after.abstain_rate)} of the points.")
    if report.after.l2_robust_accuracy:
        before_l2 = report.before.l2_robust_accuracy or {}
        page.table([[r, _fmt(before_l2.get(r)), _fmt(v)]
                    for r, v in report.after.l2_robust_accuracy.items()],
                   headers=[f"L2 epsilon ({report.after.l2_attack})", "before", "after"])
    page.heading("How the hardened model was attacked")
    for line in report.evaluation:
        page.paragraph(line)
    for side, c in (("before", report.before), ("after", report.after)):
        for w in c.warnings:
            page.warning(f"scan of the model {side} hardening: {w}")
    if report.training:
        page.heading("Training")
        page.table([[h["epoch"], round(h["loss"], 4), _fmt(h["clean_accuracy"]),
                     _fmt(h["robust_accuracy"]), round(h["eps"], 4), f"{h['lr']:.2g}",
                     round(h["time_s"], 1),
                     ("collapse, recovered" if h.get("recovered") else "collapse")
                     if h.get("collapsed") else ""]
                    for h in report.training],
                   headers=["epoch", "loss", "clean", "robust (PGD)", "eps", "lr", "s", ""])
        if report.stopped_early:
            page.warning("Training stopped early: robust accuracy on the held-out batch "
                         "collapsed (catastrophic overfitting); the best checkpoint was kept.")
    if report.seeds:
        _seeds_section(page, report)
    page.heading("Settings")
    page.table([[k, json.dumps(v)] for k, v in report.settings.items()],
               headers=["setting", "value"])
    page.table([[k, round(v, 2)] for k, v in report.timings.items()],
               headers=["phase", "seconds"])
    if report.environment:
        from bastion.envinfo import environment_line

        page.heading("Machine")
        page.paragraph("Floating-point results, and so training runs, change with these: "
                       + environment_line(report.environment) + ".")
    return page.render()


def _seeds_section(page: HtmlPage, report: HardenReport) -> None:
    s = report.seeds or {}
    page.heading(f"Seeds ({s.get('n_seeds')})")
    page.paragraph(f"Kept: seed {s.get('kept_seed')}, chosen on {s.get('selection')}. "
                   f"Test numbers: {s.get('test_evaluation', '')}")
    rows = []
    for r in s.get("runs", []):
        t = r.get("test", {})
        rows.append([r["seed"], _fmt(r["val_clean_accuracy"]), _fmt(r["val_robust_accuracy"]),
                     _fmt(t.get("clean_accuracy")), _fmt(t.get("robust_accuracy")),
                     round(r["train_s"], 1), len(r.get("recoveries", [])),
                     "kept" if r["seed"] == s.get("kept_seed") else ""])
    st = s.get("stats", {})
    for label in ("median", "min", "max"):
        rows.append([label] + [_fmt(st.get(k, {}).get(label)) for k in (
            "val_clean_accuracy", "val_robust_accuracy", "test_clean_accuracy",
            "test_robust_accuracy")] + [round(st.get("train_s", {}).get(label, 0.0), 1), "",
                                        ""])
    page.table(rows, headers=["seed", "val clean", "val robust", "test clean",
                              "test robust", "train s", "recoveries", ""])


def write_harden_report(report: HardenReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.schema.json`` and ``report.html`` atomically."""
    out = Path(out_dir)
    check_output_dir(out)  # never write through a link
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "schema": out / "report.schema.json",
             "html": out / "report.html"}
    html = render_harden_html(report)  # render first: a failure writes nothing
    write_json_atomic(paths["json"], json.loads(report.model_dump_json()))
    write_json_atomic(paths["schema"], HardenReport.model_json_schema())
    write_text_atomic(paths["html"], html)
    return paths
