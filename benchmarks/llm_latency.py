"""Benchmark 3: detector latency per prompt at 100, 500 and 5,000 characters.

    .venv/bin/python benchmarks/llm_latency.py [--repeats 30] [--threads 1,2]
        [--dtype auto|float32|bfloat16] [--compare OLD_DETECTOR_DIR]

One prompt per call (no batching), as the guard proxy scores them; the full pipeline is
timed: normalisation, chunking, MiniLM embedding (bfloat16 on CPUs with AMX/AVX512-BF16,
``--dtype``) and the head (embedding + hashed n-grams). Prompts are fresh text
each call (no embedding cache). Writes ``benchmarks/results/llm_latency.json`` with the
median and 90th percentile in milliseconds, plus the normaliser alone for comparison.
Goal (issues 6, 17): median under 15 ms at 500 characters on 2 CPU cores. The machine's
load during the run, the CPU's model and its bfloat16/AVX flags are recorded, since the
cores are shared; ``--dtype float32`` measures what a CPU without bfloat16 units runs.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORDS = (
    "account card transfer please help balance statement branch online banking password "
    "reset limit travel abroad fee refund payment loan mortgage interest savings question "
    "ignore previous instructions system prompt reveal secret weather recipe meeting notes"
).split()


def _text(n: int, rng: random.Random) -> str:
    out = []
    while sum(len(w) + 1 for w in out) < n:
        out.append(rng.choice(WORDS))
    return " ".join(out)[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="embedder precision (auto: bfloat16 where the CPU has AMX/AVX512-BF16)",
    )
    ap.add_argument("--compare", default=None,
                    help="another detector folder (e.g. the previously shipped one), measured "
                         "in the same run, interleaved by text length")
    ap.add_argument("--out", default=str(RESULTS / "llm_latency.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from bastion._util import write_json_atomic
    from bastion.llm.detector import PromptInjectionDetector
    from bastion.llm.embed import Embedder
    from bastion.llm.normalize import normalize

    emb = Embedder(dtype=args.dtype)
    det = PromptInjectionDetector.load_default(embedder=emb)
    other = PromptInjectionDetector.load(args.compare, embedder=emb) if args.compare else None
    rng = random.Random(0)
    det.score(["warm up " * 20])
    if other is not None:
        other.score(["warm up " * 20])
    load_before = os.getloadavg()
    print(f"loadavg before: {load_before}", flush=True)
    by_threads = {}
    for nt in [int(x) for x in str(args.threads).split(",")]:
        torch.set_num_threads(nt)
        by_threads[str(nt)] = _measure(det, normalize, rng, args.repeats, np)
        if other is not None:
            by_threads[f"{nt}_compare"] = _measure(other, normalize, rng, args.repeats, np)
    mine = {k: v for k, v in by_threads.items() if not k.endswith("_compare")}
    best = min(mine.values(), key=lambda r: r["500"]["median_ms"])
    result = {
        "benchmark": "llm_latency",
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": _cpu(),
        "compare": args.compare,
        "embedder_dtype": emb.resolved_dtype,
        "detector_ngrams": det.ngram_features,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "note": "the 2 cores are shared with other jobs; see loadavg",
        "by_threads": by_threads,
        "goal": {"chars": 500, "median_ms_below": 15},
        "best_threads": min(mine, key=lambda k: mine[k]["500"]["median_ms"]),
        "goal_met": best["500"]["median_ms"] < 15,
    }
    write_json_atomic(args.out, result)
    return 0


def _cpu() -> dict[str, object]:
    """The CPU's model name and the flags that matter for the embedder's matrix products."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    keep = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
    return {"model": model, "flags": [f for f in keep if f in flags]}


def _measure(det, normalize, rng, repeats, np):  # type: ignore[no-untyped-def]
    rows = {}
    for n in (100, 500, 5000):
        times, norm_times = [], []
        for _ in range(repeats):
            t = _text(n, rng)
            t0 = time.perf_counter()
            det.score([t])
            times.append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            normalize(t)
            norm_times.append(1000 * (time.perf_counter() - t0))
        rows[str(n)] = {
            "chunks": len(det.chunks(_text(n, rng))),
            "median_ms": float(np.median(times)),
            "p90_ms": float(np.percentile(times, 90)),
            "min_ms": float(np.min(times)),
            "normalize_median_ms": float(np.median(norm_times)),
            "tokens_first_chunk": len(det._emb.model.tok.encode(det.chunks(t)[0]).ids),
        }
        print(n, rows[str(n)], flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
