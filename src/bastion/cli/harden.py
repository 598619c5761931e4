"""``bastion harden``: harden a model, evaluate it before and after, save both.

Thin: it parses the options into a :class:`bastion.jobs.HardenSpec`, calls the job
:func:`bastion.jobs.harden` (which resolves the model and data, hardens, writes the
report and records an MLflow run) and renders one summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from bastion.cli import _common as c
from bastion.errors import BastionError


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
            help="pgd-at, fast-at, trades, distill, ensemble, squeeze or smooth; text "
            "models: augment."),
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
            None, "--opt", help="Any other method option KEY=VALUE (repeatable). augment "
            "(text): swaps (random neighbour swaps of each training text per epoch, 2), "
            "char_share (of swapped words given a typo, 0.3), epochs (3), lr (2e-4), "
            "tune_layers (top encoder layers fine-tuned with the head, 1; 0 = head "
            "only), n_attack (training texts attacked per round, 0), rounds (1), "
            "max_queries (per attacked text, 100), consistency."),
        label_column: str = typer.Option("label", "--label-column"),
        seed: int = c.SeedOpt,
        engine: str = typer.Option("local", "--engine", help="local, or ray: adversarial "
                                   "training on Ray Train (data-parallel CPU workers)."),
        workers: int = typer.Option(2, "--workers", min=1, help="Ray Train workers."),
        ray_address: str | None = typer.Option(None, "--ray-address",
                                               help="auto, HOST:PORT or ray://HOST:PORT."),
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

        from bastion.jobs import HardenSpec
        from bastion.jobs import harden as harden_job

        spec = HardenSpec(
            model=model, data=data, out=out, method=method, eps=eps, norm=norm, epochs=epochs,
            seed=seed, options=options, epsilons=epsilons, limit=limit,
            attacks=c.parse_list(attacks), attack_options=c.parse_settings(settings),
            label_column=label_column, tracking_uri=tracking_uri, track=not no_track,
            timeout=timeout, workers=workers, **c.engine_fields(engine, ray_address))
        try:
            rep, paths, warnings = harden_job(spec, progress=progress, on_epoch=on_epoch)
        finally:
            if "p" in bar:
                bar["p"].stop()
        for w in warnings:
            c.info(f"[yellow]warning:[/] {w}", quiet=quiet)
        if not quiet:
            def fmt(d: dict[str, float]) -> str:
                return ", ".join(f"{k}: {v:.3f}" for k, v in d.items())

            c.info(f"before: clean {rep.before.clean_accuracy:.3f}; robust "
                   f"{fmt(rep.before.robust_accuracy)}")
            c.info(f"after:  clean {rep.after.clean_accuracy:.3f}; robust "
                   f"{fmt(rep.after.robust_accuracy)}")
            if rep.after.certified_accuracy:
                c.info(f"certified (L2 radius): {fmt(rep.after.certified_accuracy)}")
            if getattr(rep, "seeds", None):
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

            if getattr(rep, "environment", None):
                c.info(f"machine: {environment_line(rep.environment)}")
            c.info(("[green]" if rep.helps else "[yellow]") + "verdict:[/] "
                   + rep.verdict.replace("[", "\\["))
            c.info(f"model: {paths['model']}; report: {paths['json']} and {paths['html']}")
