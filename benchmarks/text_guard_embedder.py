"""Which embedding the service's text outlier detector should use: the shipped MiniLM
(all 6 layers, or the first 3) or the served model's own pooled features?

    BASTION_SHARED=/work/shared .venv/bin/python benchmarks/text_guard_embedder.py [--intents 10]

Trains the zoo's text-intent router on the first ``--intents`` CLINC150 intents (no oos),
takes a seeded sample of 1,000 training texts as the service does (60% fit the k-NN
detector, 40% calibrate it), and reports the share flagged at a 1% and a 5% target
false-positive rate of: held-out in-scope test questions, random characters, Cyrillic and
CJK gibberish, CLINC's out-of-scope test questions and test questions of the other
intents; plus milliseconds per text to embed. Writes
``benchmarks/results/text_guard_embedder.json``.
"""

from __future__ import annotations

import argparse
import random
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from bastion.llm.embed import get_embedder  # noqa: E402
from bastion.models.text import train_text_intent  # noqa: E402
from bastion.service.fastdetect import KnnOutlierDetector  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--intents", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(common.THREADS)
    ds = common.clinc(f"?intents={args.intents}&oos=0")
    full = common.clinc()
    model, _ = train_text_intent(ds.x_train, ds.y_train, n_classes=ds.n_classes,
                                 class_names=ds.class_names)
    rng = np.random.default_rng(0)
    ref = ds.x_train[rng.permutation(len(ds.x_train))[:1000]]
    idx = rng.permutation(len(ref))
    cut = int(0.6 * len(ref))
    r = random.Random(0)
    pool = string.ascii_letters + string.digits + string.punctuation + " "
    cyr = "абвгдежзийклмнопрстуфхцчшщыэюя"
    names = full.class_names
    sets = {
        "held-out in-scope": [str(t) for t in ds.x_test],
        "random characters": ["".join(r.choice(pool) for _ in range(r.randint(10, 60)))
                              for _ in range(200)],
        "cyrillic gibberish": [" ".join("".join(r.choice(cyr) for _ in range(r.randint(2, 8)))
                                        for _ in range(r.randint(3, 9))) for _ in range(100)],
        "cjk characters": ["".join(chr(r.randint(0x4E00, 0x9FFF))
                                   for _ in range(r.randint(4, 20))) for _ in range(100)],
        "clinc out-of-scope": [str(q) for q, y in zip(full.x_test, full.y_test, strict=True)
                               if names[y] == "oos"][:300],
        "other clinc intents": [str(q) for q, y in zip(full.x_test, full.y_test, strict=True)
                                if names[y] not in ds.class_names + ["oos"]][:300],
    }
    embedders = {
        "minilm-6": lambda t: get_embedder(None).encode(list(t)),
        "minilm-3": lambda t: get_embedder(3).encode(list(t)),
        "model": lambda t: model.features(list(t)),
    }
    runs = []
    for name, embed in embedders.items():
        embed(list(ref[:8]))  # load and warm up
        t0 = time.perf_counter()
        e = embed(list(ref))
        ms = (time.perf_counter() - t0) / len(ref) * 1000
        vecs = {k: embed(v) for k, v in sets.items()}
        for fpr in (0.01, 0.05):
            det = KnnOutlierDetector().fit(e[idx[:cut]]).calibrate(e[idx[cut:]], fpr=fpr)
            rates = {k: round(float((det.score(v) > det.threshold_).mean()), 4)
                     for k, v in vecs.items()}
            row = {"embedder": name, "target_fpr": fpr, "ms_per_text": round(ms, 2),
                   "flag_rate": rates}
            runs.append(row)
            print(row, flush=True)
    common.write_result("text_guard_embedder", {
        "settings": {"intents": args.intents, "reference": 1000, "fit": cut,
                     "calibrate": len(ref) - cut, "detector": "knn k=5",
                     "sizes": {k: len(v) for k, v in sets.items()}},
        "runs": runs})


if __name__ == "__main__":
    main()
