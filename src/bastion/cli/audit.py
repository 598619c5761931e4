"""``bastion audit``: data integrity and model privacy audits.

Thin: each command parses its options into a spec and calls its job in
:mod:`bastion.jobs` (``audit_data`` ...), which loads the model and data, runs the audit,
writes ``DIR/report.json`` and ``DIR/report.html`` and records an MLflow run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from bastion.cli import _common as c


def _run(kind: str, *, quiet: bool, no_track: bool = False, **fields: Any) -> Any:
    from bastion import jobs

    kinds: dict[str, tuple[Any, Any]] = {
        "data": (jobs.AuditDataSpec, jobs.audit_data),
        "backdoor": (jobs.AuditBackdoorSpec, jobs.audit_backdoor),
        "extraction": (jobs.AuditExtractionSpec, jobs.audit_extraction),
        "privacy": (jobs.AuditPrivacySpec, jobs.audit_privacy),
    }
    spec_cls, job = kinds[kind]
    if "engine" in fields or "ray_address" in fields:
        fields.update(c.engine_fields(fields.pop("engine", None), fields.pop("ray_address", None)))
    spec = spec_cls(track=not no_track, **fields)
    report, paths, warnings = job(
        spec, progress=(lambda m: c.info(f"[dim]{m}[/]")) if c.show_progress(quiet) else (
            lambda m: c.stage(f"audit {kind}: {m}")))
    for w in warnings:
        c.info(f"[yellow]warning:[/] {w}", quiet=quiet)
    for k, v in getattr(report, "skipped", {}).items():
        c.info(f"[yellow]skipped {k}:[/] {v}", quiet=quiet)
    return report, paths


def register(app: typer.Typer) -> None:
    """Add the ``audit`` command group to the ``bastion`` app."""
    audit = typer.Typer(help="Audit data integrity and model privacy: poisoning, backdoors, "
                        "extraction, membership inference.", no_args_is_help=True)

    @audit.command("data")
    def data_cmd(
        data: str = typer.Option(..., "--data", help="Data spec, e.g. builtin:digits, "
                                 "mnist:PATH, csv:PATH."),
        model: str | None = typer.Option(
            None, "--model", help="Model trained on the data (white-box enables spectral "
            "signatures and activation clustering)."),
        out: Path = c.OutOpt,
        detectors: str | None = typer.Option(
            None, "--detectors", help="Comma list of spectral, activation-clustering, "
            "confident-learning, knn, strip (default: all that fit the model)."),
        use: str = typer.Option(
            "auto", "--use", help="Which detector decides: a detector name, or auto/combined "
            "(any detector whose rule is quiet on clean data flags a sample; with --budget "
            "auto ranks by strip with a model, else confident-learning)."),
        budget: float | None = typer.Option(
            None, "--budget", help="Remove this share of the samples, the most suspicious "
            "first, instead of only those the detectors flag."),
        threshold: float | None = typer.Option(None, "--threshold",
                                               help="Score threshold instead of a budget."),
        mode: str = typer.Option("remove", "--mode", help="remove or relabel."),
        label_column: str = typer.Option("label", "--label-column"),
        id_column: str | None = typer.Option(
            None, "--id-column", help="CSV/Parquet column of row ids (not a feature; "
            "reported with each flagged row)."),
        seed: int = c.SeedOpt,
        tracking_uri: str | None = c.TrackingOpt,
        no_track: bool = c.NoTrackOpt,
        timeout: float | None = c.TimeoutOpt,
        engine: str | None = c.EngineOpt,
        ray_address: str | None = c.RayAddressOpt,
        quiet: bool = c.QuietOpt,
        debug: bool = c.DebugOpt,
    ) -> None:
        """Score every sample for poisoning / label noise (every row of a CSV or Parquet
        file), say whether that is more than clean data gives, write cleaned data. With
        --engine: the streamed audit of parquet:FILE|FOLDER (spectral signatures and kNN
        over Parquet shards; a report, no cleaned copy)."""
        report, paths = _run("data", data=data, model=model, out=out, seed=seed,
                             timeout=timeout, engine=engine, ray_address=ray_address,
                             tracking_uri=tracking_uri, no_track=no_track, quiet=quiet,
                             label_column=label_column, detectors=c.parse_list(detectors),
                             use=use, budget=budget, threshold=threshold, mode=mode,
                             id_column=id_column)
        verb = "removed" if mode == "remove" else "relabelled"
        what = "rows" if report.whole_file else "training samples"
        c.info(report.verdict, quiet=quiet)
        if report.mode != "report":  # the streamed audit only reports
            c.info(f"{report.n_removed + report.n_relabelled} of {report.n_train} {what} "
                   f"{verb}; cleaned data {report.cleaned_table or report.cleaned_path}",
                   quiet=quiet)
        c.info(f"report: {paths['json']} and {paths['html']}", quiet=quiet)

    @audit.command("backdoor")
    def backdoor_cmd(
        model: str = typer.Option(..., "--model", help="Model folder, .skops or builtin:NAME."),
        data: str = typer.Option(..., "--data", help="Data spec (clean inputs)."),
        out: Path = c.OutOpt,
        checks: str | None = typer.Option(
            None, "--checks", help="strip,neural-cleanse (default: all the model allows)."),
        fpr: float = typer.Option(0.01, "--fpr", help="STRIP false-positive rate."),
        overlays: int = typer.Option(20, "--overlays", help="STRIP overlays per input."),
        nc_steps: int = typer.Option(200, "--nc-steps", help="Neural Cleanse steps per class."),
        limit: int = typer.Option(500, "--limit", help="Test inputs used."),
        label_column: str = typer.Option("label", "--label-column"),
        seed: int = c.SeedOpt,
        tracking_uri: str | None = c.TrackingOpt,
        no_track: bool = c.NoTrackOpt,
        timeout: float | None = c.TimeoutOpt,
        quiet: bool = c.QuietOpt,
        debug: bool = c.DebugOpt,
    ) -> None:
        """STRIP and a Neural-Cleanse scan for a backdoor in the model."""
        report, paths = _run("backdoor", data=data, model=model, out=out, seed=seed,
                             timeout=timeout,
                             tracking_uri=tracking_uri, no_track=no_track, quiet=quiet,
                             label_column=label_column, checks=c.parse_list(checks), fpr=fpr,
                             overlays=overlays, nc_steps=nc_steps, limit=limit)
        c.info(report.verdict, quiet=quiet)
        c.info(f"report: {paths['json']} and {paths['html']}", quiet=quiet)

    @audit.command("extraction")
    def extraction_cmd(
        model: str = typer.Option(..., "--model", help="Model folder, .skops or builtin:NAME."),
        data: str = typer.Option(..., "--data", help="Data spec."),
        budget: int = typer.Option(..., "--budget", help="Attacker's query budget (> 0)."),
        out: Path = c.OutOpt,
        epochs: int = typer.Option(20, "--epochs", help="Surrogate training epochs."),
        delta: float | None = typer.Option(
            None, "--prada-delta", help="PRADA alarm threshold on Shapiro-Wilk W "
            "(default: calibrated on benign streams of training inputs)."),
        label_column: str = typer.Option("label", "--label-column"),
        seed: int = c.SeedOpt,
        tracking_uri: str | None = c.TrackingOpt,
        no_track: bool = c.NoTrackOpt,
        timeout: float | None = c.TimeoutOpt,
        quiet: bool = c.QuietOpt,
        debug: bool = c.DebugOpt,
    ) -> None:
        """How much of the model a query budget steals, and what the defenses change."""
        report, paths = _run("extraction", data=data, model=model, out=out, seed=seed,
                             timeout=timeout,
                             tracking_uri=tracking_uri, no_track=no_track, quiet=quiet,
                             label_column=label_column, budget=budget, epochs=epochs,
                             prada_delta=delta)
        if report.equation_solving:
            c.info(f"equation solving: fidelity {report.equation_solving['fidelity']:.4f} with "
                   f"{report.equation_solving['queries']} queries", quiet=quiet)
        last = report.surrogate_curve[-1]
        c.info(f"surrogate: fidelity {last.fidelity:.4f} with {last.queries} queries",
               quiet=quiet)
        c.info(f"report: {paths['json']} and {paths['html']}", quiet=quiet)

    @audit.command("privacy")
    def privacy_cmd(
        model: str = typer.Option(..., "--model", help="Model folder, .skops or builtin:NAME."),
        data: str = typer.Option(..., "--data",
                                 help="The data the model was trained on (train = members)."),
        out: Path = c.OutOpt,
        targets: int = typer.Option(500, "--targets", help="Members and non-members each."),
        shadows: int = typer.Option(4, "--shadows", help="Shadow models."),
        shadow_epochs: int = typer.Option(20, "--shadow-epochs"),
        attacks: str | None = typer.Option(
            None, "--attacks", help="loss-threshold,shadow-models,lira-offline,inversion."),
        label_column: str = typer.Option("label", "--label-column"),
        seed: int = c.SeedOpt,
        tracking_uri: str | None = c.TrackingOpt,
        no_track: bool = c.NoTrackOpt,
        timeout: float | None = c.TimeoutOpt,
        engine: str | None = c.EngineOpt,
        ray_address: str | None = c.RayAddressOpt,
        quiet: bool = c.QuietOpt,
        debug: bool = c.DebugOpt,
    ) -> None:
        """Membership inference and model inversion (--engine: shadow models trained in
        parallel there)."""
        report, paths = _run("privacy", data=data, model=model, out=out, seed=seed,
                             timeout=timeout, engine=engine, ray_address=ray_address,
                             tracking_uri=tracking_uri, no_track=no_track, quiet=quiet,
                             label_column=label_column, targets=targets, shadows=shadows,
                             shadow_epochs=shadow_epochs, attacks=c.parse_list(attacks))
        for a in report.attacks:
            c.info(f"{a.attack}: AUC {a.auc:.3f}, TPR@0.1%FPR {a.tpr_at_0_1pct_fpr:.3f}, "
                   f"TPR@1%FPR {a.tpr_at_1pct_fpr:.3f}", quiet=quiet)
        c.info(f"report: {paths['json']} and {paths['html']}", quiet=quiet)

    @audit.command("poison")
    def poison_cmd(
        data: str = typer.Option(..., "--data", help="Data spec to poison (its train part)."),
        attack: str = typer.Option(..., "--attack",
                                   help="label-flip, badnets or feature-trigger."),
        rate: float = typer.Option(..., "--rate", help="Poison rate, strictly in (0, 1)."),
        out: Path = c.OutOpt,
        target: int | None = typer.Option(None, "--target", help="Target class."),
        source: int | None = typer.Option(None, "--source", help="Source class (optional)."),
        patch_size: int = typer.Option(3, "--patch-size", help="BadNets patch side."),
        label_column: str = typer.Option("label", "--label-column"),
        seed: int = c.SeedOpt,
        quiet: bool = c.QuietOpt,
        debug: bool = c.DebugOpt,
    ) -> None:
        """Red-team the data: write a poisoned copy (poisoned.npz with poison_mask)."""
        from bastion.jobs import AuditPoisonSpec, audit_poison

        pr, paths, _ = audit_poison(AuditPoisonSpec(
            data=data, attack=attack, rate=rate, out=out, target=target, source=source,
            patch_size=patch_size, label_column=label_column, seed=seed))
        c.info(f"{pr.n_poison} of {len(pr.y)} training samples poisoned ({pr.attack}); "
               f"wrote {paths['data']} and {paths['json']}", quiet=quiet)

    app.add_typer(audit, name="audit")
