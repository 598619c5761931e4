"""``bastion heal``, ``bastion models`` and ``bastion factsheet``: the healing controller
and the registry.

Thin: parse, call the job :func:`bastion.jobs.heal` / :mod:`bastion.registry.models`,
render. Errors are :class:`~bastion.errors.BastionError` s (one line, exit 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from bastion.cli import _common as c
from bastion.errors import BastionError

EventsOpt = typer.Option("sqlite:///bastion-events.db", "--events",
                         help="Event store URL (sqlite:///PATH).")
NameOpt = typer.Option(..., "--model", help="Registered model name.")
ActorOpt = typer.Option("cli", "--actor", help="Who is acting (recorded in the history).")


def register(app: typer.Typer) -> None:
    """Add ``heal`` and the ``models`` group to ``app``."""
    models = typer.Typer(help="Model versions and aliases (champion, previous, fallback).",
                         no_args_is_help=True)

    @app.command()
    def heal(
        model: str = NameOpt,
        reference: str = typer.Option(..., "--reference",
                                      help="Trusted data spec (train: reference, test: holdout)."),
        once: bool = typer.Option(False, "--once", help="Run one controller step and exit."),
        events: str = EventsOpt,
        policy: Path | None = typer.Option(None, "--policy", help="Healing policy YAML/JSON."),
        interval: float = typer.Option(30.0, "--interval", min=0.1,
                                       help="Seconds between steps without --once."),
        tracking_uri: str | None = c.TrackingOpt,
        seed: int = c.SeedOpt,
        as_json: bool = typer.Option(False, "--json", help="Print the step report as JSON."),
        quiet: bool = c.QuietOpt,
        debug: bool = c.DebugOpt,
    ) -> None:
        """Run the healing controller over the event store."""
        from bastion.jobs import HealSpec
        from bastion.jobs import heal as heal_job

        def show(rep: Any) -> None:
            if as_json:
                typer.echo(rep.model_dump_json())
            elif not quiet:
                c.info(f"step {rep.step_id}: events {rep.from_id}..{rep.upto_id}, "
                       f"champion v{rep.champion}, {len(rep.fired)} signals fired")
                for s in rep.fired:
                    c.info(f"  signal {s.monitor}: {s.message}")
                for a in rep.actions:
                    c.info(f"  {'done' if a.done else 'not done'} {a.action}: {a.detail}")

        heal_job(HealSpec(model=model, reference=reference, once=once, events=events,
                          policy=policy, interval=interval, tracking_uri=tracking_uri,
                          seed=seed), on_step=show)

    @models.command("list")
    def list_(
        model: str = NameOpt,
        events: str | None = typer.Option(None, "--events",
                                          help="Event store holding the alias history."),
        tracking_uri: str | None = c.TrackingOpt,
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        debug: bool = c.DebugOpt,
    ) -> None:
        """List versions, aliases and the alias history."""
        reg = _registry(model, events, tracking_uri)
        vs = reg.versions()
        hist = reg.alias_history()
        if as_json:
            typer.echo(json.dumps({"model": model, "aliases": reg.aliases(),
                                   "versions": [v.as_dict() for v in vs],
                                   "history": [h.as_dict() for h in hist]}, indent=2))
            return
        if not vs:
            typer.echo(f"model {model!r} has no versions")
            return
        for v in vs:
            typer.echo(f"v{v.version}  {', '.join(v.aliases) or '-'}")
        for h in hist:
            frm = "-" if h.from_version is None else f"v{h.from_version}"
            typer.echo(f"{h.at}  {h.alias}: {frm} -> v{h.version}  by {h.actor}: {h.reason}")

    @models.command()
    def promote(
        model: str = NameOpt,
        version: int = typer.Option(..., "--version", help="Version to make champion."),
        reason: str = typer.Option(..., "--reason", help="Why (recorded)."),
        actor: str = ActorOpt,
        events: str | None = typer.Option(None, "--events"),
        tracking_uri: str | None = c.TrackingOpt,
        debug: bool = c.DebugOpt,
    ) -> None:
        """Make a version the champion (the old one becomes previous)."""
        reg = _registry(model, events, tracking_uri)
        v = reg.promote(version, reason=reason, actor=actor)
        typer.echo(f"{model}: champion is v{v}")

    @models.command()
    def rollback(
        model: str = NameOpt,
        version: int | None = typer.Option(None, "--version",
                                           help="Version to roll back to (default: previous)."),
        reason: str = typer.Option(..., "--reason", help="Why (recorded)."),
        actor: str = ActorOpt,
        events: str | None = typer.Option(None, "--events"),
        tracking_uri: str | None = c.TrackingOpt,
        debug: bool = c.DebugOpt,
    ) -> None:
        """Roll the champion back to previous (or to any version)."""
        reg = _registry(model, events, tracking_uri)
        v = reg.rollback(version, reason=reason, actor=actor)
        typer.echo(f"{model}: champion is v{v}")

    app.add_typer(models, name="models")

    @app.command("alert-rules")
    def alert_rules(debug: bool = c.DebugOpt) -> None:
        """Print Bastion's Prometheus alerting rules (bastion alert-rules > bastion.yml)."""
        from importlib import resources

        typer.echo(resources.files("bastion.service").joinpath(
            "alerts/bastion-rules.yml").read_text(encoding="utf-8"), nl=False)

    @app.command()
    def factsheet(
        model: str = typer.Option(..., "--model", help="NAME (its champion) or NAME@VERSION "
                                  "(a number or an alias)."),
        out: Path = c.OutOpt,
        events: str | None = typer.Option(None, "--events", help="The service's event store "
                                          "(calibration, gates, healing history)."),
        tracking_uri: str | None = c.TrackingOpt,
        no_attach: bool = typer.Option(False, "--no-attach", help="Do not log it to the "
                                       "version's MLflow run."),
        debug: bool = c.DebugOpt,
    ) -> None:
        """A model version's factsheet (JSON + HTML) from the registry and the event store."""
        from bastion.runtime.factsheet import make_factsheet

        doc, paths, run_id = make_factsheet(model, out, events_url=events,
                                            tracking_uri=tracking_uri, attach=not no_attach)
        m = doc["model"]
        typer.echo(f"{m['name']} v{m['version']}: {paths['json']} and {paths['html']}"
                   + (f" (attached to MLflow run {run_id})" if run_id else ""))
        for lim in doc["known_limits"]:
            typer.echo(f"  limit: {lim}")


def _registry(model: str, events: str | None, tracking_uri: str | None):  # type: ignore[no-untyped-def]
    from bastion.registry.models import ModelRegistry
    from bastion.store.events import EventStore

    if not model.strip():
        raise BastionError("--model is empty")
    store = EventStore(events) if events else None
    return ModelRegistry(model, tracking_uri=tracking_uri, store=store)
