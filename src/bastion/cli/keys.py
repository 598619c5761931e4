"""``bastion keys create|list|revoke``: the service's API keys (hashed at rest in the
event store's database; a token is printed once, at creation).

Thin: parse, call :class:`bastion.web.keys.KeyStore`, render.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import typer

from bastion.cli import _common as c

EventsOpt = typer.Option("sqlite:///bastion-events.db", "--events",
                         help="Event store URL the service uses (sqlite:///PATH or "
                              "postgresql://...); the keys live beside the events.")


def _at(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def register(app: typer.Typer) -> None:
    """Add the ``keys`` group to ``app``."""
    keys = typer.Typer(help="API keys of the service: create (the key is shown once), list, "
                       "revoke.", no_args_is_help=True)

    @keys.command()
    def create(
        client: str = typer.Option(..., "--client", help="Client name the key speaks for."),
        role: str = typer.Option("client", "--role",
                                 help="client (predict, own feedback), reader (events "
                                      "without inputs, dashboard) or admin (everything)."),
        note: str | None = typer.Option(None, "--note", help="A note shown by keys list."),
        events: str = EventsOpt,
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        debug: bool = c.DebugOpt,
    ) -> None:
        """Create a key and print it (once: only its SHA-256 digest is stored)."""
        from bastion.web.keys import KeyStore

        with KeyStore(events) as ks:
            token, key = ks.create(client, role, note=note)
        if as_json:
            typer.echo(json.dumps({"key": token, **key.as_dict()}))
            return
        typer.echo(token)
        c.info(f"created key {key.prefix}... for {key.client} (role {key.role}); it is "
               "shown only now: store it in a secret manager")

    @keys.command("list")
    def list_(
        events: str = EventsOpt,
        all_: bool = typer.Option(False, "--all", help="Include revoked keys."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        debug: bool = c.DebugOpt,
    ) -> None:
        """List keys (prefix, client, role, created, revoked); never the keys."""
        from bastion.web.keys import KeyStore

        with KeyStore(events) as ks:
            ks_ = ks.list(include_revoked=all_)
        if as_json:
            typer.echo(json.dumps([k.as_dict() for k in ks_], indent=2))
            return
        if not ks_:
            typer.echo("no keys (create one with bastion keys create --client NAME)")
            return
        for k in ks_:
            state = "active" if k.active else f"revoked {_at(k.revoked_at)}"
            typer.echo(f"{k.prefix}...  {k.client}  {k.role}  created {_at(k.created_at)}  "
                       f"{state}" + (f"  {k.note}" if k.note else ""))

    @keys.command()
    def revoke(
        prefix: str | None = typer.Argument(None, help="The key's prefix (bst_...)."),
        client: str | None = typer.Option(None, "--client", help="Revoke every key of this "
                                          "client instead."),
        events: str = EventsOpt,
        debug: bool = c.DebugOpt,
    ) -> None:
        """Revoke a key (a running service refuses it within its key refresh interval)."""
        from bastion.web.keys import KeyStore

        with KeyStore(events) as ks:
            done = ks.revoke(prefix.rstrip(".") if prefix else None, client=client)
        for k in done:
            typer.echo(f"revoked {k.prefix}... ({k.client}, {k.role})")

    app.add_typer(keys, name="keys")
