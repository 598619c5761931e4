"""``bastion quarantine list|lift``: quarantined clients in the event store.

Thin: parse, call :mod:`bastion.runtime.quarantine`, render.
"""

from __future__ import annotations

import typer

from bastion.cli import _common as c

EventsOpt = typer.Option("sqlite:///bastion-events.db", "--events",
                         help="Event store URL (sqlite:///PATH or postgresql://...).")


def register(app: typer.Typer) -> None:
    """Add the ``quarantine`` group to ``app``."""
    q = typer.Typer(help="Quarantined clients: list them, lift a quarantine (audited).",
                    no_args_is_help=True)

    @q.command("list")
    def list_(events: str = EventsOpt, debug: bool = c.DebugOpt) -> None:
        """List the quarantined clients."""
        from bastion.runtime.quarantine import quarantined_clients
        from bastion.store.events import EventStore

        with EventStore(events) as store:
            names = quarantined_clients(store)
        for n in names:
            typer.echo(n)
        if not names:
            c.info("no client is quarantined")

    @q.command()
    def lift(
        client: str = typer.Argument(..., help="The client to let back in."),
        reason: str = typer.Option("lifted from the command line", "--reason",
                                   help="Why (recorded in the audit event)."),
        actor: str = typer.Option("cli", "--actor", help="Who is acting (recorded)."),
        events: str = EventsOpt,
        debug: bool = c.DebugOpt,
    ) -> None:
        """Lift a client's quarantine (a running service sees it within a second)."""
        from bastion.runtime.quarantine import lift_quarantine
        from bastion.store.events import EventStore

        with EventStore(events) as store:
            lift_quarantine(store, client, actor=actor, reason=reason)
        typer.echo(f"quarantine of {client} lifted")

    app.add_typer(q, name="quarantine")
