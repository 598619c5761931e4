"""Train and evaluate detectors from JSONL files (what ``bastion llm ...`` commands call).

:func:`train_detector` fits a :class:`~bastion.llm.detector.PromptInjectionDetector` on the
``train`` rows of a labelled JSONL file (all rows when the file has no ``split`` field),
calibrates its threshold on a held-back fifth of the benign training rows (chosen by a hash
of the text, so scores used for calibration are never training scores), evaluates on the
``test`` rows when there are any, and saves the detector folder with ``metrics.json`` and
``report.html``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bastion._util import write_json_atomic, write_text_atomic
from bastion.errors import DataError
from bastion.llm.datasets import PromptRecord, load_prompt_jsonl
from bastion.llm.detector import PromptInjectionDetector
from bastion.llm.embed import DEFAULT_LAYERS, Embedder, EmbeddingCache
from bastion.llm.metrics import evaluate_detector
from bastion.reporting.html import HtmlPage

__all__ = [
    "detector_training_rows",
    "evaluate_all",
    "evaluate_loso",
    "extraction_attacks",
    "recipe_eval_sets",
    "recipe_weight",
    "evaluate_on_records",
    "fit_calibrated",
    "language_table",
    "loso_splits",
    "render_eval_html",
    "split_calibration",
    "train_detector",
]


def _bucket(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8", errors="replace")).hexdigest()[:8], 16) % 5


def split_calibration(
    records: Sequence[PromptRecord],
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """``(fit_rows, calibration_benign_rows)``: a fifth of the benign rows (by hash) is
    held back for threshold calibration."""
    fit: list[PromptRecord] = []
    cal: list[PromptRecord] = []
    for r in records:
        (cal if r.y == 0 and _bucket(r.text) == 0 else fit).append(r)
    return fit, cal


def evaluate_on_records(
    det: PromptInjectionDetector,
    records: Sequence[PromptRecord],
    *,
    harmful: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Full evaluation (:func:`bastion.llm.metrics.evaluate_detector`) on ``records``."""
    texts = [r.text for r in records]
    s = det.score(texts)
    hs = det.score(list(harmful)) if harmful else None
    return evaluate_detector(
        s,
        [r.y for r in records],
        texts,
        threshold=det.threshold_,
        subtypes=[r.subtype or r.label for r in records],
        hard_negative=[r.hard_negative for r in records],
        harmful_scores=hs,
    )


def train_detector(
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    fpr: float = 0.01,
    C: float = 16.0,
    cache_path: str | os.PathLike[str] | None = None,
    harmful: str | os.PathLike[str] | None = None,
    extra_train: Sequence[tuple[str, int]] = (),
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    embedder_layers: int | None = DEFAULT_LAYERS,
) -> tuple[PromptInjectionDetector, dict[str, Any]]:
    """Train, calibrate, evaluate and save a detector; return it and its metrics.

    ``embedder_layers``: MiniLM layers the embeddings come from (``None``: all 6)."""
    say = log or (lambda _m: None)
    rows = load_prompt_jsonl(data)
    train = [r for r in rows if r.split in (None, "train")]
    test = [r for r in rows if r.split == "test"]
    fit_rows, cal_rows = split_calibration(train)
    if not cal_rows:
        raise DataError("no benign training rows to calibrate the threshold on")
    cache = EmbeddingCache(cache_path) if cache_path else None
    det = PromptInjectionDetector(
        C=C, seed=seed, embedder=Embedder(cache=cache, layers=embedder_layers)
    )
    texts = [r.text for r in fit_rows] + [t for t, _ in extra_train]
    labels = [r.y for r in fit_rows] + [int(y) for _, y in extra_train]
    say(f"training on {len(texts)} texts ({sum(labels)} attacks)")
    det.fit(texts, labels)
    det.calibrate([r.text for r in cal_rows], fpr=fpr)
    say(
        f"threshold {det.threshold_:.4f} for {fpr:.2%} FPR "
        f"on {len(cal_rows)} held-back benign texts"
    )
    det.meta_.update({"trained_on": Path(data).name, "n_calibration": len(cal_rows)})
    metrics: dict[str, Any] = {
        "calibration": det.calibration_,
        "n_train": len(texts),
        "n_test": len(test),
    }
    harmful_texts = (
        [r.text for r in load_prompt_jsonl(harmful, default_label="harmful")] if harmful else None
    )
    if test:
        say(f"evaluating on {len(test)} held-out texts")
        metrics["test"] = evaluate_on_records(det, test, harmful=harmful_texts)
        det.meta_["test_auroc"] = metrics["test"]["overall"]["auroc"]
        det.meta_["test_tpr_at_1pct_fpr"] = metrics["test"]["overall"]["tpr_at_1pct_fpr"]
    if cache is not None:
        cache.save()
    out = Path(out_dir)
    det.save(out)
    write_json_atomic(out / "metrics.json", metrics)
    write_text_atomic(
        out / "report.html",
        render_eval_html(metrics.get("test"), title="Prompt-injection detector"),
    )
    return det, metrics


