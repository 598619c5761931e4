"""``harden``: one call from an undefended model to a hardened one with a before/after
report. The CLI command ``bastion harden`` is a thin shell around it.

Methods and their options (``options=`` keys; anything else is an error):

=============  ==========================================================================
``pgd-at``     lr, batch_size, optimizer, lr_schedule, weight_decay, label_smoothing,
``fast-at``    steps, step_size, random_start, beta (trades), adv_fraction, eps_warmup,
``trades``     init (finetune/scratch), guard, guard_points, guard_steps, guard_drop,
               arch + arch_kwargs (build a fresh zoo network, e.g. mlp with dropout),
               ema_decay (weight averaging), fast_variant (rs/nfgsm) and noise_mult
               (fast-at only); on_collapse (recover/stop), max_recoveries,
               recovery_lr_factor, recovery_step_factor, recovery_pgd_steps (what the
               guard does at catastrophic overfitting); seeds (train N seeds, report each,
               the median and spread, keep the best on validation data: see
               :mod:`bastion.defend.seeds`)
``distill``    temperature, teacher_epochs, lr, batch_size, weight_decay, init, arch,
               arch_kwargs
``ensemble``   members, member_method (clean or a training method), archs (one zoo
               arch per member), combine (prob/logprob), vote, plus the training options
``squeeze``    bits, median
``smooth``     sigma, n0, n, alpha, n_predict, eot_samples, radii, noise_epochs (Gaussian
               training of the base; 0 keeps the base as it is), plus training options
=============  ==========================================================================
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bastion.data.dataset import Dataset
from bastion.defend.evaluate import evaluate_defense
from bastion.defend.report import HardenReport, write_harden_report
from bastion.defend.seeds import check_n_seeds, derive_seeds
from bastion.defend.training import (
    ADVERSARIAL_METHODS,
    AdversarialTrainer,
    EpochLog,
    check_eps,
)
from bastion.errors import BastionError, ModelError
from bastion.models.torch_model import TorchModel

METHODS: tuple[str, ...] = ("pgd-at", "fast-at", "trades", "distill", "ensemble",
                            "squeeze", "smooth")

_TRAIN_OPTS = {"lr", "batch_size", "optimizer", "lr_schedule", "weight_decay",
               "label_smoothing", "steps", "step_size", "random_start", "beta",
               "adv_fraction", "eps_warmup", "ema_decay", "fast_variant", "noise_mult",
               "init", "guard",
               "guard_points", "guard_steps", "guard_drop", "momentum", "arch", "arch_kwargs",
               "on_collapse", "max_recoveries", "recovery_lr_factor", "recovery_step_factor",
               "recovery_pgd_steps"}
OPTIONS: dict[str, set[str]] = {
    "pgd-at": _TRAIN_OPTS | {"seeds"},
    "fast-at": _TRAIN_OPTS | {"seeds"},
    "trades": _TRAIN_OPTS | {"seeds"},
    "distill": {"temperature", "teacher_epochs", "lr", "batch_size", "weight_decay", "init",
                "arch", "arch_kwargs"},
    "ensemble": _TRAIN_OPTS | {"members", "member_method", "archs", "combine", "vote"},
    "squeeze": {"bits", "median"},
    "smooth": _TRAIN_OPTS | {"sigma", "n0", "n", "alpha", "n_predict", "eot_samples",
                             "radii", "noise_epochs"},
}


def methods_for(model: Any) -> list[str]:
    """The hardening methods that fit ``model``."""
    if isinstance(model, TorchModel):
        return list(METHODS)
    if hasattr(model, "predict_proba"):
        return ["smooth"]
    return []


@dataclass
class HardenResult:
    """The hardened model, its report and where things were written."""

    model: Any
    report: HardenReport
    paths: dict[str, Path]


def _factory(model: TorchModel, arch: str | None, kwargs: Mapping[str, Any] | None
             ) -> Callable[[], Any] | None:
    if arch is None:
        if kwargs:
            raise BastionError("arch_kwargs needs arch", hint="e.g. arch=mlp")
        return None
    from bastion.models.zoo import build_module

    kw = dict(kwargs or {})
    build_module(arch, input_shape=model.input_shape, n_classes=model.n_classes, **kw)
    return lambda: build_module(arch, input_shape=model.input_shape,
                                n_classes=model.n_classes, **kw)


def _trainer(method: str, model: TorchModel, *, eps: float, norm: str, epochs: int,
             seed: int, opts: dict[str, Any], checkpoint_dir: Path | None,
             sigma: float | None = None) -> AdversarialTrainer:
    kw = {k: v for k, v in opts.items() if k in _TRAIN_OPTS - {"arch", "arch_kwargs"}}
    factory = _factory(model, opts.get("arch"), opts.get("arch_kwargs"))
    if factory is not None:
        kw["init"] = "scratch"
    if method == "fast-at":  # Wong et al.'s MNIST recipe: cyclic, peak 5e-3
        kw.setdefault("lr_schedule", "cyclic")
        kw.setdefault("lr", 5e-3)
    if sigma is not None:
        kw["sigma"] = sigma
    try:
        return AdversarialTrainer(method=method, eps=eps, norm=norm, epochs=epochs,
                                  seed=seed, module_factory=factory,
                                  checkpoint_dir=checkpoint_dir, **kw)
    except TypeError as exc:
        raise BastionError(f"bad training option: {exc}") from None


def _default_bits(model: Any) -> int:
    shape = tuple(model.input_shape)
    return 1 if len(shape) == 3 and shape[0] == 1 else 5


def harden(
    model: Any,
    data: Dataset,
    *,
    method: str,
    eps: float | None = None,
    norm: str = "linf",
    epochs: int = 5,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    epsilons: Sequence[float] | None = None,
    limit: int | None = 200,
    attacks: Sequence[str] | None = None,
    attack_options: Mapping[str, Mapping[str, Any]] | None = None,
    out: str | Path | None = None,
    arch_hint: tuple[str, dict[str, Any]] | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
    sanity_checks: bool = True,
    progress: bool = False,
    model_label: str | None = None,
    fit: Callable[..., Any] | None = None,
) -> HardenResult:
    """Harden ``model`` with ``method`` on ``data`` and evaluate it before and after.

    With ``out``, training checkpoints go to ``out/checkpoints`` (a rerun resumes), the
    hardened model to ``out/model`` and the report to ``out/report.json`` and
    ``out/report.html``. Every input is checked before any file is written.

    Args:
        model: the undefended model (a :class:`TorchModel`; only ``smooth`` fits other
            models).
        data: training data (``x_train``) and evaluation data (``x_test``).
        method: one of :data:`METHODS`.
        eps: training budget (default: 0.1 of the input range for linf, 1.0 * range for
            l2); also the centre of the evaluation epsilons.
        norm: ``linf`` or ``l2``.
        epochs: training epochs (per member for ensembles).
        seed: one seed, one result.
        options: method options (see the module docstring).
        epsilons: evaluation budgets (default ``eps/2, eps, 1.5 eps``).
        limit: evaluation points (the first ``limit`` test points).
        attacks, attack_options: the evaluation cascade (default: see
            :mod:`bastion.defend.evaluate`).
        fit: runs the adversarial trainer instead of ``trainer.fit``, as
            ``fit(trainer, model, data, on_epoch)`` (e.g. :class:`bastion.defend.ray_train.
            RayFit`: data-parallel on Ray Train); the pgd-at, fast-at and trades methods.
    """
    from bastion.data.validate import check_dataset_for_model, check_inputs, check_labels

    t_all = time.perf_counter()
    if method not in METHODS:
        raise BastionError(f"unknown method {method!r}", hint=f"use one of {', '.join(METHODS)}")
    fits = methods_for(model)
    if method not in fits:
        raise ModelError(
            f"{method} does not fit a {type(model).__name__} (it needs gradients of a "
            "PyTorch model)",
            hint="methods that fit this model: " + (", ".join(fits) or "none")
            + "; or train a torch model (bastion train --model cnn)",
        )
    if norm not in ("linf", "l2"):
        raise BastionError(f"unknown norm {norm!r}", hint="use linf or l2")
    opts = dict(options or {})
    unknown = sorted(set(opts) - OPTIONS[method])
    if unknown:
        raise BastionError(f"options {', '.join(unknown)} do not apply to {method}",
                           hint=f"{method} takes: {', '.join(sorted(OPTIONS[method]))}")
    if fit is not None and method not in ADVERSARIAL_METHODS:
        raise BastionError(f"{method} does not run on Ray Train",
                           hint="pgd-at, fast-at and trades do; or leave out --engine ray")
    if fit is not None and check_n_seeds(opts.get("seeds", 1)) > 1:
        raise BastionError("several seeds do not run on Ray Train yet",
                           hint="give --seeds 1 with --engine ray, or leave out --engine ray")
    if int(epochs) < 1 and method not in ("squeeze", "smooth"):
        raise BastionError(f"epochs must be at least 1, got {epochs}")
    check_dataset_for_model(data, model)
    check_inputs(data.x_train, input_shape=model.input_shape, bounds=model.bounds,
                 name="training inputs")
    check_labels(data.y_train, n_classes=model.n_classes, n=len(data.x_train))
    x_eval = check_inputs(data.x_test, input_shape=model.input_shape, bounds=model.bounds,
                          name="test inputs")
    y_eval = check_labels(data.y_test, n_classes=model.n_classes, n=len(data.x_test))
    lo, hi = model.bounds
    span = float(hi - lo)
    if eps is None:
        eps = 0.1 * span if norm == "linf" else 1.0 * span
    eps = check_eps(eps, norm=norm, bounds=model.bounds, input_shape=model.input_shape)
    if eps <= 0 and method in ADVERSARIAL_METHODS:
        raise BastionError(f"{method} needs a positive --eps")
    if epsilons is None:
        limit_eps = span if norm == "linf" else span * float(np.sqrt(np.prod(model.input_shape)))
        epsilons = sorted({round(min(e, limit_eps), 6) for e in (eps / 2, eps, 1.5 * eps)})
    for e in epsilons:
        check_eps(e, norm=norm, bounds=model.bounds, input_shape=model.input_shape)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise BastionError(f"--out {out_dir} is a file", hint="give a folder path")
        from bastion.defend.persist import check_saveable

        if isinstance(model, TorchModel) and method != "ensemble" and not opts.get("arch"):
            check_saveable(model, hint=arch_hint)
    ckpt = out_dir / "checkpoints" if out_dir is not None else None

    n_seeds = check_n_seeds(opts.get("seeds", 1))
    settings: dict[str, Any] = {"method": method, "eps": eps, "norm": norm, "epochs": epochs,
                                "seed": seed, **opts}
    timings: dict[str, float] = {}
    history: list[EpochLog] = []
    stopped, resumed = False, 0
    recoveries: list[dict[str, Any]] = []
    ended_on_best = False
    seeds_summary: dict[str, Any] | None = None
    t_train = time.perf_counter()
    hardened: Any
    eval_kw: dict[str, Any] = {}

    def log(e: EpochLog) -> None:
        if on_epoch is not None:
            on_epoch(e)

    if method in ADVERSARIAL_METHODS and n_seeds > 1:
        outcome = _train_seeds(method, model, data, eps=eps, norm=norm, epochs=epochs,
                               seed=seed, n_seeds=n_seeds, opts=opts, ckpt=ckpt, log=log,
                               x_eval=x_eval, y_eval=y_eval, limit=limit)
        hardened = outcome.model
        kept = outcome.runs[outcome.kept]
        history, stopped = outcome.histories[outcome.kept], kept.stopped_early
        recoveries, ended_on_best = kept.recoveries, kept.ended_on_best
        seeds_summary = outcome.summary(eps=eps, val_steps=SEED_VAL_STEPS)
        seeds_summary["test_evaluation"] = (
            f"PGD-{SEED_VAL_STEPS} (random start) at eps {eps:g} and clean accuracy on the "
            f"first {min(len(x_eval), limit or len(x_eval))} test points, per seed; "
            "reported only, never used to choose")
        settings.update({k: v for k, v in outcome.settings.items() if k not in settings})
        settings["seed_list"] = seeds_summary["seeds"]
    elif method in ADVERSARIAL_METHODS:
        tr = _trainer(method, model, eps=eps, norm=norm, epochs=epochs, seed=seed,
                      opts=opts, checkpoint_dir=ckpt)
        hardened = tr.fit(model, data, on_epoch=log) if fit is None else fit(
            tr, model, data, log)
        history, stopped, resumed = tr.history_, tr.stopped_early_, tr.resumed_from_
        recoveries, ended_on_best = tr.recoveries_, tr.ended_on_best_
        settings.update({k: v for k, v in tr.settings().items() if k not in settings})
        settings.update(getattr(fit, "settings", None) or {})
    elif method == "distill":
        from bastion.defend.distill import DefensiveDistillation

        dkw = {k: v for k, v in opts.items() if k in {"temperature", "teacher_epochs", "lr",
                                                      "batch_size", "weight_decay", "init"}}
        dd = DefensiveDistillation(epochs=epochs, seed=seed,
                                   module_factory=_factory(model, opts.get("arch"),
                                                           opts.get("arch_kwargs")), **dkw)
        hardened = dd.fit(model, data, on_epoch=log)
        history = dd.history_
        settings.update(dd.settings())
        eval_kw["temperature"] = dd.temperature
    elif method == "ensemble":
        from bastion.defend.ensemble import EnsembleModel

        n_members = int(opts.pop("members", 3))
        member_method = str(opts.pop("member_method", "fast-at"))
        archs = opts.pop("archs", None)
        combine = str(opts.pop("combine", "prob"))
        vote = bool(opts.pop("vote", False))
        if n_members < 2:
            raise BastionError(f"an ensemble needs at least 2 members, got {n_members}")
        if member_method not in ("clean", *ADVERSARIAL_METHODS):
            raise BastionError(f"unknown member_method {member_method!r}",
                               hint="use clean, pgd-at, fast-at or trades")
        if isinstance(archs, str):
            archs = [a.strip() for a in archs.split(",") if a.strip()]
        members = []
        for i in range(n_members):
            mo = dict(opts)
            if archs:
                mo["arch"] = archs[i % len(archs)]
            else:  # clean members: fresh networks per seed; robust ones: fine-tune
                mo.setdefault("init", "scratch" if member_method == "clean" else "finetune")
            sub = ckpt / f"member-{i}" if ckpt is not None else None
            tr = _trainer(member_method, model, eps=eps, norm=norm, epochs=epochs,
                          seed=seed + 1000 * i, opts=mo, checkpoint_dir=sub)
            members.append(tr.fit(model, data, on_epoch=log))
            history += tr.history_
            stopped = stopped or tr.stopped_early_
        hardened = EnsembleModel(members, combine=combine, vote=vote,
                                 name=f"ensemble({n_members}x{member_method})")
        settings.update({"members": n_members, "member_method": member_method,
                         "archs": archs, "combine": combine, "vote": vote})
    elif method == "squeeze":
        from bastion.defend.squeeze import FeatureSqueezing

        bits = opts.get("bits", None if opts.get("median") else _default_bits(model))
        hardened = FeatureSqueezing(model, bits=bits, median=opts.get("median"))
        settings.update(hardened.settings())
    else:  # smooth
        from bastion.defend.smoothing import smooth

        sigma = float(opts.get("sigma", 0.25 * span))
        noise_epochs = int(opts.get("noise_epochs", epochs))
        base = model
        if noise_epochs > 0:
            if not isinstance(model, TorchModel):
                raise ModelError("Gaussian noise training needs a PyTorch model",
                                 hint="set noise_epochs=0 to smooth this model as it is")
            topts = {k: v for k, v in opts.items() if k in _TRAIN_OPTS}
            tr = _trainer("noise", model, eps=0.0, norm="l2", epochs=noise_epochs,
                          seed=seed, opts=topts, checkpoint_dir=ckpt, sigma=sigma)
            base = tr.fit(model, data, on_epoch=log)
            history, resumed = tr.history_, tr.resumed_from_
        skw: dict[str, Any] = {k: opts[k] for k in ("n0", "n", "alpha", "n_predict", "eot_samples")
               if k in opts}
        hardened = smooth(base, sigma=sigma, seed=seed, **skw)
        eval_kw["radii"] = opts.get("radii")
        settings.update({"sigma": sigma, "noise_epochs": noise_epochs, **hardened.settings()})
    timings["train_s"] = time.perf_counter() - t_train

    t_eval = time.perf_counter()
    ev = evaluate_defense(model, hardened, x_eval, y_eval, method=method, norm=norm,
                          epsilons=epsilons, seed=seed, limit=limit, attacks=attacks,
                          attack_options=attack_options, sanity_checks=sanity_checks,
                          progress=progress, **eval_kw)
    if method == "smooth":
        _certify_before(ev, model, x_eval, y_eval, limit=limit, sigma=sigma, seed=seed,
                        smooth_kw=skw, trained=noise_epochs > 0)
    timings["evaluate_s"] = time.perf_counter() - t_eval
    timings["total_s"] = time.perf_counter() - t_all

    from bastion import __version__
    from bastion.envinfo import environment

    warnings = list(ev.warnings)
    for r in recoveries:
        warnings.append(
            f"Catastrophic overfitting at epoch {r['epoch']} (held-out PGD accuracy "
            f"{r['best_robust_accuracy']:.3f} -> {r['robust_accuracy']:.3f}): recovered by "
            f"restoring epoch {r['restored_epoch']} and going on with lr x{r['lr_scale']:g}"
            f", step x{r['step_scale']:g}"
            + (f", PGD-{r['inner_pgd_steps']} inside" if r["inner_pgd_steps"] else "") + ".")
    if stopped:
        warnings.append("Training stopped early at catastrophic overfitting (robust accuracy "
                        "on the held-out batch collapsed); the best checkpoint was kept.")
    if ended_on_best:
        warnings.append("The last epoch was worse on the held-out batch than the best one; "
                        "the best checkpoint is the model returned.")
    report = HardenReport(
        method=method,
        model=model_label or str(getattr(model, "name", type(model).__name__)),
        data=str(data.name),
        norm=norm,
        epsilons=sorted({0.0, *[float(e) for e in epsilons]}),
        seed=int(seed),
        settings=_jsonable(settings),
        before=ev.before,
        after=ev.after,
        evaluation=ev.notes,
        verdict=ev.verdict,
        helps=ev.helps,
        training=[asdict(h) for h in history],
        stopped_early=stopped,
        recoveries=[dict(r) for r in recoveries],
        ended_on_best=bool(ended_on_best),
        seeds=seeds_summary,
        environment=environment(),
        resumed_from_epoch=int(resumed),
        timings=timings,
        warnings=warnings,
        model_dir=str(out_dir / "model") if out_dir is not None else None,
        bastion_version=__version__,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    paths: dict[str, Path] = {}
    if out_dir is not None:
        from bastion.defend.persist import save_hardened

        paths["model"] = save_hardened(
            hardened, out_dir / "model", arch_hint=arch_hint,
            meta={"method": method, "settings": report.settings, "data": report.data,
                  "data_sha256": _data_sha256(data.x_train, data.y_train)})
        paths.update(write_harden_report(report, out_dir))
    return HardenResult(model=hardened, report=report, paths=paths)


def _data_sha256(x: Any, y: Any) -> str:
    """SHA-256 of the training inputs and labels (shape, dtype and bytes): the data
    fingerprint a factsheet shows."""
    import hashlib

    h = hashlib.sha256()
    for a in (np.ascontiguousarray(x), np.ascontiguousarray(y)):
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


SEED_VAL_STEPS = 20


def _train_seeds(method: str, model: TorchModel, data: Dataset, *, eps: float, norm: str,
                 epochs: int, seed: int, n_seeds: int, opts: dict[str, Any],
                 ckpt: Path | None, log: Callable[[EpochLog], None], x_eval: np.ndarray,
                 y_eval: np.ndarray, limit: int | None) -> Any:
    """Train ``n_seeds`` seeds (see :mod:`bastion.defend.seeds`), keep the best on
    validation data, and measure every seed on the test points for the report."""
    from bastion.defend.seeds import robust_accuracy, train_seeds

    made: list[AdversarialTrainer] = []

    def make(s: int) -> AdversarialTrainer:
        made.append(_trainer(method, model, eps=eps, norm=norm, epochs=epochs, seed=s,
                             opts=opts, checkpoint_dir=ckpt / f"seed-{s}" if ckpt else None))
        return made[-1]

    make(seed)  # every option checked before the first seed trains
    made.clear()
    outcome = train_seeds(make, model, data.x_train, data.y_train,
                          seeds=derive_seeds(seed, n_seeds), eps=eps, norm=norm,
                          split_seed=seed, val_steps=SEED_VAL_STEPS, on_epoch=log)
    n = len(x_eval) if limit is None else min(limit, len(x_eval))
    for run, m in zip(outcome.runs, outcome.models, strict=True):
        clean, robust = robust_accuracy(m, x_eval[:n], y_eval[:n], eps=eps, norm=norm,
                                        steps=SEED_VAL_STEPS, seed=seed + 11)
        run.test = {"clean_accuracy": clean, "robust_accuracy": robust}
    outcome.settings = made[0].settings() if made else {}
    return outcome


def _certify_before(ev: Any, model: Any, x: np.ndarray, y: np.ndarray, *,
                    limit: int | None, sigma: float, seed: int, smooth_kw: dict[str, Any],
                    trained: bool) -> None:
    """Fill ``ev.before.certified_accuracy`` for randomized smoothing.

    An undefended classifier has no certificate of its own, so the honest "before" is
    the *undefended* model smoothed with the same sigma, samples and alpha, certified on
    the same points. With ``noise_epochs=0`` that is the hardened model itself, and
    its certificates are copied rather than computed twice."""
    from bastion.defend.smoothing import certified_accuracy_from, smooth

    after = ev.after.certified_accuracy
    if after is None:
        return
    if not trained:
        ev.before.certified_accuracy = dict(after)
        ev.notes.append("Certified accuracy before = after: without noise training the "
                        "hardened model is the undefended model, smoothed.")
        return
    if limit is not None:
        x, y = x[:limit], y[:limit]
    rr = [float(r) for r in after]
    classes, r = smooth(model, sigma=sigma, seed=seed, **smooth_kw).certify(x)
    ev.before.certified_accuracy = certified_accuracy_from(classes, r, y, rr)
    ev.notes.append(f"Certified accuracy before: the undefended model smoothed with the "
                    f"same sigma={sigma:g} and samples, without Gaussian noise training.")


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    import json

    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = repr(v)
    return out
