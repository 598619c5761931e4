"""Adversarial data augmentation for the zoo's text model (MiniLM layers + head).

``augment_text_model(model, x_train, y_train)`` trains on random neighbour swaps of the
training texts (:func:`random_swaps`: words replaced by their MiniLM neighbours or given
a typo, inside the attacks' own constraints, fresh every epoch; the default) and, with
``n_attack > 0``, runs ``rounds`` rounds that each attack
fresh training texts with the text attacks (word and character level by default) against
the *current* model, keeps the successful adversarial texts with their *true* labels, and
trains on all clean training texts plus every adversarial text found so far. By default
the top encoder layer is fine-tuned with the head (``tune_layers=1``): a frozen encoder
cannot move an adversarial text's embedding, and a head refitted on frozen features
(``tune_layers=0``, the first version) was measured not to help
(``benchmarks/bench_text_harden.py``). ``evaluate_text_robustness`` measures clean
accuracy and attack success on held-out texts; ``harden_text`` runs every attack against
the model it evaluates (before: the original, after: the hardened one), never transferred.

Only :class:`~bastion.models.text.MeanPoolTextModel` (``bastion train --model
text-intent``) is retrained here; other text models raise one clear error.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
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


def random_swaps(texts: list[str], labels: np.ndarray, *, copies: int, seed: int,
                 candidates: int = 35, char_share: float = 0.0,
                 constraints: Any = None, similarity: Any = None,
                 batch: int = 512) -> list[tuple[str, int, int]]:
    """``copies`` randomly perturbed variants of every text, each inside the attacks' own
    search space: between one word and the constraints' word limit of the editable words
    (stop words and named entities kept) replaced by one of their ``candidates`` nearest
    MiniLM word neighbours (or, with probability ``char_share`` per word, by one character
    edit), kept only if the sentence similarity stays at the constraints' minimum.
    Returns ``(text, label, source index)``; texts with no editable word give none."""
    import random

    from bastion.attacks.text.base import Similarity, TextConstraints, join, split_words
    from bastion.attacks.text.charlevel import char_edits
    from bastion.attacks.text.neighbours import minilm_neighbours

    cons = constraints or TextConstraints()
    sim = similarity or Similarity()
    nb = minilm_neighbours()
    rng = random.Random(seed)
    drafts: list[tuple[str, int, int]] = []
    for src, text in enumerate(texts):
        parts = split_words(text)
        pos = [i for i in cons.editable(parts) if nb.neighbours(parts[i], candidates)]
        if not pos:
            continue
        limit = min(len(pos), cons.max_changes(len(parts) // 2))
        for _ in range(int(copies)):
            q = list(parts)
            for i in rng.sample(pos, rng.randint(1, limit)):
                if char_share > 0 and rng.random() < char_share:
                    edits = char_edits(parts[i], rng, n=1)
                    q[i] = edits[0] if edits else q[i]
                else:
                    q[i] = rng.choice(nb.neighbours(parts[i], candidates))
            draft = join(q)
            if draft != text:
                drafts.append((draft, int(labels[src]), src))
    srcs = sorted({s for _, _, s in drafts})
    where = {s: j for j, s in enumerate(srcs)}
    orig = np.concatenate([sim.embedder.encode([texts[s] for s in srcs[k : k + batch]])
                           for k in range(0, len(srcs), batch)] or [np.zeros((0, 1))])
    out: list[tuple[str, int, int]] = []
    for k in range(0, len(drafts), batch):
        chunk = drafts[k : k + batch]
        b = sim.embedder.encode([t for t, _, _ in chunk])
        a = orig[[where[s] for _, _, s in chunk]]
        keep = (a * b).sum(1) >= cons.min_similarity
        out += [d for d, ok in zip(chunk, keep, strict=True) if ok]
    return out


def _tune_top(model: Any, texts: list[str], y: np.ndarray, adv: list[tuple[str, int, int]], *,
              layers: int, epochs: int, lr: float, head_lr: float, consistency: float,
              batch_size: int, seed: int,
              extra: Callable[[int], list[tuple[str, int, int]]] | None = None) -> None:
    """Fine-tune the top ``layers`` encoder layers and the head of ``model.net`` in place on
    the clean texts plus the adversarial ones (true labels), plus, each epoch ``e``, the
    texts ``extra(e)`` returns (fresh random swaps). With ``consistency > 0`` each
    adversarial text's prediction is also pulled (KL) towards its clean source's."""
    from torch import nn

    net = model.net
    blocks = net.encoder.encoder.layer
    k = max(0, min(int(layers), len(blocks)))
    net.requires_grad_(False)
    params = [p for b in blocks[len(blocks) - k:] for p in b.parameters()]
    for p in params:
        p.requires_grad_(True)
    net.head.requires_grad_(True)
    groups = [{"params": list(net.head.parameters()), "lr": head_lr}]
    if params:
        groups.append({"params": params, "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n_clean = len(texts)
    y_t = torch.as_tensor(y, dtype=torch.long)
    found = adv

    def fwd(batch: list[str]) -> torch.Tensor:
        ids, mask = model.tokenize(batch)
        return net(net.encoder.get_input_embeddings()(ids), mask)

    net.train()
    try:
        for e in range(int(epochs)):
            adv = found + (extra(e) if extra is not None else [])
            n_adv = len(adv)
            # clean and adversarial indices mixed; adversarial ones are negative (-1 - j)
            order = torch.randperm(n_clean + n_adv, generator=gen).tolist()
            for i in range(0, len(order), batch_size):
                b = order[i : i + batch_size]
                cl = [j for j in b if j < n_clean]
                av = [j - n_clean for j in b if j >= n_clean]
                bt = [texts[j] for j in cl] + [adv[j][0] for j in av]
                by = torch.cat([y_t[cl], torch.as_tensor([adv[j][1] for j in av],
                                                         dtype=torch.long)])
                logits = fwd(bt)
                loss = nn.functional.cross_entropy(logits, by)
                if consistency > 0 and av:
                    with torch.no_grad():
                        ref = torch.log_softmax(fwd([texts[adv[j][2]] for j in av]), 1)
                    lp = torch.log_softmax(logits[len(cl):], 1)
                    loss = loss + consistency * nn.functional.kl_div(
                        lp, ref, log_target=True, reduction="batchmean")
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        net.eval()
        net.requires_grad_(False)


def augment_text_model(model: Any, x_train: Any, y_train: Any, *, n_attack: int = 0,
                       rounds: int = 1, attacks: tuple[str, ...] = ("word", "char"),
                       max_queries: int = 100, tune_layers: int = 1,
                       epochs: int | None = None, lr: float | None = None,
                       consistency: float = 0.0, swaps: int | None = None,
                       char_share: float = 0.3,
                       seed: int = 0, log: Callable[[str], None] | None = None,
                       **constraints: Any) -> tuple[Any, dict[str, Any]]:
    """A hardened copy of ``model`` by adversarial data augmentation (see the module docs);
    returns ``(hardened, info)``.

    Each of ``rounds`` rounds (default 1) attacks ``n_attack`` fresh training texts (split
    between ``attacks``; default 0: no attack) against the *current* model, adds the
    successful adversarial texts with their true labels, and trains on all training texts
    plus every adversarial text found so far: ``tune_layers`` top encoder layers and the
    head (``epochs`` passes, default 3, ``lr`` default 2e-4 for the layers, 1e-3 for the
    head), or with ``tune_layers=0`` only a head refitted on frozen features (default 60
    epochs, lr 1e-2).

    ``swaps`` (default 2 when layers are tuned) adds, every epoch, that many fresh random
    neighbour swaps of every training text (:func:`random_swaps`, inside the attacks'
    search space and constraints; ``char_share``, default 0.3, of the changed words get a
    character edit instead). The defaults (swaps alone, 3 epochs at 2e-4) were chosen on
    CLINC's validation split against the adversarial rounds (``benchmarks/README.md``)."""
    from bastion.attacks.text import TextConstraints, get_text_attack
    from bastion.models.text import MeanPoolTextModel, fit_head, pooled_features

    if not isinstance(model, MeanPoolTextModel):
        raise BastionError("text augmentation retrains the zoo's text-intent model "
                           "(MiniLM layers + head); this model is not one",
                           hint="train one with bastion train --model text-intent")
    if swaps is None:  # the default: two swaps of every text an epoch when layers are tuned
        swaps = 2 if isinstance(tune_layers, int) and tune_layers > 0 else 0
    checks = {"n_attack": (n_attack, 0), "rounds": (rounds, 1), "max_queries": (max_queries, 1),
              "tune_layers": (tune_layers, 0), "epochs": (epochs, 1), "swaps": (swaps, 0)}
    for key, (val, low) in checks.items():
        if val is not None and (isinstance(val, bool) or not isinstance(val, int)
                                or val < low):
            raise BastionError(f"{key} must be a whole number >= {low}, not {val!r}",
                               hint=f"e.g. --opt {key}={max(low, 1)}")
    if isinstance(char_share, bool) or not isinstance(char_share, int | float) \
            or not 0.0 <= char_share <= 1.0:
        raise BastionError(f"char_share must be a number in [0, 1], not {char_share!r}",
                           hint="e.g. --opt char_share=0.3")
    if n_attack == 0 and swaps == 0:
        raise BastionError("n_attack=0 and swaps=0 leave nothing to train on",
                           hint="e.g. --opt swaps=2 (random neighbour swaps) or "
                           "--opt n_attack=1000 (adversarial texts)")
    if swaps and tune_layers == 0:
        raise BastionError("swaps needs tune_layers >= 1 (a head refit on frozen features "
                           "does not use them)", hint="e.g. --opt tune_layers=1")
    for key, val in (("lr", lr), ("consistency", consistency)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int | float)
                                or not np.isfinite(val) or val < 0 or (key == "lr" and val == 0)):
            raise BastionError(f"{key} must be a positive number, not {val!r}",
                               hint=f"e.g. --opt {key}={'5e-5' if key == 'lr' else '1.0'}")
    if tune_layers > model.layers:
        raise BastionError(f"tune_layers={tune_layers} but the model has {model.layers} "
                           "encoder layers", hint=f"use 0..{model.layers}")
    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    texts = [str(t) for t in x_train]
    y = np.asarray(y_train, dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    hardened = copy.copy(model)
    hardened.net = copy.deepcopy(model.net)
    if tune_layers > 0:
        hardened.fine_tuned = True
    adv: list[tuple[str, int, int]] = []  # (adversarial text, true label, source index)
    cons = TextConstraints(**{k: v for k, v in constraints.items()
                              if k in TextConstraints.__dataclass_fields__})
    per_round: list[dict[str, Any]] = []
    feats = None
    for r in range(int(rounds)):
        pick = order[(r * n_attack) % len(texts):][:n_attack] if n_attack else order[:0]
        found_round: dict[str, int] = {}
        for k, name in enumerate(attacks if n_attack else ()):
            part = pick[k::len(attacks)]
            rep = get_text_attack(name, max_queries=max_queries, seed=seed + r,
                                  **constraints).run(hardened, [texts[i] for i in part],
                                                     y[part])
            found = [(res.adversarial, int(y[i]), int(i))
                     for res, i in zip(rep.results, part, strict=True) if res.success]
            found_round[name] = len(found)
            adv += found
            say(f"round {r + 1}: {name} fooled {len(found)}/{len(part)} training texts")
        per_round.append({"attacked": len(pick), "found": found_round})
        if tune_layers > 0:
            swapped: list[int] = []

            def extra(e: int, r: int = r, swapped: list[int] = swapped
                      ) -> list[tuple[str, int, int]]:
                if not swaps:
                    return []
                got = random_swaps(texts, y, copies=swaps, seed=seed + 1000 * r + e,
                                   char_share=float(char_share), constraints=cons)
                swapped.append(len(got))
                say(f"round {r + 1}: {len(got)} random neighbour swaps")
                return got

            _tune_top(hardened, texts, y, adv, layers=tune_layers,
                      epochs=epochs or 3, lr=lr or 2e-4, head_lr=1e-3,
                      consistency=float(consistency), batch_size=64, seed=seed + r,
                      extra=extra)
            per_round[-1]["swaps"] = swapped
        else:
            if feats is None:
                feats = pooled_features(model, texts)
            f_all = torch.cat([feats, pooled_features(model, [a for a, _, _ in adv])]) \
                if adv else feats
            y_all = torch.as_tensor(np.concatenate(
                [y, np.asarray([lab for _, lab, _ in adv], dtype=np.int64)]))
            fit_head(hardened.net.head, f_all, y_all, epochs=epochs or 60, lr=lr or 1e-2,
                     seed=seed, reset=True)
        hardened.queries = 0
        say(f"round {r + 1}: trained on {len(texts)} + {len(adv)} adversarial texts "
            f"({time.perf_counter() - t0:.0f} s)")
    hardened.net.requires_grad_(False)
    info = {"attacked": sum(p["attacked"] for p in per_round), "adversarial_added": len(adv),
            "rounds": per_round, "tune_layers": tune_layers, "swaps": swaps,
            "char_share": char_share,
            "per_attack": {a: sum(p["found"].get(a, 0) for p in per_round) for a in attacks},
            "seconds": round(time.perf_counter() - t0, 1),
            "adversarial": [(a, lab) for a, lab, _ in adv]}
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
    allowed = {"n_attack", "rounds", "max_queries", "tune_layers", "epochs", "lr",
               "consistency", "swaps", "char_share"}
    bad = [k for k in opts if k not in allowed]
    if bad:
        raise BastionError(f"unknown option {bad[0]!r} for --method augment",
                           hint=f"options: {', '.join(sorted(allowed))}")
    out = Path(out)
    check_output_dir(out)
    n = min(len(ds.x_test), int(limit or 200))
    pick = np.sort(np.random.default_rng(seed).choice(len(ds.x_test), n, replace=False))
    texts, labels = [str(t) for t in ds.x_test[pick]], np.asarray(ds.y_test)[pick]
    hardened, info = augment_text_model(model, ds.x_train, ds.y_train, seed=seed, **opts)
    evals = ("word", "char", "hotflip")
    sides = {}
    for name, m in (("before", model), ("after", hardened)):
        # adaptive: each attack runs against the model it evaluates
        r = evaluate_text_robustness(m, texts, labels, attacks=evals, max_queries=300,
                                     seed=seed)
        sides[name] = TextSide(clean_accuracy=r["clean_accuracy"],
                               robust_accuracy={a: r[a]["robust_accuracy"] for a in evals},
                               success_rate={a: r[a]["success_rate"] for a in evals})
    b, a = sides["before"], sides["after"]
    helps = all(a.success_rate[k] < b.success_rate[k] for k in evals)
    verdict = (f"attack success {', '.join(f'{k} {b.success_rate[k]:.1%} -> {a.success_rate[k]:.1%}' for k in evals)}; "  # noqa: E501
               f"clean accuracy {b.clean_accuracy:.1%} -> {a.clean_accuracy:.1%} on {n} texts")
    out.mkdir(parents=True, exist_ok=True)
    info.pop("adversarial", None)
    save_text_model(hardened, out / "model",
                    extra={"hardened": {"method": "augment", "options": opts, **info}})
    doc = {"kind": "text", "method": "augment", "model": model_label, "n_eval": n,
           "before": asdict(b), "after": asdict(a), "helps": helps, "verdict": verdict,
           "augmentation": info}
    paths = {"json": out / "report.json", "html": out / "report.html", "model": out / "model"}
    write_json_atomic(paths["json"], json.loads(json.dumps(doc)))
    page = HtmlPage("Text hardening: augmentation (neighbour swaps, adversarial texts)",
                    subtitle=model_label)
    page.table([[k, b.clean_accuracy, a.clean_accuracy, b.success_rate.get(k, 0.0),
                 a.success_rate.get(k, 0.0)] for k in evals],
               ["attack", "clean before", "clean after", "success before", "success after"])
    (page.good if helps else page.bad)(verdict)
    page.paragraph(f"Augmentation: {info}")
    write_text_atomic(paths["html"], page.render())
    return TextHardenResult(TextHardenReport(b, a, helps, verdict, info), paths, hardened)
