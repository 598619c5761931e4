"""Adversarial data augmentation for the zoo's text model (frozen encoder + head).

``augment_text_model(model, x_train, y_train)`` attacks a sample of the training texts
with the text attacks (word and character level by default), keeps the successful
adversarial texts with their *true* labels, and fits a new head on the pooled features of
the training texts plus those adversarial texts (the encoder stays frozen, so the features
of the training texts are computed once). ``evaluate_text_robustness`` measures clean
accuracy and attack success on held-out texts, before and after.

Only :class:`~bastion.models.text.MeanPoolTextModel` (``bastion train --model
text-intent``) is retrained here; other text models raise one clear error.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from bastion.errors import BastionError


def evaluate_text_robustness(model: Any, texts: list[str], labels: np.ndarray, *,
                             attacks: tuple[str, ...] = ("word", "char"),
                             max_queries: int = 300, seed: int = 0,
                             **constraints: Any) -> dict[str, Any]:
    """Clean accuracy and, per attack, success rate on ``texts`` (each attack separately)."""
    from bastion.attacks.text import get_text_attack

    y = np.asarray(labels, dtype=np.int64)
    out: dict[str, Any] = {"n": len(texts), "clean_accuracy": float(
        (np.asarray(model.predict_proba(texts)).argmax(1) == y).mean())}
    for name in attacks:
        rep = get_text_attack(name, max_queries=max_queries, seed=seed,
                              **constraints).run(model, texts, y)
        s = rep.summary()
        out[name] = {k: s[k] for k in ("success_rate", "robust_accuracy", "queries_mean")}
    return out


def augment_text_model(model: Any, x_train: Any, y_train: Any, *, n_attack: int = 1000,
                       attacks: tuple[str, ...] = ("word", "char"), max_queries: int = 300,
                       epochs: int = 60, lr: float = 1e-2, seed: int = 0,
                       **constraints: Any) -> tuple[Any, dict[str, Any]]:
    """A copy of ``model`` with a head refitted on training + adversarial texts (see the
    module docs); returns ``(hardened, info)``."""
    from bastion.attacks.text import get_text_attack
    from bastion.models.text import MeanPoolTextModel, fit_head, pooled_features

    if not isinstance(model, MeanPoolTextModel) or model.fine_tuned:
        raise BastionError("text augmentation retrains the head of the zoo's frozen "
                           "text-intent model; this model is not one",
                           hint="train one with bastion train --model text-intent")
    t0 = time.perf_counter()
    texts = [str(t) for t in x_train]
    y = np.asarray(y_train, dtype=np.int64)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(texts), min(int(n_attack), len(texts)), replace=False)
    adv_texts: list[str] = []
    adv_labels: list[int] = []
    per_attack: dict[str, int] = {}
    for k, name in enumerate(attacks):
        part = pick[k::len(attacks)]
        rep = get_text_attack(name, max_queries=max_queries, seed=seed, **constraints).run(
            model, [texts[i] for i in part], y[part])
        found = [(r.adversarial, r.label) for r in rep.results if r.success]
        per_attack[name] = len(found)
        adv_texts += [a for a, _ in found]
        adv_labels += [lab for _, lab in found]
    hardened = copy.copy(model)
    hardened.net = copy.deepcopy(model.net)
    feats = pooled_features(model, texts)
    if adv_texts:
        feats = torch.cat([feats, pooled_features(model, adv_texts)])
    y_all = torch.as_tensor(np.concatenate([y, np.asarray(adv_labels, dtype=np.int64)]))
    fit_head(hardened.net.head, feats, y_all, epochs=epochs, lr=lr, seed=seed,
             reset=True)
    hardened.net.requires_grad_(False)
    hardened.queries = 0
    if hasattr(hardened, "_bastion_neighbours"):
        del hardened._bastion_neighbours
    info = {"attacked": len(pick), "adversarial_added": len(adv_texts),
            "per_attack": per_attack, "seconds": round(time.perf_counter() - t0, 1),
            "adversarial": list(zip(adv_texts, adv_labels, strict=True))}
    return hardened, info


# ---------------------------------------------------------------- bastion harden (text)


@dataclass
class TextSide:
    """One side (before or after) of a text hardening report."""

    clean_accuracy: float
    robust_accuracy: dict[str, float]
    success_rate: dict[str, float]
    certified_accuracy: dict[str, float] | None = None


@dataclass
class TextHardenReport:
    before: TextSide
    after: TextSide
    helps: bool
    verdict: str
    augmentation: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextHardenResult:
    report: TextHardenReport
    paths: dict[str, Any]
    model: Any


def harden_text(model: Any, ds: Any, *, method: str, out: Any, limit: int | None = 200,
                seed: int = 0, options: dict[str, Any] | None = None,
                model_label: str = "") -> TextHardenResult:
    """``bastion harden`` for the zoo text model: ``--method augment`` (adversarial data
    augmentation, :func:`augment_text_model`), evaluated before and after with the word and
    character attacks on a seeded sample of ``limit`` test texts; writes the hardened model
    (``out/model``), ``report.json`` and ``report.html``."""
    import json
    from pathlib import Path

    from bastion._util import check_output_dir, write_json_atomic, write_text_atomic
    from bastion.models.text import save_text_model
    from bastion.reporting.html import HtmlPage

    if method != "augment":
        raise BastionError(f"text models are hardened with --method augment, not {method!r}",
                           hint="bastion harden --method augment (adversarial augmentation)")
    opts = dict(options or {})
    allowed = {"n_attack", "max_queries", "epochs", "lr"}
    bad = [k for k in opts if k not in allowed]
    if bad:
        raise BastionError(f"unknown option {bad[0]!r} for --method augment",
                           hint=f"options: {', '.join(sorted(allowed))}")
    max_queries = int(opts.pop("max_queries", 300))
    out = Path(out)
    check_output_dir(out)
    n = min(len(ds.x_test), int(limit or 200))
    pick = np.sort(np.random.default_rng(seed).choice(len(ds.x_test), n, replace=False))
    texts, labels = [str(t) for t in ds.x_test[pick]], np.asarray(ds.y_test)[pick]
    hardened, info = augment_text_model(model, ds.x_train, ds.y_train, seed=seed,
                                        max_queries=max_queries, **opts)
    sides = {}
    for name, m in (("before", model), ("after", hardened)):
        r = evaluate_text_robustness(m, texts, labels, max_queries=max_queries, seed=seed)
        sides[name] = TextSide(clean_accuracy=r["clean_accuracy"],
                               robust_accuracy={a: r[a]["robust_accuracy"]
                                                for a in ("word", "char")},
                               success_rate={a: r[a]["success_rate"] for a in ("word", "char")})
    b, a = sides["before"], sides["after"]
    helps = all(a.success_rate[k] < b.success_rate[k] for k in ("word", "char"))
    verdict = (f"attack success {', '.join(f'{k} {b.success_rate[k]:.1%} -> {a.success_rate[k]:.1%}' for k in ('word', 'char'))}; "  # noqa: E501
               f"clean accuracy {b.clean_accuracy:.1%} -> {a.clean_accuracy:.1%} on {n} texts")
    out.mkdir(parents=True, exist_ok=True)
    info.pop("adversarial", None)
    save_text_model(hardened, out / "model", extra={"hardened": {"method": "augment", **info}})
    doc = {"kind": "text", "method": "augment", "model": model_label, "n_eval": n,
           "before": asdict(b), "after": asdict(a), "helps": helps, "verdict": verdict,
           "augmentation": info}
    paths = {"json": out / "report.json", "html": out / "report.html", "model": out / "model"}
    write_json_atomic(paths["json"], json.loads(json.dumps(doc)))
    page = HtmlPage("Text hardening: adversarial augmentation", subtitle=model_label)
    page.table([[k, b.clean_accuracy, a.clean_accuracy, b.success_rate.get(k, 0.0),
                 a.success_rate.get(k, 0.0)] for k in ("word", "char")],
               ["attack", "clean before", "clean after", "success before", "success after"])
    (page.good if helps else page.bad)(verdict)
    page.paragraph(f"Augmentation: {info}")
    write_text_atomic(paths["html"], page.render())
    return TextHardenResult(TextHardenReport(b, a, helps, verdict, info), paths, hardened)