def render_eval_html(ev: dict[str, Any] | None, *, title: str) -> str:
    page = HtmlPage(title, subtitle="MiniLM embeddings + hashed n-grams, logistic-regression head")
    if not ev:
        page.warning("no held-out rows (split=test) to evaluate on")
        return page.render()
    o = ev["overall"]
    page.heading("Held-out split")
    keys = ["n", "n_attack", "auroc", "f1", "precision", "recall", "fpr", "tpr_at_1pct_fpr"]
    page.table([[k, o[k]] for k in keys], ["metric", "value"])
    if o["auroc"] < 0.99 or o["tpr_at_1pct_fpr"] < 0.9:
        page.warning("below the goals (AUROC 0.99, 90% TPR at 1% FPR)")
    page.heading("Length slices")
    page.table(
        [
            [k, v["n"], v["n_attack"], v["auroc"], v["tpr_at_1pct_fpr"], v["fpr"]]
            for k, v in ev["length_slices"].items()
        ],
        ["chars", "n", "attacks", "AUROC", "TPR@1%FPR", "FPR@threshold"],
    )
    if "hard_negatives" in ev:
        h = ev["hard_negatives"]
        page.heading("Hard negatives")
        page.paragraph(f"{h['n']} benign texts with trigger words; FPR at threshold {h['fpr']:.4f}")
    if "harmful_requests" in ev:
        h = ev["harmful_requests"]
        page.heading("Plain harmful requests (not attacks)")
        page.paragraph(f"{h['n']} requests; flagged {100 * h['flagged_rate']:.1f}%")
    if "by_subtype" in ev:
        page.heading("By subtype")
        page.table(
            [
                [k, v["n"], "attack" if v["label"] else "benign", v["flagged_rate"]]
                for k, v in ev["by_subtype"].items()
            ],
            ["subtype", "n", "label", "flagged"],
        )
    return page.render()


def scores_summary(s: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(s)), "max": float(np.max(s)), "min": float(np.min(s))}


# -- leave-one-source-out evaluation ----------------------------------------------------

FitFn = Callable[[Sequence[PromptRecord]], PromptInjectionDetector]


def loso_splits(
    records: Sequence[PromptRecord], *, min_rows: int = 20
) -> list[dict[str, Any]]:
    """Leave-one-source-out folds over the repositories rows come from
    (:attr:`PromptRecord.groups`; a derived row names its host's and its attack's).

    For each repository ``g`` with at least ``min_rows`` rows: ``test`` holds every real row
    that names ``g`` (both splits; rows with ``extra["generated"]`` are never tested);
    ``train`` every ``split=train`` (or unsplit) row, generated or not, that does not name
    ``g``; ``reference`` the other class when ``g`` has only one (``split=test`` rows of
    other repositories, never in ``train``), so that an AUROC can be taken. Indices into
    ``records``."""
    groups: dict[str, list[int]] = {}
    named: dict[str, set[int]] = {}
    for i, r in enumerate(records):
        for g in r.groups:
            named.setdefault(g, set()).add(i)
            if not r.extra.get("generated"):  # generated rows are trained on, never tested
                groups.setdefault(g, []).append(i)
    folds = []
    for g in sorted(groups):
        test = groups[g]
        if len(test) < min_rows:
            continue
        ts = named[g]
        train = [i for i, r in enumerate(records)
                 if i not in ts and r.split in (None, "train")]
        classes = {records[i].y for i in test}
        reference = []
        if len(classes) == 1:
            (c,) = classes
            reference = [i for i, r in enumerate(records)
                         if i not in ts and r.split == "test" and r.y != c]
        folds.append({"source": g, "train": train, "test": test, "reference": reference})
    return folds


