"""Issue 17: fast leave-one-source-out sweep over detector head settings, on DEV folds.

    .venv/bin/python benchmarks/llm_detector_sweep.py --cache FILE [--folds dev|report|all|A,B]
        [--variant NAME:key=value,...]... [--doc-windows 0,100,200,300] [--extraction-cv]
        [--fold-dir DIR] [--out FILE]

``llm_detector.py --loso`` retrains a whole :class:`PromptInjectionDetector` per fold
(normalising and chunking 17k texts each time, ~5 minutes a fold on 2 cores). This
script builds the recipe-v2 chunk features once (embedding from the cache, text
statistics v2, word 1-2-gram term frequencies) and per fold fits the same head as
``PromptInjectionDetector.fit`` (class-balanced logistic regression, C, emb_scale 2,
stats_scale 3, one multiple-instance round; IDF from the fold's fit rows) and calibrates
it like ``fit_calibrated`` (1% FPR on the held-back benign fifth). With the default
variant it gives the same fold numbers as ``llm_detector.py --recipe v2 --blocks word``
(checked on the JailbreakBench, AgentDojo, tldr and LASER folds: identical AUROC and TPR).

Variant keys: ``C``, ``emb`` (embedding scale), ``ng`` (n-gram scale), ``srcbal`` (each
training row's weight times ``(median source size / its source's size) ** srcbal``
within its class), ``exw`` (extra weight on extraction attacks), ``proto`` (scale of
two intent-prototype features: max cosine of a chunk's embedding to 32 k-means centroids
of the fold's training attack chunks and to 32 of its benign chunks).

``--doc-windows``: for each fold, the held-out texts longer than one chunk are also
scored with sentence windows of each size (max over chunks and windows, as
``PromptInjectionDetector(doc_windows=...)`` scores), at the fold's threshold; this is
how the shipped window size is chosen on dev folds only.

``--extraction-cv``: instead of LOSO, two folds over the train-split extraction attacks
(each half held out with the quiet variants made from it): recall at the fold threshold
on phrasings never trained on, a dev measure for extraction recall.

Model choices are to be made on the dev folds (``llm_detector.DEV_SOURCES``); the
report folds are for the final number only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_detector import DEV_SOURCES, RESULTS, SHARED  # noqa: E402

DEFAULTS = {"C": 16.0, "emb": 2.0, "ng": 1.0, "srcbal": 0.0, "exw": 1.0, "proto": 0.0}


def parse_variant(spec: str) -> tuple[str, dict[str, float]]:
    name, _, rest = spec.partition(":")
    out = dict(DEFAULTS)
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        if k not in DEFAULTS:
            raise SystemExit(f"unknown variant key {k!r} in {spec!r}; "
                             f"choose from {', '.join(DEFAULTS)}")
        try:
            out[k] = float(v)
        except ValueError:
            raise SystemExit(f"variant key {k!r} needs a number, got {v!r}") from None
    return name or "base", out


def build_features(cache_path: str | None) -> dict[str, Any]:
    from bastion.llm.detector import PromptInjectionDetector, _Ngrams
    from bastion.llm.embed import Embedder, EmbeddingCache
    from bastion.llm.textstats import text_stats
    from bastion.llm.training import detector_training_rows

    rows = detector_training_rows(SHARED, seed=0)
    det = PromptInjectionDetector(ngram_blocks=("word",), stats_version=2)
    chunks, owner = det._chunked([r.text for r in rows])
    cache = EmbeddingCache(cache_path) if cache_path else None
    emb = Embedder(cache=cache)
    feats = {"rows": rows, "chunks": chunks, "owner": owner,
             "E": emb.encode(chunks).astype(np.float32),
             "S": text_stats(chunks, version=2),
             "TF": _Ngrams(2**17, ("word",))._tf("word", chunks), "embedder": emb}
    if cache is not None:
        cache.save()
    return feats


def run_fold(F: dict[str, Any], f: dict[str, Any], v: dict[str, float],
             windows: list[int]) -> dict[str, Any]:
    """One leave-one-source-out fold of one variant (see the module doc)."""
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import normalize as l2

    from bastion.llm.detector import PromptInjectionDetector, _Ngrams
    from bastion.llm.textstats import text_stats
    from bastion.llm.training import _bucket

    rows, owner, E, S, TF = F["rows"], F["owner"], F["E"], F["S"], F["TF"]
    n = len(rows)
    y = np.array([r.y for r in rows])
    yc = y[owner]
    w0 = np.array([float(r.extra.get("weight", 1.0)) for r in rows])
    src = [min(r.groups) if r.groups else r.source for r in rows]
    counts = np.bincount(owner, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    t0 = time.time()
    tr = np.array(f["train"])
    is_cal = np.array([y[i] == 0 and _bucket(rows[i].text) == 0 for i in tr])
    cal, fit = tr[is_cal], tr[~is_cal]
    wr = w0.copy()
    if v["exw"] != 1.0:
        for i in fit:
            if "extraction" in rows[i].subtype:
                wr[i] *= v["exw"]
    if v["srcbal"]:
        cnt = Counter((src[i], y[i]) for i in fit)
        med = {c: float(np.median([k for (_, cc), k in cnt.items() if cc == c]))
               for c in (0, 1)}
        for i in fit:
            wr[i] *= (med[y[i]] / cnt[(src[i], y[i])]) ** v["srcbal"]
    rowmask = np.zeros(n, bool)
    rowmask[fit] = True
    cm = rowmask[owner]
    tfit = TF[cm]
    df = np.bincount(tfit.indices, minlength=TF.shape[1]).astype(np.float64)
    idf = (np.log((1.0 + tfit.shape[0]) / (1.0 + df)) + 1.0).astype(np.float32)

    protos = None
    if v["proto"]:
        from sklearn.cluster import KMeans

        def centres(x: np.ndarray) -> np.ndarray:
            c = KMeans(32, n_init=1, random_state=0).fit(x).cluster_centers_
            return c / np.linalg.norm(c, axis=1, keepdims=True)

        protos = (centres(E[cm & (yc == 1)]), centres(E[cm & (yc == 0)]))

    def features(e: np.ndarray, s: np.ndarray, tf: Any) -> Any:
        dense = [e * v["emb"], s * 3.0]
        if protos is not None:
            en = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-9)
            dense.append(np.stack([(en @ protos[0].T).max(1),
                                   (en @ protos[1].T).max(1)], 1) * v["proto"])
        ng = l2(tf.multiply(idf[None, :]).tocsr(), norm="l2") * v["ng"]
        return sparse.hstack([sparse.csr_matrix(np.hstack(dense)), ng], format="csr")

    X = features(E, S, TF)
    wc = wr[owner]
    clf = LogisticRegression(C=v["C"], max_iter=3000, random_state=0, warm_start=True)

    def train(mask: np.ndarray) -> None:
        w = wc[mask].copy()
        ym = yc[mask]
        for c in (0, 1):
            w[ym == c] *= len(ym) / (2.0 * w[ym == c].sum())
        clf.fit(X[mask], ym, sample_weight=w)

    train(cm)
    # one multiple-instance round, as PromptInjectionDetector(mil_rounds=1)
    z = clf.decision_function(X)
    keep = cm.copy()
    for i in np.flatnonzero(rowmask & (y == 1) & (counts > 1)):
        idx = np.arange(starts[i], starts[i] + counts[i])
        k = z[idx] >= 0
        k[np.argmax(z[idx])] = True
        keep[idx[~k]] = False
    train(keep)
    z = clf.decision_function(X)
    rs = np.full(n, -np.inf)
    np.maximum.at(rs, owner, z)
    srt = np.sort(rs[cal])[::-1]
    thr = float(np.nextafter(srt[int(np.floor(0.01 * len(srt)))], np.inf))
    idx = np.array(f["test"] + f["reference"])
    own = np.zeros(len(idx), bool)
    own[: len(f["test"])] = True

    def metrics(ss: np.ndarray) -> dict[str, Any]:
        yy = y[idx]
        a, b = own & (yy == 1), own & (yy == 0)
        return {"auroc": float(roc_auc_score(yy, ss)) if len(set(yy.tolist())) == 2
                else None,
                "tpr": float(np.mean(ss[a] >= thr)) if a.any() else None,
                "benign_flagged": float(np.mean(ss[b] >= thr)) if b.any() else None}

    row: dict[str, Any] = {"n_attack": int((y[idx][own] == 1).sum()),
                           "n_benign": int((y[idx][own] == 0).sum()),
                           "n_reference": len(f["reference"]), "n_train": len(f["train"]),
                           "threshold": float(1.0 / (1.0 + np.exp(-thr))),
                           **metrics(rs[idx])}
    if windows:
        ngw = _Ngrams(2**17, ("word",))
        ngw.idf = {"word": idf}
        longi = [j for j, i in enumerate(idx) if own[j] and counts[i] > 1]
        row["doc_windows"] = {}
        for wsz in windows:
            ss = rs[idx].copy()
            if longi and wsz:
                d = PromptInjectionDetector(ngram_blocks=("word",), doc_windows=wsz)
                ch, ow = d._chunked([rows[idx[j]].text for j in longi], windows=True)
                e = F["embedder"].encode(ch).astype(np.float32)
                zw = clf.decision_function(
                    features(e, text_stats(ch, version=2), ngw._tf("word", ch)))
                rw = np.full(len(longi), -np.inf)
                np.maximum.at(rw, ow, zw)
                ss[longi] = rw
            yl = y[idx[longi]] if longi else np.zeros(0)
            sl = ss[longi] if longi else np.zeros(0)
            row["doc_windows"][str(wsz)] = {
                **metrics(ss), "n_long_attack": int((yl == 1).sum()),
                "n_long_benign": int((yl == 0).sum()),
                "long_tpr": float(np.mean(sl[yl == 1] >= thr)) if (yl == 1).any() else None,
                "long_flagged": float(np.mean(sl[yl == 0] >= thr))
                if (yl == 0).any() else None}
        cache = F["embedder"].cache
        if cache is not None:
            cache.save()
    row["seconds"] = round(time.time() - t0, 1)
    return row


def run_variant(F: dict[str, Any], folds: list[dict[str, Any]], v: dict[str, float],
                windows: list[int], fold_dir: Path | None = None) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for f in folds:
        row = run_fold(F, f, v, windows)
        res[f["source"]] = row
        print(f"{f['source']}: {json.dumps(row)}", flush=True)
        if fold_dir is not None:
            fold_dir.mkdir(parents=True, exist_ok=True)
            keep = {k: x for k, x in row.items() if k != "doc_windows"}
            (fold_dir / (f["source"].replace("/", "__") + ".json")).write_text(
                json.dumps({**keep, "by": "llm_detector_sweep.py", "settings": v}, indent=1))
    return res


def extraction_folds(rows: list[Any]) -> list[dict[str, Any]]:
    """Two dev folds over the TRAIN-split extraction attacks (halves by hash): each holds
    out one half's originals with the quiet variants generated from them (so the
    phrasings tested were never trained on) and tests recall on them at the fold's
    threshold; ``reference``: the corpus's benign test rows (for an AUROC)."""
    from bastion.llm.datasets import quiet_extraction_positives
    from bastion.llm.training import _bucket

    orig = [i for i, r in enumerate(rows) if r.split == "train" and r.y == 1
            and "extraction" in r.subtype and not r.extra.get("generated")]
    by_text = {r.text: i for i, r in enumerate(rows) if r.extra.get("generated") == "extraction"}
    ref = [i for i, r in enumerate(rows) if r.split == "test" and r.y == 0]
    out = []
    for half in (0, 1):
        held = [i for i in orig if _bucket(rows[i].text) % 2 == half]
        var = {by_text[q] for i in held
               for q in quiet_extraction_positives([rows[i].text], seed=0, part="train")
               if q in by_text}
        test = held + sorted(var - set(held))
        gone = set(test)
        train = [i for i, r in enumerate(rows) if r.split in (None, "train") and i not in gone]
        out.append({"source": f"extraction-half-{half}", "train": train, "test": test,
                    "reference": ref})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None, help="embedding cache .npz")
    ap.add_argument("--folds", default="dev", help="dev, report, all or comma-separated")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:key=value,... (keys: " + ", ".join(DEFAULTS) + ")")
    ap.add_argument("--doc-windows", default="", help="comma-separated window sizes")
    ap.add_argument("--out", default=str(RESULTS / "llm_detector_sweep.json"))
    ap.add_argument("--extraction-cv", action="store_true",
                    help="instead of LOSO: two folds over the train-split extraction attacks")
    ap.add_argument("--fold-dir", default=None,
                    help="also write each fold of the (single) variant as llm_detector.py "
                         "--folds caches it (DIR/<variant name>/<source>.json)")
    args = ap.parse_args(argv)
    if args.fold_dir and len(args.variant) > 1:
        raise SystemExit("--fold-dir takes one --variant")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from bastion._util import write_json_atomic
    from bastion.llm.training import loso_macro, loso_splits

    torch.set_num_threads(1)
    try:
        windows = [int(x) for x in args.doc_windows.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--doc-windows needs comma-separated integers, "
                         f"got {args.doc_windows!r}") from None
    variants = [parse_variant(s) for s in args.variant or ["base:"]]
    F = build_features(args.cache)
    folds = loso_splits(F["rows"])
    if args.extraction_cv:
        folds = extraction_folds(F["rows"])
    elif args.folds == "dev":
        folds = [f for f in folds if f["source"] in DEV_SOURCES]
    elif args.folds == "report":
        folds = [f for f in folds if f["source"] not in DEV_SOURCES]
    elif args.folds != "all":
        want = set(args.folds.split(","))
        folds = [f for f in folds if f["source"] in want]
    if not folds:
        raise SystemExit(f"no fold matches --folds {args.folds!r}")
    out: dict[str, Any] = {"benchmark": "llm_detector_sweep", "folds": args.folds,
                           "dev_sources": list(DEV_SOURCES), "variants": {}}
    for name, v in variants:
        per = run_variant(F, folds, v, windows,
                          Path(args.fold_dir) if args.fold_dir else None)
        entry: dict[str, Any] = {"settings": v, "per_source": per, "macro": loso_macro(per)}
        for wsz in windows:
            entry[f"macro_doc_windows_{wsz}"] = loso_macro(
                {g: r["doc_windows"][str(wsz)] for g, r in per.items()})
        out["variants"][name] = entry
        print(f"{name}: {json.dumps(entry['macro'])}", flush=True)
        write_json_atomic(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
