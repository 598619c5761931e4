"""Render a :class:`~bastion.evaluate.report.ScanReport` as one self-contained HTML page.

Plots are drawn with matplotlib's object API (no pyplot state, no display needed) and
inlined as base64 PNG; the page has no external URL at all.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from bastion.evaluate.report import ScanReport, eps_key
from bastion.reporting.html import HtmlPage, figure_to_img, image_grid, table


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _curve_figure(report: ScanReport) -> Figure:
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    eps = report.epsilons
    styles = ["--", ":", "-."]
    for i, s in enumerate(report.per_attack):
        vals = [s.robust_accuracy_after[eps_key(e)] for e in eps]
        ax.plot(eps, vals, styles[i % len(styles)], marker=".", alpha=0.75,
                label=f"after {s.stage}. {s.name}")
    worst = [report.robust_accuracy[eps_key(e)] for e in eps]
    ax.plot(eps, worst, "-", marker="o", color="black", linewidth=2, label="worst case")
    ax.axhline(report.clean_accuracy, color="tab:gray", linewidth=1, alpha=0.6,
               label="clean accuracy")
    chance = 1.0 / max(1, int(report.model.get("n_classes", 2)))
    ax.axhline(chance, color="tab:red", linewidth=1, alpha=0.4, linestyle=":", label="chance")
    ax.set_xlabel(f"epsilon ({report.norm})")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def render_scan_html(report: ScanReport) -> str:
    """The scan report as a self-contained HTML document (inline CSS and images)."""
    m = report.model
    page = HtmlPage(
        f"Robustness scan: {m.get('name', 'model')}",
        subtitle=(
            f"{report.n_points} points, norm {report.norm}, preset {report.preset}, "
            f"seed {report.seed}, "
            f"{'white-box' if m.get('white_box') else 'black-box'} model, "
            f"Bastion {report.bastion_version}, {report.created_at}, "
            f"{report.duration_s:.1f} s"
        ),
    )

    page.heading("Summary")
    worst_eps = report.epsilons[-1]
    page.paragraph(
        f"Clean accuracy {_pct(report.clean_accuracy)}; worst-case robust accuracy "
        f"{_pct(report.robust_accuracy[eps_key(worst_eps)])} at epsilon {worst_eps:.4g} "
        f"over the cascade {' -> '.join(report.attacks)}."
    )
    if report.lower_bound:
        page.warning(
            f"Preset {report.preset}: a cheap cascade, so this robust accuracy is a LOWER BOUND "
            "on the attack's strength (the true robust accuracy may be lower). Use the "
            "standard preset for a number to rely on.")
    rows: list[list[Any]] = [["clean", _pct(report.clean_accuracy), ""]]
    for e in report.epsilons:
        iv = report.robust_interval.get(eps_key(e))
        rows.append([f"{e:.4g}", _pct(report.robust_accuracy[eps_key(e)]),
                     f"{_pct(iv[0])} - {_pct(iv[1])}" if iv else "-"])
    page.table(rows, ["epsilon", "robust accuracy", "95% interval (Wilson)"])
    if report.warnings:
        for w in report.warnings:
            page.warning(w)
    else:
        page.good("All sanity checks passed: no sign of gradient masking or a failing attack.")

    page.heading("Robust accuracy versus epsilon")
    page.raw(figure_to_img(_curve_figure(report), alt="robust accuracy versus epsilon"))

    page.heading("Attacks")
    overview = [
        [s.stage, s.name, s.phase + (f" {s.round}" if s.round else ""), s.kind,
         "white" if s.white_box else "black", s.points_attacked,
         s.points_broken, s.queries_total, round(s.queries_mean, 1), round(s.time_s, 2),
         "-" if s.grad_norm_mean is None else f"{s.grad_norm_mean:.3g}",
         s.error or ""]
        for s in report.per_attack
    ]
    page.table(overview, ["stage", "attack", "phase", "kind", "box", "points attacked",
                          "newly broken",
                          "queries", "queries/point", "time (s)", "grad norm", "error"])
    if report.stage_order:
        page.raw("<h3>Stage order</h3>")
        so = report.stage_order
        if so.get("measured"):
            page.paragraph(f"Measured on a pilot of {so['pilot_points']} points, each stage "
                           f"alone; rule: {so['rule']}.")
            def per(r: dict, k: str, nd: int) -> Any:
                return "-" if r.get(k) is None else round(r[k], nd)

            page.table([[r["stage"], r["points"], r["removed"], r.get("queries", "-"),
                         per(r, "queries_per_removal", 1), r["time_s"],
                         per(r, "s_per_removal", 3)] for r in so["stages"]],
                       ["stage", "pilot points", "removed", "queries", "queries per removal",
                        "time (s)", "s per removal"])
        else:
            page.paragraph(str(so.get("note", "the order given")))
    if report.escalations:
        page.raw("<h3>Escalation</h3>")
        page.paragraph("Each round restarts Square (new seed, the preset's budget) on the "
                       "survivors that came closest to falling (smallest margin reached by a "
                       "gradient-free search).")
        page.table([[e["round"], e["attack"], e["max_queries"], e["points_attacked"],
                     f"{100 * e.get('share_of_survivors', 1.0):.0f}%",
                     "" if e.get("margin_cutoff") is None else f"{e['margin_cutoff']:.3f}",
                     e["removed"], e["time_s"]] for e in report.escalations],
                   ["round", "attack", "queries per point", "attacked", "share of survivors",
                    "margin up to", "removed", "time (s)"])
    if report.first_broken_by:
        counts: dict[str, int] = {}
        for who in report.first_broken_by:
            key = "still robust at every epsilon" if who is None else who
            counts[key] = counts.get(key, 0) + 1
        page.paragraph("Points by the attack that broke them at the smallest epsilon:")
        page.table(sorted(counts.items(), key=lambda kv: -kv[1]), ["broken first by", "points"])
    for s in report.per_attack:
        page.raw(f"<h3>{s.stage}. {_esc(s.name)}</h3>")
        page.raw(f'<p class="meta">{_esc(s.params)}</p>')
        rows = [
            [f"{e:.4g}", s.points_attacked_per_eps[eps_key(e)], s.newly_broken[eps_key(e)],
             _pct(s.success_rate[eps_key(e)]), _pct(s.robust_accuracy_after[eps_key(e)])]
            for e in report.epsilons
        ]
        page.table(rows, ["epsilon", "attacked", "newly broken", "success among attacked",
                          "robust accuracy after"])

    if report.examples:
        page.heading("Examples")
        for ex in report.examples:
            cap = (f"#{ex.index} by {ex.attack} at eps {ex.epsilon:.4g} "
                   f"(norm {ex.perturbation_norm:.3g}): label {ex.true_label}, "
                   f"clean pred {ex.clean_pred}, adversarial pred {ex.adv_pred}")
            if ex.x_clean is not None and ex.x_adv is not None:
                xc, xa = np.asarray(ex.x_clean), np.asarray(ex.x_adv)
                diff = np.abs(xa - xc)
                page.raw(
                    image_grid(
                        [xc, xa, diff],
                        [f"#{ex.index} clean: pred {ex.clean_pred}",
                         f"adversarial: pred {ex.adv_pred}",
                         "|difference|"],
                    )
                )
                page.raw(f'<p class="meta">{_esc(cap)}</p>')
            else:
                page.paragraph(cap)
                if ex.feature_changes:
                    page.table(
                        [[c["feature"], float(c["clean"]), float(c["adv"]), float(c["delta"])]
                         for c in ex.feature_changes],
                        ["feature", "clean", "adversarial", "change"],
                    )

    if report.sanity:
        page.heading("Sanity measurements")
        page.table([[k, _fmt(v)] for k, v in report.sanity.items()], ["check", "value"])

    page.heading("Model and data")
    info = [[f"model.{k}", _fmt(v)] for k, v in report.model.items()]
    info += [[f"data.{k}", _fmt(v)] for k, v in report.data.items()]
    page.raw(table(info, ["field", "value"]))
    return page.render()


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return v
    if v is None:
        return "-"
    return str(v)


def _esc(s: str) -> str:
    import html

    return html.escape(str(s), quote=True)