def fit_calibrated(
    records: Sequence[PromptRecord],
    *,
    embedder: Embedder | None = None,
    weight: Callable[[PromptRecord], float] | None = None,
    fpr: float = 0.01,
    **params: Any,
) -> PromptInjectionDetector:
    """Fit a detector on ``records`` (weights from ``weight(record)``) and calibrate its
    threshold at ``fpr`` on the held-back fifth of their benign rows
    (:func:`split_calibration`)."""
    fit_rows, cal_rows = split_calibration(records)
    if not cal_rows:
        raise DataError("no benign training rows to calibrate the threshold on")
    det = PromptInjectionDetector(embedder=embedder, **params)
    w = [weight(r) for r in fit_rows] if weight else None
    det.fit([r.text for r in fit_rows], [r.y for r in fit_rows], sample_weight=w)
    det.calibrate([r.text for r in cal_rows], fpr=fpr)
    return det


def evaluate_loso(
    records: Sequence[PromptRecord],
    fit: FitFn,
    *,
    min_rows: int = 20,
    sources: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Leave-one-source-out evaluation (:func:`loso_splits`): for each held-out repository,
    ``fit(train_rows)`` (a detector with its threshold set, e.g. by
    :func:`fit_calibrated`) and score the held-out rows. Per source: AUROC (its attacks
    against its benign rows, or against ``reference`` rows of the other class), TPR and
    benign flagged rate at the fold's threshold. ``macro``: means over sources (AUROC over
    all, TPR over sources with attacks, flagged rate over sources with benign rows) and the
    worst source's flagged rate. ``sources`` limits the folds (by name)."""
    from sklearn.metrics import roc_auc_score

    say = log or (lambda _m: None)
    per: dict[str, Any] = {}
    for fold in loso_splits(records, min_rows=min_rows):
        g = fold["source"]
        if sources is not None and g not in sources:
            continue
        det = fit([records[i] for i in fold["train"]])
        idx = fold["test"] + fold["reference"]
        s = det.score([records[i].text for i in idx])
        y = np.array([records[i].y for i in idx])
        own = np.zeros(len(idx), dtype=bool)
        own[: len(fold["test"])] = True
        row: dict[str, Any] = {
            "n_attack": int((y[own] == 1).sum()),
            "n_benign": int((y[own] == 0).sum()),
            "n_reference": len(fold["reference"]),
            "n_train": len(fold["train"]),
            "threshold": det.threshold_,
            "auroc": float(roc_auc_score(y, s)) if len(set(y.tolist())) == 2 else None,
            "tpr": float(np.mean(s[own & (y == 1)] >= det.threshold_))
            if _any(own & (y == 1)) else None,
            "benign_flagged": float(np.mean(s[own & (y == 0)] >= det.threshold_))
            if _any(own & (y == 0)) else None,
        }
        per[g] = row
        say(f"{g}: AUROC {row['auroc']}, TPR {row['tpr']}, flagged {row['benign_flagged']}")
    return {"per_source": per, "macro": loso_macro(per)}


def _any(mask: np.ndarray) -> bool:
    return bool(np.any(mask))


def loso_macro(per: dict[str, Any]) -> dict[str, Any]:
    """Means over sources of a leave-one-source-out table (``None`` values skipped)."""

    def vals(k: str) -> list[float]:
        return [float(v[k]) for v in per.values() if v.get(k) is not None]

    def mean(k: str) -> float | None:
        v = vals(k)
        return float(np.mean(v)) if v else None

    flagged = vals("benign_flagged")
    return {
        "n_sources": len(per),
        "auroc": mean("auroc"),
        "tpr": mean("tpr"),
        "benign_flagged": mean("benign_flagged"),
        "worst_benign_flagged": max(flagged) if flagged else None,
        "min_auroc": min(vals("auroc")) if vals("auroc") else None,
    }


