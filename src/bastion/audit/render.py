"""HTML rendering of the audit reports (one self-contained page each, plots inline)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bastion.reporting.html import HtmlPage, image_grid


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _header(page: HtmlPage, report: Any) -> None:
    page.paragraph(f"model: {report.model or '-'} | data: {report.data} | seed: {report.seed}"
                   f" | {report.time_s:.1f}s | bastion {report.bastion_version}")
    for w in report.warnings:
        page.warning(w)
    for k, v in getattr(report, "skipped", {}).items():
        page.warning(f"{k} skipped: {v}")


def data_html(report: Any, ds: Any, scores: dict[str, np.ndarray], combined: np.ndarray,
              res: Any) -> str:
    page = HtmlPage("Data audit: poisoning and label noise", subtitle=report.created)
    _header(page, report)
    if report.verdict:
        (page.bad if report.abnormal else page.good)(report.verdict)
    page.heading("Detectors")
    page.table([[d.detector, d.needs, d.flagged, d.recall if d.recall is not None else "-",
                 d.precision if d.precision is not None else "-", d.time_s]
                for d in report.detectors],
               ["detector", "needs", "flagged", "recall", "precision", "time (s)"])
    plt = _plt()
    fig, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 2.6), squeeze=False)
    for ax, (name, s) in zip(axes[0], scores.items(), strict=True):
        ax.hist(s, bins=40, color="#4a6fa5")
        ax.set_title(name, fontsize=9)
        ax.set_yscale("log")
    page.figure(fig, alt="suspicion score histograms")
    page.heading("Sanitising")
    verb = "removed" if report.mode == "remove" else "relabelled"
    page.paragraph(f"{len(res.log)} training samples {verb} using the '{report.combined_detector}'"
                   f" scores (threshold {res.threshold:.4g}).")
    if report.cleaned_path:
        page.paragraph(f"cleaned data: {report.cleaned_path}; log: {report.removed_csv}. "
                       "The original data file was not modified.")
    if res.log:
        if report.whole_file:  # the rows of the user's file
            page.table([[r["row"], r.get("id", ""), r["score"], r["label"]]
                        for r in report.flagged_rows[:30]],
                       ["row (0 = first after the header)", "id", "score", "label"])
        else:
            page.table([[e.index, e.score, e.label,
                         "" if e.new_label is None else e.new_label, e.reason]
                        for e in res.log[:30]],
                       ["index", "score", "label", "new label", "reason"])
        if ds.kind == "image":
            idx = [e.index for e in res.log[:16]]
            page.raw(image_grid([ds.x_train[i] for i in idx],
                                [f"#{i} y={int(ds.y_train[i])}" for i in idx]))
    return page.render()


def backdoor_html(report: Any, masks: np.ndarray | None) -> str:
    page = HtmlPage("Backdoor audit: STRIP and Neural Cleanse", subtitle=report.created)
    _header(page, report)
    if "suspects" in report.verdict or "flags" in report.verdict:
        page.bad(report.verdict)
    else:
        page.good(report.verdict)
    page.paragraph(f"clean test accuracy {report.clean_accuracy:.4f}; "
                   f"white-box: {report.white_box}")
    plt = _plt()
    if report.strip:
        s = report.strip
        page.heading("STRIP (entropy under superimposition)")
        rows = [["flagged share of test inputs", s.flagged_share_test],
                ["calibrated FPR", s.fpr], ["mean entropy on clean", s.entropy_clean_mean]]
        if s.auc_triggered is not None:
            rows += [["AUC clean vs triggered", s.auc_triggered],
                     ["detection rate on triggered", s.detection_rate_triggered]]
        page.table(rows, ["metric", "value"])
        fig, ax = plt.subplots(figsize=(5, 2.6))
        ax.hist(s.entropy_clean, bins=30, alpha=0.6, label="clean (calibration)")
        ax.hist(s.entropy_test, bins=30, alpha=0.6, label="test inputs")
        ax.axvline(-s.threshold, color="r", ls="--", label="threshold")
        ax.set_xlabel("mean entropy")
        ax.legend(fontsize=7)
        page.figure(fig, alt="STRIP entropy")
    if report.neural_cleanse:
        n = report.neural_cleanse
        page.heading("Neural Cleanse (reverse-engineered triggers)")
        page.table([[c, n.mask_l1[c], n.anomaly_index[c], n.attack_success[c],
                     "yes" if c in n.flagged else ""] for c in range(len(n.mask_l1))],
                   ["class", "mask L1", "anomaly index", "trigger success", "flagged"])
        fig, ax = plt.subplots(figsize=(5, 2.6))
        ax.bar(range(len(n.mask_l1)), n.mask_l1, color=["#d33" if c in n.flagged else "#4a6fa5"
                                                         for c in range(len(n.mask_l1))])
        ax.set_xlabel("class")
        ax.set_ylabel("mask L1")
        page.figure(fig, alt="mask norms")
        if masks is not None and masks.ndim == 4:
            page.raw(image_grid(list(masks), [f"mask class {c}" for c in range(len(masks))]))
    return page.render()


def extraction_html(report: Any) -> str:
    page = HtmlPage("Extraction audit", subtitle=report.created)
    _header(page, report)
    page.paragraph(f"victim test accuracy {report.victim_accuracy:.4f}; budget {report.budget}")
    if report.equation_solving:
        e = report.equation_solving
        page.heading("Equation solving (linear/logistic models)")
        page.bad(f"with {e['queries']} queries (d + 1 = {e['d'] + 1}) the model was copied with "
                 f"fidelity {e['fidelity']:.4f}")
    page.heading("Surrogate (Knockoff-style) extraction")
    page.table([[p.queries, p.fidelity, p.accuracy if p.accuracy is not None else "-"]
                for p in report.surrogate_curve], ["queries", "fidelity", "accuracy"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 2.8))
    q = [p.queries for p in report.surrogate_curve]
    ax.plot(q, [p.fidelity for p in report.surrogate_curve], "o-", label="fidelity")
    if report.surrogate_curve and report.surrogate_curve[0].accuracy is not None:
        ax.plot(q, [p.accuracy for p in report.surrogate_curve], "s--", label="accuracy")
    ax.set_xlabel("queries")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    page.figure(fig, alt="fidelity vs queries")
    page.heading("Output hardening")
    page.table([[h.hardening, h.accuracy, h.accuracy_cost, h.changed_labels,
                 h.surrogate_fidelity if h.surrogate_fidelity is not None else "-",
                 h.equation_solving_fidelity if h.equation_solving_fidelity is not None
                 else (h.note or "-")] for h in report.hardening],
               ["hardening", "accuracy", "accuracy cost", "changed labels",
                "surrogate fidelity", "equation-solving fidelity"])
    page.heading("Query-stream detector (PRADA)")
    page.paragraph(f"alarm when the Shapiro-Wilk W of min-distances < {report.prada_delta}")
    page.table([[s.stream, s.kind, s.n_queries, "yes" if s.detected else "no",
                 s.detected_at if s.detected_at is not None else "-", s.min_w]
                for s in report.streams],
               ["stream", "kind", "queries", "alarm", "after queries", "min W"])
    fa = [s.stream for s in report.streams if s.kind == "benign" and s.detected]
    missed = [s.stream for s in report.streams if s.kind == "attack" and not s.detected]
    if fa:
        page.warning(f"false alarms on benign streams ({', '.join(fa)}): natural queries of "
                     "this data do not give normally distributed distances, so the detector "
                     "is unreliable here as configured")
    if missed:
        page.warning(f"not detected: {', '.join(missed)} (PRADA targets synthetic, "
                     "perturbation-based query streams; natural-data Knockoff queries and "
                     "random noise are known blind spots)")
    return page.render()


def privacy_html(report: Any, images: np.ndarray | None) -> str:
    page = HtmlPage("Privacy audit: membership inference and model inversion",
                    subtitle=report.created)
    _header(page, report)
    page.paragraph(f"{report.n_members} members (train) vs {report.n_nonmembers} non-members "
                   f"(test); accuracy on them {report.train_accuracy:.4f} / "
                   f"{report.test_accuracy:.4f}")
    page.heading("Membership inference")
    page.table([[a.attack, a.auc, a.tpr_at_0_1pct_fpr, a.tpr_at_1pct_fpr, a.time_s]
                for a in report.attacks],
               ["attack", "AUC", "TPR @ 0.1% FPR", "TPR @ 1% FPR", "time (s)"])
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for a in report.attacks:
        axes[0].plot(a.roc_fpr, a.roc_tpr, label=f"{a.attack} (AUC {a.auc:.3f})")
        f = np.maximum(np.asarray(a.roc_fpr), 1e-4)
        axes[1].plot(f, np.maximum(np.asarray(a.roc_tpr), 1e-4), label=a.attack)
    axes[0].plot([0, 1], [0, 1], "k:", lw=0.8)
    axes[0].set_xlabel("FPR")
    axes[0].set_ylabel("TPR")
    axes[0].legend(fontsize=7)
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].plot([1e-4, 1], [1e-4, 1], "k:", lw=0.8)
    axes[1].set_xlabel("FPR (log)")
    axes[1].set_title("low-FPR regime", fontsize=9)
    page.figure(fig, alt="ROC curves")
    if images is not None:
        page.heading("Model inversion: class representatives")
        page.raw(image_grid(list(images),
                            [f"class {c} ({p:.2f})" for c, p in zip(
                                report.inversion_classes, report.inversion_confidence,
                                strict=True)]))
    return page.render()
