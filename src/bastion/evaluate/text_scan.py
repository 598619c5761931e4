"""The text cascade: ``scan_text(model, texts, labels)`` and its report (JSON + HTML).

The cascade runs the text attacks in order, each only on the texts that every earlier
attack failed to flip: for a white-box text model ``hotflip``, ``word``, ``char``; for a
black-box one ``word``, ``char``. A text counts as robust when no attack flipped it
within its query budget and constraints, so robust accuracy here is an *upper* bound on
the model's true robustness (``lower_bound``: the attacks are a lower bound on an
attacker's strength), as for any empirical attack.

The report keeps per attack its success rate, queries (mean, and per success), the
share of words changed and MiniLM similarity of its successes, seconds, and examples
(original, adversarial, the labels by name: a Hugging Face model's ``id2label``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from bastion._util import check_output_dir, write_json_atomic, write_text_atomic
from bastion.errors import BastionError

WHITE_BOX_TEXT_CASCADE = ("hotflip", "word", "char")
BLACK_BOX_TEXT_CASCADE = ("word", "char")


class TextScanReport(BaseModel):
    """What a text scan found (written as ``report.json``)."""

    kind: str = "text"
    model: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    n_points: int
    clean_accuracy: float
    robust_accuracy: dict[str, float]
    robust_interval: dict[str, tuple[float, float]] = Field(default_factory=dict)
    lower_bound: bool = True
    preset: str = "text"
    attacks: list[str]
    per_attack: list[dict[str, Any]]
    constraints: dict[str, Any]
    examples: list[dict[str, Any]]
    warnings: list[str] = Field(default_factory=list)
    seconds: float = 0.0


def align_labels(data_names: list[str] | None, model: Any, y: np.ndarray) -> np.ndarray:
    """Map the data's label indices onto the model's when both name their classes (a
    Hugging Face ``id2label`` need not be in sorted order); else keep them."""
    names = getattr(model, "class_names", None)
    if not data_names or not names or list(data_names) == list(names):
        return y
    index = {str(n): i for i, n in enumerate(names)}
    if all(str(n) in index for n in data_names):
        lut = np.array([index[str(n)] for n in data_names], dtype=np.int64)
        return lut[y]
    if all(n.isdigit() for n in map(str, data_names)):
        return y
    missing = [n for n in data_names if str(n) not in index][:5]
    raise BastionError(f"the data's labels {missing} are not among the model's classes "
                       f"{list(names)[:10]}",
                       hint="scan with data labelled by the model's id2label names")


def scan_text(model: Any, texts: Any, labels: Any, *, attacks: list[str] | None = None,
              max_queries: int = 500, seed: int = 0, examples: int = 12,
              attack_options: dict[str, dict[str, Any]] | None = None,
              **constraints: Any) -> TextScanReport:
    """Run the text cascade (see the module docs) on ``texts`` with true ``labels``."""
    import time

    from bastion.attacks.text import TEXT_ATTACKS, get_text_attack

    white = callable(getattr(model, "embedding_gradient", None))
    names = list(attacks or (WHITE_BOX_TEXT_CASCADE if white else BLACK_BOX_TEXT_CASCADE))
    bad = [a for a in names if a not in TEXT_ATTACKS]
    if bad:
        raise BastionError(f"unknown text attack {bad[0]!r}",
                           hint=f"text models take: {', '.join(TEXT_ATTACKS)}")
    if "hotflip" in names and not white:
        raise BastionError("hotflip needs a white-box text model; this one is black-box",
                           hint="use --attacks word,char")
    extra = dict(attack_options or {})
    unknown = [k for k in extra if k not in names]
    if unknown:
        raise BastionError(f"--set names attack {unknown[0]!r}, which is not in the cascade",
                           hint=f"the cascade runs {', '.join(names)}")
    texts = [str(t) for t in texts]
    y = np.asarray(labels, dtype=np.int64)
    t0 = time.perf_counter()
    pred = np.asarray(model.predict_proba(texts)).argmax(1)
    alive = pred == y
    clean = float(alive.mean()) if len(y) else 0.0
    per_attack: list[dict[str, Any]] = []
    found: list[dict[str, Any]] = []
    cons_used: dict[str, Any] = {}
    cname = list(getattr(model, "class_names", None) or [])

    def label_name(k: int) -> str:
        return str(cname[k]) if 0 <= k < len(cname) else str(k)

    for name in names:
        opts = {"max_queries": max_queries, "seed": seed, **constraints, **extra.get(name, {})}
        attack = get_text_attack(name, **opts)
        idx = np.flatnonzero(alive)
        rep = attack.run(model, [texts[i] for i in idx], y[idx])
        cons_used = {k: v for k, v in attack.settings().items()}
        for i, r in zip(idx, rep.results, strict=True):
            if r.success:
                alive[i] = False
                if len(found) < examples:
                    found.append({"attack": name, "original": r.original,
                                  "adversarial": r.adversarial, "label": label_name(r.label),
                                  "adversarial_label": label_name(r.adversarial_pred),
                                  "words_changed": r.words_changed, "queries": r.queries,
                                  "similarity": round(r.similarity, 4)})
        s = rep.summary()
        s["robust_accuracy_after"] = float(alive.mean()) if len(y) else 0.0
        per_attack.append({k: v for k, v in s.items() if not k.startswith("setting_")})
    robust = float(alive.mean()) if len(y) else 0.0
    warnings = []
    if clean < 0.5:
        warnings.append(f"clean accuracy is {clean:.1%}: check that the data and the model's "
                        "labels belong together")
    return TextScanReport(
        model={"n_classes": int(model.n_classes), "white_box": white,
               "class_names": cname[:200], "name": getattr(model, "name", "")},
        n_points=len(y), clean_accuracy=clean, robust_accuracy={"cascade": robust},
        attacks=names, per_attack=per_attack, constraints=cons_used, examples=found,
        warnings=warnings, seconds=round(time.perf_counter() - t0, 2))


def render_text_scan_html(report: TextScanReport) -> str:
    from bastion.reporting.html import HtmlPage

    page = HtmlPage("Text robustness scan",
                    subtitle=f"model {report.model.get('spec', report.model.get('name', ''))}"
                    f" · data {report.data.get('spec', '')} · {report.n_points} texts")
    page.heading("Accuracy")
    page.table([["clean", report.clean_accuracy],
                ["robust (after the cascade)", report.robust_accuracy["cascade"]]],
               ["", "accuracy"])
    for w in report.warnings:
        page.warning(w)
    page.heading("Attacks (each on the texts the earlier ones did not flip)")
    rows = [[a["attack"], a["n"], a["success_rate"], a["queries_mean"],
             a["queries_per_success"] if a["queries_per_success"] is not None else "n/a",
             a["words_changed_share"] if a["words_changed_share"] is not None else "n/a",
             a["similarity_mean"] if a["similarity_mean"] is not None else "n/a",
             a["seconds"], a["robust_accuracy_after"]] for a in report.per_attack]
    page.table(rows, ["attack", "texts", "success rate", "queries (mean)",
                      "queries per success", "share of words changed", "similarity",
                      "seconds", "robust accuracy after"])
    page.paragraph("Constraints: " + ", ".join(f"{k}={v}" for k, v in
                                              report.constraints.items()))
    page.heading("Examples")
    if report.examples:
        page.table([[e["attack"], e["original"], e["adversarial"],
                     f"{e['label']} → {e['adversarial_label']}", e["words_changed"],
                     e["similarity"], e["queries"]] for e in report.examples],
                   ["attack", "original", "adversarial", "prediction", "words changed",
                    "similarity", "queries"])
    else:
        page.paragraph("No attack succeeded.")
    return page.render()


def write_text_scan_report(report: TextScanReport,
                           out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir`` (atomically)."""
    out = Path(out_dir)
    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "html": out / "report.html"}
    write_json_atomic(paths["json"], json.loads(report.model_dump_json()))
    write_text_atomic(paths["html"], render_text_scan_html(report))
    return paths