def language_table(
    det: PromptInjectionDetector,
    benign: Sequence[PromptRecord],
    *,
    scores: np.ndarray | None = None,
) -> dict[str, Any]:
    """Benign flagged rate at ``det.threshold_`` per language (a row's ``lang``, else
    ``en`` for Latin-script rows without one) and per detected script
    (:func:`~bastion.llm.datasets.script_of`), with 95% Wilson intervals."""
    from bastion.llm.datasets import script_of
    from bastion.llm.metrics import wilson_interval

    rows = [r for r in benign if r.y == 0]
    s = det.score([r.text for r in rows]) if scores is None else np.asarray(scores)
    flagged = s >= det.threshold_
    scripts = [script_of(r.text) for r in rows]
    out: dict[str, Any] = {"threshold": det.threshold_, "by_lang": {}, "by_script": {}}
    for key, labels in (
        ("by_lang", [r.lang or ("en" if sc == "latin" else sc) for r, sc in
                     zip(rows, scripts, strict=True)]),
        ("by_script", scripts),
    ):
        for lab in sorted(set(labels)):
            m = np.array([x == lab for x in labels])
            k, n = int(flagged[m].sum()), int(m.sum())
            lo, hi = wilson_interval(k, n)
            out[key][lab] = {"n": n, "flagged": k, "rate": k / n, "ci95": [lo, hi]}
    return out


# -- the shipped detector's training recipe ---------------------------------------------

#: sample weights of the recipe: injections of the base corpus 4x (so that planted
#: instructions are not drowned by jailbreaks), plain harmful requests 0.3x; benign
#: multilingual rows so that every language weighs the same in total
INJECTION_WEIGHT = 4.0
HARMFUL_WEIGHT = 0.3


def _rec(text: str, y: int, label: str, split: str | None, source: str, **extra: Any
         ) -> PromptRecord:
    return PromptRecord(text=text, y=y, label=label, split=split,
                        subtype=str(extra.pop("subtype", "")),
                        extra={"source": source, **extra})


def _is_extraction(r: PromptRecord) -> bool:
    return "sysprompt_extraction" in r.subtype or "password_extraction" in r.subtype


def extraction_attacks(shared: str | os.PathLike[str]) -> list[PromptRecord]:
    """System-prompt and secret extraction attacks of the shared corpus, with a split:
    garak/PyRIT extraction rows of ``prompts.jsonl`` keep theirs; the canary cases whose
    system prompt guards a secret (a key, a password) take the split of the same text in
    ``prompts.jsonl``, or, when it is not there, ``test`` for a fifth by hash."""
    base = Path(shared) / "datasets" / "prompt-injection"
    rows = load_prompt_jsonl(base / "prompts.jsonl")
    split_of = {r.text: r.split for r in rows}
    out = [r for r in rows if _is_extraction(r)]
    seen = {r.text for r in out}
    import json as _json

    with open(base / "canary_cases.jsonl", encoding="utf-8") as fh:
        for line in fh:
            c = _json.loads(line)
            sysp = str(c.get("test_case_prompt", "")).lower()
            t = str(c.get("user_input", ""))
            if not t or t in seen or not any(w in sysp for w in ("secret", "password")):
                continue
            seen.add(t)
            split = split_of.get(t) or ("test" if _bucket(t) == 0 else "train")
            out.append(_rec(t, 1, "injection", split, str(c.get("source", "")),
                            subtype="canary:extraction"))
    return out


