"""``bastion harden``: harden a model, evaluate it before and after, save both.

Thin: it resolves the model and data specs, calls :func:`bastion.defend.harden`, records
an MLflow run and renders one summary. :func:`run_harden` is the same job from Python.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from bastion.cli import _common as c
from bastion.errors import BastionError


def _arch_hint(model_spec: str) -> tuple[str, dict[str, Any]] | None:
    """The zoo architecture of a model folder or built-in model, when known."""
    try:
        if model_spec.startswith("builtin:"):
            from bastion.models.resolve import BUILTIN_MODELS

            return BUILTIN_MODELS[model_spec.split(":", 1)[1]][1], {}
        from bastion.models.persist import is_model_folder, read_model_meta

        if is_model_folder(model_spec):
            meta = read_model_meta(model_spec)
            return str(meta["arch"]), dict(meta.get("arch_kwargs") or {})
    except Exception:
        return None
    return None


def run_harden(
    *,
    model_spec: str,
    data_spec: str,
    out_dir: str | Path,
    method: str,
    eps: float | None = None,
    norm: str = "linf",
    epochs: int = 5,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    epsilons: list[float] | None = None,
    limit: int | None = 200,
    attacks: list[str] | None = None,
    attack_options: dict[str, dict[str, Any]] | None = None,
    label_column: str = "label",
    tracking_uri: str | None = None,
    track: bool = True,
    progress: bool = False,
    on_epoch: Any = None,
) -> tuple[Any, list[str]]:
    """Resolve the specs, harden, write ``out_dir`` and record an MLflow run.

    Returns ``(HardenResult, tracking_warnings)``. Bad input raises a
    :class:`BastionError` before anything is written.
    """
    from bastion._util import set_seed
    from bastion.data import load_data
    from bastion.defend import harden
    from bastion.models import resolve_model
    from bastion.registry.tracking import track_run

    if limit is not None and limit < 1:
        raise BastionError(f"--limit must be at least 1, got {limit}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BastionError(f"--out {out} is a file", hint="give a folder path")
    set_seed(seed)
    ds = load_data(data_spec, label_column=label_column, seed=seed)
    model = resolve_model(model_spec, input_shape=ds.input_shape, n_classes=ds.n_classes,
                          bounds=ds.bounds, seed=seed, progress=progress)
    params = {"model": model_spec, "data": data_spec, "method": method, "eps": eps,
              "norm": norm, "epochs": epochs, "seed": seed, "limit": limit,
              **{f"opt.{k}": v for k, v in (options or {}).items()}}
    with track_run("harden", params=params, tracking_uri=tracking_uri, enabled=track) as run:

        def epoch_cb(e: Any) -> None:
            run.log_metrics({"train_loss": e.loss, "guard_clean_accuracy": e.clean_accuracy,
                             "guard_robust_accuracy": e.robust_accuracy}, step=e.epoch)
            if on_epoch is not None:
                on_epoch(e)

        result = harden(model, ds, method=method, eps=eps, norm=norm, epochs=epochs,
                        seed=seed, options=options, epsilons=epsilons, limit=limit,
                        attacks=attacks, attack_options=attack_options, out=out,
                        arch_hint=_arch_hint(model_spec), on_epoch=epoch_cb,
                        progress=progress, model_label=model_spec)
        rep = result.report
        metrics = {"before_clean_accuracy": rep.before.clean_accuracy,
                   "after_clean_accuracy": rep.after.clean_accuracy}
        for k, v in rep.before.robust_accuracy.items():
            metrics[f"before_robust_accuracy_eps_{k}"] = v
        for k, v in rep.after.robust_accuracy.items():
            metrics[f"after_robust_accuracy_eps_{k}"] = v
        for k, v in (rep.after.certified_accuracy or {}).items():
            metrics[f"after_certified_accuracy_r_{k}"] = v
        run.log_metrics(metrics)
        run.set_tags({"bastion.method": method, "bastion.helps": rep.helps})
        for key in ("json", "html"):
            run.log_artifact(result.paths[key])
        run.log_artifact(result.paths["model"], artifact_path="model")
    return result, run.warnings


def _kv(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise BastionError(f"cannot read --opt {item!r}", hint="write it as KEY=VALUE")
        k, raw = item.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            out[k.strip().replace("-", "_")] = raw
    return out


def register(app: typer.Typer) -> None:
    """Add ``harden`` to the ``bastion`` app."""

    @app.command()
    def harden(
        model: str = typer.Option(..., "--model",
                                  help="Model folder, TorchScript, .skops or builtin:NAME."),
        data: str = typer.Option(..., "--data", help="Data spec, e.g. builtin:digits."),
        method: str = typer.Option(
            ..., "--method",
            help="pgd-at, fast-at, trades, distill, ensemble, squeeze or smooth."),
        out: Path = c.OutOpt,
        eps: float | None = typer.Option(
            None, "--eps", help="Training budget (default 0.1 of the input range)."),
        norm: str = typer.Option("linf", "--norm", help="linf or l2."),
        epochs: int = typer.Option(5, "--epochs", min=0, help="Training epochs."),
        eval_eps: str | None = typer.Option(
            None, "--eval-eps", help="Evaluation epsilons (default eps/2, eps, 1.5 eps)."),
        limit: int = typer.Option(200, "--limit", help="Evaluation points (first N test)."),
        attacks: str | None = typer.Option(
            None, "--attacks", help="Evaluation cascade (default apgd-ce,apgd-t,square)."),
        settings: list[str] | None = typer.Option(
            None, "--set", help="Attack option ATTACK.PARAM=VALUE (repeatable)."),
        lr: float | None = typer.Option(None, "--lr"),
        batch_size: int | None = typer.Option(None, "--batch-size"),
        steps: int | None = typer.Option(None, "--steps", help="PGD steps (pgd-at, trades)."),
        beta: float | None = typer.Option(None, "--beta", help="TRADES beta."),
        adv_fraction: float | None = typer.Option(
            None, "--adv-fraction", help="Weight of adversarial vs clean loss (0..1)."),
        eps_warmup: float | None = typer.Option(
            None, "--eps-warmup", help="Epochs to ramp epsilon up."),
        ema_decay: float | None = typer.Option(
            None, "--ema-decay",
            help="Weight averaging: keep and return an EMA of the weights (e.g. 0.999)."),
        fast_variant: str | None = typer.Option(
            None, "--fast-variant",
            help="fast-at inner step: rs (Wong et al.) or nfgsm (de Jorge et al.)."),
        noise_mult: float | None = typer.Option(
            None, "--noise-mult", help="fast-at random start radius, in multiples of eps."),
        init: str | None = typer.Option(None, "--init", help="finetune or scratch."),
        lr_schedule: str | None = typer.Option(None, "--lr-schedule",
                                               help="constant or cyclic."),
        weight_decay: float | None = typer.Option(None, "--weight-decay"),
        label_smoothing: float | None = typer.Option(None, "--label-smoothing"),
        no_guard: bool = typer.Option(False, "--no-guard",
                                      help="Disable the catastrophic-overfitting guard."),
        recovery: bool | None = typer.Option(
            None, "--recovery/--no-recovery",
            help="At catastrophic overfitting: restore the best epoch and go on with a "
            "safer step (default), or stop there."),
        max_recoveries: int | None = typer.Option(
            None, "--max-recoveries", help="Recoveries allowed before the guard stops."),
        seeds: int | None = typer.Option(
            None, "--seeds", help="Train N seeds; report each, the median and spread; keep "
            "the best on validation data (pgd-at, fast-at, trades)."),
        temperature: float | None = typer.Option(None, "--temperature",
                                                 help="Distillation temperature."),
        members: int | None = typer.Option(None, "--members", help="Ensemble size."),
        member_method: str | None = typer.Option(
            None, "--member-method", help="Ensemble members: clean, pgd-at, fast-at, trades."),
        bits: int | None = typer.Option(None, "--bits", help="Squeezing bit depth."),
        median: int | None = typer.Option(None, "--median", help="Squeezing median window."),
        sigma: float | None = typer.Option(None, "--sigma", help="Smoothing noise level."),
        n0: int | None = typer.Option(None, "--n0", help="Smoothing: selection samples."),
        n: int | None = typer.Option(None, "--n", help="Smoothing: estimation samples."),
        alpha: float | None = typer.Option(None, "--alpha", help="Smoothing: failure prob."),
        radii: str | None = typer.Option(None, "--radii",
                                         help="Smoothing: L2 radii to certify."),
        opt: list[str] | None = typer.Option(
            None, "--opt", help="Any other method option KEY=VALUE (repeatable)."),
        label_column: str = typer.Option("label", "--label-column"),
        seed: int = c.SeedOpt,
        tracking_uri: str | None = c.TrackingOpt,
        no_track: bool = c.NoTrackOpt,
        timeout: float | None = c.TimeoutOpt,
        quiet: bool = c.QuietOpt,
        debug: bool = c.DebugOpt,
    ) -> None:
        """Harden a model (adversarial training, distillation, ensembles, squeezing,
        randomized smoothing) and report robust accuracy before and after."""
        options = _kv(opt)
        named = {"lr": lr, "batch_size": batch_size, "steps": steps, "beta": beta,
                 "adv_fraction": adv_fraction, "eps_warmup": eps_warmup, "init": init,
                 "ema_decay": ema_decay,
                 "fast_variant": fast_variant, "noise_mult": noise_mult,
                 "lr_schedule": lr_schedule, "weight_decay": weight_decay,
                 "label_smoothing": label_smoothing, "temperature": temperature,
                 "members": members, "member_method": member_method, "bits": bits,
                 "median": median, "sigma": sigma, "n0": n0, "n": n, "alpha": alpha,
                 "max_recoveries": max_recoveries, "seeds": seeds,
                 "on_collapse": None if recovery is None else
                 ("recover" if recovery else "stop")}
        options.update({k: v for k, v in named.items() if v is not None})
        if no_guard:
            options["guard"] = False
        if radii is not None:
            options["radii"] = c.parse_floats(radii, what="--radii")
        epsilons = c.parse_floats(eval_eps, what="--eval-eps") if eval_eps else None
        progress = c.show_progress(quiet)
        bar: dict[str, Any] = {}

        def on_epoch(e: Any) -> None:
            if not progress:
                c.tick(f"harden: epoch {e.epoch}/{e.epochs}, clean {e.clean_accuracy:.3f}, "
                       f"robust {e.robust_accuracy:.3f}" + (" COLLAPSE" if e.collapsed else ""))
                return
            if "p" not in bar:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

                bar["p"] = Progress(TextColumn("{task.description}"), BarColumn(),
                                    TimeElapsedColumn(), console=c.err_console)
                bar["p"].start()
                bar["t"] = bar["p"].add_task("training", total=e.epochs)
            bar["p"].update(bar["t"], completed=e.epoch, total=e.epochs,
                            description=f"epoch {e.epoch}/{e.epochs}  clean "
                            f"{e.clean_accuracy:.3f}  robust {e.robust_accuracy:.3f}"
                            + ("  COLLAPSE" if e.collapsed else ""))

        from functools import partial

        from bastion.jobs import run_with_deadline

        try:
            job = partial(
                run_harden,
                model_spec=model, data_spec=data, out_dir=out, method=method, eps=eps,
                norm=norm, epochs=epochs, seed=seed, options=options, epsilons=epsilons,
                limit=limit, attacks=c.parse_list(attacks),
                attack_options=c.parse_settings(settings), label_column=label_column,
                tracking_uri=tracking_uri, track=not no_track, progress=progress,
                on_epoch=on_epoch)
            result, warnings = run_with_deadline(job, timeout=timeout, what="harden",
                                                 out_dir=out)
        finally:
            if "p" in bar:
                bar["p"].stop()
        for w in warnings:
            c.info(f"[yellow]warning:[/] {w}", quiet=quiet)
        rep = result.report
        if not quiet:
            def fmt(d: dict[str, float]) -> str:
                return ", ".join(f"{k}: {v:.3f}" for k, v in d.items())

            c.info(f"before: clean {rep.before.clean_accuracy:.3f}; robust "
                   f"{fmt(rep.before.robust_accuracy)}")
            c.info(f"after:  clean {rep.after.clean_accuracy:.3f}; robust "
                   f"{fmt(rep.after.robust_accuracy)}")
            if rep.after.certified_accuracy:
                c.info(f"certified (L2 radius): {fmt(rep.after.certified_accuracy)}")
            if rep.seeds:
                st = rep.seeds["stats"]
                for r in rep.seeds["runs"]:
                    c.info(f"seed {r['seed']}: validation robust {r['val_robust_accuracy']:.3f}"
                           f"; test clean {r['test']['clean_accuracy']:.3f}, robust "
                           f"{r['test']['robust_accuracy']:.3f}")
                for k in ("test_clean_accuracy", "test_robust_accuracy"):
                    v = st[k]
                    c.info(f"{k.replace('_', ' ')}: median {v['median']:.3f} (min "
                           f"{v['min']:.3f}, max {v['max']:.3f})")
                c.info(f"kept seed {rep.seeds['kept_seed']} (chosen on validation data)")
            from bastion.envinfo import environment_line

            c.info(f"machine: {environment_line(rep.environment)}")
            c.info(("[green]" if rep.helps else "[yellow]") + "verdict:[/] "
                   + rep.verdict.replace("[", "\\["))
            c.info(f"model: {result.paths['model']}; report: {result.paths['json']} "
                   f"and {result.paths['html']}")
