"""Which text-intent model to ship: frozen MiniLM layers + a head, or fine-tuned?

    .venv/bin/python benchmarks/text_zoo_choice.py [--intents 30]

Trains on CLINC150's train split restricted to the first ``--intents`` intents (no
out-of-scope class, so the numbers compare the encoders, not the oos threshold) and
reports test accuracy and seconds for frozen 3 and 6 layers and fine-tuned 3 layers
(one epoch). Writes ``benchmarks/results/text_zoo_choice.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from bastion.models.text import train_text_intent  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--intents", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(common.THREADS)
    ds = common.clinc(f"?intents={args.intents}&oos=0")
    runs = []
    for layers, ft, epochs in ((3, False, None), (6, False, None), (3, True, 1)):
        _, m = train_text_intent(ds.x_train, ds.y_train, n_classes=ds.n_classes,
                                 x_test=ds.x_test, y_test=ds.y_test, layers=layers,
                                 fine_tune=ft, epochs=epochs)
        runs.append(m)
        print(m, flush=True)
    common.write_result("text_zoo_choice", {"settings": {"intents": args.intents,
                                                         "n_train": len(ds.x_train),
                                                         "n_test": len(ds.x_test)},
                                            "runs": runs})


if __name__ == "__main__":
    main()