def detector_training_rows(
    shared: str | os.PathLike[str],
    *,
    seed: int = 0,
    agents: bool = True,
    multilingual: bool = True,
    counterparts: int = 2000,
    extraction: bool = True,
    dropout: bool = False,
) -> list[PromptRecord]:
    """Every row the detector recipe trains or evaluates on, each with ``extra["weight"]``
    (its sample weight) and, for generated rows, ``extra["generated"]``; generated rows
    are built from ``split=train`` rows only and keep their original's ``source`` (so a
    leave-one-source-out fold drops them with it). Rows: the shared corpus
    (``prompts.jsonl``), plain harmful requests (benign class), the agent data, benign
    multilingual text, ``counterparts`` benign trigger-word texts
    (:func:`~bastion.llm.datasets.trigger_counterparts` over real benign train rows,
    languages drawn evenly), quiet extraction positives
    (:func:`~bastion.llm.datasets.quiet_extraction_positives` of the train-split
    extraction attacks, which are added too) and, with ``dropout``, a copy of every
    base-corpus injection with its trigger words dropped (half of them)."""
    from collections import Counter

    from bastion.llm.datasets import (
        drop_trigger_words,
        quiet_extraction_positives,
        trigger_counterparts,
    )

    root = Path(shared) / "datasets"
    base = load_prompt_jsonl(root / "prompt-injection" / "prompts.jsonl")
    for r in base:
        r.extra["weight"] = INJECTION_WEIGHT if r.label == "injection" else 1.0
    rows = list(base)
    for r in load_prompt_jsonl(root / "prompt-injection" / "harmful_requests.jsonl",
                               default_label="harmful"):
        r.extra["weight"] = HARMFUL_WEIGHT
        rows.append(r)
    if agents:
        for r in load_prompt_jsonl(root / "prompt-injection-agents" / "prompts.jsonl"):
            r.extra["weight"] = 1.0
            rows.append(r)
    ml: list[PromptRecord] = []
    if multilingual:
        ml = load_prompt_jsonl(root / "benign-multilingual" / "prompts.jsonl")
        n_lang = Counter(r.lang for r in ml if r.split == "train")
        per_lang = float(np.median(list(n_lang.values())))
        for r in ml:
            r.extra["weight"] = per_lang / n_lang[r.lang] if r.lang in n_lang else 1.0
        rows += ml
    gen: list[PromptRecord] = []
    if counterparts:
        hosts_en = [r for r in base if r.y == 0 and r.split == "train"]
        hosts_ml = [r for r in ml if r.split == "train"]
        by_lang: dict[str, list[PromptRecord]] = {"en": hosts_en}
        for r in hosts_ml:
            by_lang.setdefault(r.lang or "en", []).append(r)
        langs = sorted(by_lang)
        rng = np.random.default_rng(seed)
        for k, lang in enumerate(langs):
            pool = by_lang[lang]
            n = counterparts // len(langs) + (1 if k < counterparts % len(langs) else 0)
            made = trigger_counterparts([(r.text, lang) for r in pool], n,
                                        seed=int(rng.integers(2**31)), part="train")
            for text, _, h in made:
                gen.append(_rec(text, 0, "benign", "train", pool[h].source, generated="trigger",
                                weight=1.0, lang=lang, subtype="generated:trigger"))
    if extraction:
        ex = [r for r in extraction_attacks(shared) if r.split == "train"]
        known = {r.text for r in rows}
        for r in ex:
            if r.text not in known:
                r.extra["weight"] = INJECTION_WEIGHT
                rows.append(r)
        for r in ex:
            for q in quiet_extraction_positives([r.text], seed=seed, part="train"):
                gen.append(_rec(q, 1, "injection", "train", r.source, generated="extraction",
                                weight=INJECTION_WEIGHT, subtype="generated:extraction"))
    if dropout:
        for i, r in enumerate(base):
            if r.label == "injection" and r.split == "train":
                t = drop_trigger_words(r.text, p=0.5, seed=seed + i)
                if t and t != r.text:
                    gen.append(_rec(t, 1, "injection", "train", r.source, generated="dropout",
                                    weight=INJECTION_WEIGHT, subtype="generated:dropout"))
    known = {r.text for r in rows}
    rows += [g for g in dict((g.text, g) for g in gen).values() if g.text not in known]
    return rows


def recipe_weight(r: PromptRecord) -> float:
    return float(r.extra.get("weight", 1.0))


def recipe_eval_sets(
    shared: str | os.PathLike[str], *, seed: int = 0, n_trigger: int = 600
) -> dict[str, list[PromptRecord]]:
    """Held-out evaluation sets beside the leave-one-source-out folds, all from
    ``split=test`` rows and from template halves no training row used:

    - ``trigger_benign``: real benign rows with trigger words (``hard_negative`` rows of
      the corpus and of the agent data) and ``n_trigger`` benign trigger-word
      counterparts (:func:`~bastion.llm.datasets.trigger_counterparts`, ``part="eval"``)
      of benign test rows, languages drawn evenly;
    - ``extraction``: the test-split extraction attacks (:func:`extraction_attacks`) and
      their quiet variants (:func:`~bastion.llm.datasets.quiet_extraction_positives`,
      ``part="eval"``);
    - ``agent_injections``: the agent data's test-split injections (position and wording
      in ``subtype``); ``agent_benign``: its benign test rows;
    - ``multilingual_benign``: benign multilingual test rows; ``english_benign``: the
      corpus's benign test rows."""
    from bastion.llm.datasets import quiet_extraction_positives, trigger_counterparts

    root = Path(shared) / "datasets"
    base = load_prompt_jsonl(root / "prompt-injection" / "prompts.jsonl", split="test")
    agents = load_prompt_jsonl(root / "prompt-injection-agents" / "prompts.jsonl", split="test")
    ml = load_prompt_jsonl(root / "benign-multilingual" / "prompts.jsonl", split="test")
    trig = [r for r in base + agents if r.y == 0 and r.hard_negative]
    by_lang: dict[str, list[PromptRecord]] = {"en": [r for r in base if r.y == 0]}
    for r in ml:
        by_lang.setdefault(r.lang or "en", []).append(r)
    rng = np.random.default_rng(seed + 1)
    langs = sorted(by_lang)
    for k, lang in enumerate(langs):
        pool = by_lang[lang]
        n = n_trigger // len(langs) + (1 if k < n_trigger % len(langs) else 0)
        for text, _, h in trigger_counterparts([(r.text, lang) for r in pool], n,
                                               seed=int(rng.integers(2**31)), part="eval"):
            trig.append(_rec(text, 0, "benign", "test", pool[h].source, lang=lang,
                             generated="trigger", subtype=f"generated:trigger:{lang}"))
    ex = [r for r in extraction_attacks(shared) if r.split == "test"]
    quiet = [
        _rec(q, 1, "injection", "test", r.source, generated="extraction",
             subtype="generated:extraction")
        for r in ex for q in quiet_extraction_positives([r.text], seed=seed, part="eval")
    ]
    return {
        "trigger_benign": trig,
        "extraction": ex + quiet,
        "agent_injections": [r for r in agents if r.y == 1],
        "agent_benign": [r for r in agents if r.y == 0],
        "multilingual_benign": ml,
        "english_benign": [r for r in base if r.y == 0],
    }


def evaluate_all(
    det: PromptInjectionDetector,
    data: str | os.PathLike[str],
    *,
    split: str | None = "test",
    harmful: str | os.PathLike[str] | None = None,
    languages: str | os.PathLike[str] | None = None,
    loso: bool = False,
    min_rows: int = 20,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """What ``bastion llm evaluate-detector`` reports: the random split (the ``split``
    rows of ``data``, :func:`evaluate_on_records`); benign flagged rates per language and
    script (:func:`language_table`) over the benign rows of ``data`` and of ``languages``
    (a JSONL of benign rows with a ``lang`` field, e.g. ``benign-multilingual``); and, with
    ``loso``, leave-one-source-out (:func:`evaluate_loso`): a detector with ``det``'s
    settings retrained and recalibrated (its calibration FPR) per held-out repository of
    ``data``'s ``source`` field, on ``data``'s rows alone, unweighted."""
    rows = load_prompt_jsonl(data)
    test = [r for r in rows if split is None or r.split in (None, split)]
    htexts = (
        [r.text for r in load_prompt_jsonl(harmful, default_label="harmful")] if harmful else None
    )
    ev = evaluate_on_records(det, test, harmful=htexts)
    lang_rows = [r for r in test if r.y == 0]
    if languages:
        lang_rows += [r for r in load_prompt_jsonl(languages, split=split) if r.y == 0]
    ev["languages"] = language_table(det, lang_rows)
    if loso:
        if not any(r.source for r in rows):
            raise DataError(f"{data} has no 'source' field to hold sources out by",
                            hint="add source (owner/repo:path) to each row, or drop --loso")
        fpr = float(det.calibration_.get("target_fpr", 0.01))
        params = {
            "C": det.C, "chunk_chars": det.chunk_chars, "overlap": det.overlap,
            "max_chunks": det.max_chunks, "use_normalizer": det.use_normalizer,
            "seed": det.seed, "ngram_features": det.ngram_features,
            "emb_scale": det.emb_scale, "mil_rounds": det.mil_rounds,
            "stats_scale": det.stats_scale,
        }

        def fit(train: Sequence[PromptRecord]) -> PromptInjectionDetector:
            return fit_calibrated(train, embedder=det.embedder, fpr=fpr, **params)

        ev["loso"] = evaluate_loso(rows, fit, min_rows=min_rows, log=log)
    return ev
