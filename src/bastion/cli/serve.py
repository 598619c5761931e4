"""``bastion serve`` (the guarded, self-healing model service) and ``bastion demo`` (the
whole loop on built-in data).

Thin: parse, build a :class:`~bastion.service.config.ServiceConfig` and call
:func:`bastion.service.app.create_app` / :func:`bastion.demo.run_demo`, render.
"""

from __future__ import annotations

from pathlib import Path

import typer

from bastion.cli import _common as c
from bastion.cli import _limits as lim
from bastion.errors import BastionError


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``demo`` to ``app``."""

    @app.command()
    def serve(
        model: str | None = typer.Option(
            None, "--model", help="Model folder (a text-intent one too), hf:FOLDER (a Hugging "
            "Face text classifier), builtin:NAME, or registry:NAME (its champion)."),
        reference: str | None = typer.Option(
            None, "--reference", help="Trusted data spec (train: reference, test: holdout)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port."),
        config: Path | None = typer.Option(None, "--config",
                                           help="Service config (YAML or JSON)."),
        events: str | None = typer.Option(None, "--events",
                                          help="Event store URL (sqlite:///PATH)."),
        model_name: str | None = typer.Option(
            None, "--name", help="Registered model name (default: the model folder's name, "
            "or its parent's for a folder called model: out/hardened/model -> hardened)."),
        heal_interval: float | None = typer.Option(
            None, "--heal-interval", min=0.0,
            help="Run a healing step every this many seconds (0: off)."),
        no_guard: bool = typer.Option(False, "--no-guard", help="Serve without detectors."),
        open_: bool = typer.Option(False, "--open", help="No API keys needed (local demos "
                                   "only: anyone reaching the port is admin)."),
        ssl_certfile: str | None = typer.Option(None, "--ssl-certfile",
                                                help="Serve HTTPS with this PEM certificate."),
        ssl_keyfile: str | None = typer.Option(None, "--ssl-keyfile",
                                               help="The certificate's PEM private key."),
        header_timeout: float | None = lim.HeaderTimeoutOpt,
        body_timeout: float | None = lim.BodyTimeoutOpt,
        keepalive_timeout: float | None = lim.KeepaliveTimeoutOpt,
        max_connections: int | None = lim.MaxConnectionsOpt,
        max_inflight: int | None = lim.MaxInflightOpt,
        rate_limit: float | None = lim.RateLimitOpt,
        rate_burst: int | None = lim.RateBurstOpt,
        rate_delay: float | None = lim.RateDelayOpt,
        deadline: float | None = lim.DeadlineOpt,
        max_queue: int | None = typer.Option(
            None, "--max-queue", help="Inputs waiting for the guard at most (503 over it)."),
        engine: str = typer.Option("local", "--engine", help="local: one process; ray: "
                                   "a Ray Serve deployment (needs a PostgreSQL --events)."),
        replicas: int | None = typer.Option(None, "--replicas", min=1,
                                            help="Replicas with --engine ray (default 2)."),
        ray_address: str | None = typer.Option(
            None, "--ray-address", help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT "
            "(default $BASTION_RAY_ADDRESS, else auto)."),
        tracking_uri: str | None = c.TrackingOpt,
        seed: int = c.SeedOpt,
        quiet: bool = c.QuietOpt,
        debug: bool = c.DebugOpt,
    ) -> None:
        """Serve a guarded model over HTTP (predict, feedback, models, events, metrics,
        dashboard). The admin token comes from $BASTION_ADMIN_TOKEN or the config file."""
        try:
            from bastion.service.app import create_app
            from bastion.service.config import ServiceConfig
            from bastion.service.server import serve as run_server
        except ImportError as exc:
            raise BastionError(f"missing dependency {exc.name}",
                               hint="pip install fastapi uvicorn prometheus-client") from exc
        from bastion.web.limits import HttpLimits

        flags = lim.limit_fields(
            header_timeout=header_timeout, body_timeout=body_timeout,
            keepalive_timeout=keepalive_timeout, max_connections=max_connections,
            max_inflight=max_inflight, rate_limit=rate_limit, rate_burst=rate_burst,
            rate_delay=rate_delay,
            deadline=deadline)
        HttpLimits.build(**flags)  # a bad option is one line before any loading
        if max_queue is not None and max_queue < 1:
            raise BastionError(f"--max-queue {max_queue} is not allowed",
                               hint="a whole number of inputs, at least 1 (default 1024)")
        over = {"model": model, "reference": reference, "events_url": events,
                "model_name": model_name, "tracking_uri": tracking_uri,
                "heal_interval_s": heal_interval, "guard": False if no_guard else None,
                "seed": seed if seed != 0 else None, "auth": "open" if open_ else None,
                "max_queue_rows": max_queue}
        if config is not None:
            cfg = ServiceConfig.from_file(config, **over)
        else:
            if not model or not reference:
                raise BastionError("serve needs --model and --reference (or --config FILE)",
                                   hint="e.g. bastion serve --model builtin:digits-cnn "
                                   "--reference builtin:digits")
            cfg = ServiceConfig.build(**{k: v for k, v in over.items() if v is not None})
        if flags:
            cfg = cfg.model_copy(update={"limits": cfg.limits.with_overrides(**flags)})
        from bastion.engine.base import ENGINES, EngineError

        if engine not in ENGINES:  # a configuration mistake: exit 2, like other commands
            raise EngineError(f"unknown engine {engine!r}",
                              hint=f"use one of: {', '.join(ENGINES)}")
        if engine == "ray":
            _serve_on_ray(cfg, replicas=replicas or 2, address=ray_address, host=host,
                          port=port, tls=bool(ssl_certfile or ssl_keyfile), quiet=quiet)
            return
        if replicas is not None or ray_address is not None:
            raise BastionError("--replicas and --ray-address need --engine ray")
        c.info(f"loading {cfg.model} and calibrating the guard on {cfg.reference} ...",
               quiet=quiet)
        app_ = create_app(cfg)
        svc = app_.state.service
        c.info(f"registered model name: {svc.model_name} (use it as --model in bastion heal "
               f"and bastion models; --name sets another)", quiet=quiet)
        for name, why in svc.skipped_detectors.items():
            c.info(f"detector {name} skipped: {why}", quiet=quiet)
        auth = app_.state.auth
        scheme = "https" if ssl_certfile else "http"
        c.info(f"serving {svc.model_name} v{svc.champion_version} on {scheme}://{host}:{port} "
               f"(dashboard: /dashboard; {auth.key_count()} API keys"
               f"{', admin token set' if auth.admin_token_set else ''})", quiet=quiet)
        if auth.open_mode:
            c.info("[bold red]WARNING: OPEN MODE[/]: no API key is needed; anyone who can "
                   "reach this port can read every client's inputs and act as admin")
        run_server(app_, host=host, port=port, log_level="warning" if quiet else "info",
                   ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)

    def _serve_on_ray(cfg: object, *, replicas: int, address: str | None, host: str,
                      port: int, tls: bool, quiet: bool) -> None:
        from rich.markup import escape

        from bastion.service.ray_serve import check_ray_config, serve_on_ray

        try:
            check_ray_config(cfg)  # type: ignore[arg-type]
        except BastionError as exc:  # a bad combination of options: exit 2, one line
            c.err_console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(2) from None
        if tls:
            raise BastionError("--ssl-certfile/--ssl-keyfile do not apply with --engine ray",
                               hint="terminate TLS in front of Ray Serve's proxy")
        c.info(f"deploying {replicas} replicas on Ray ...", quiet=quiet)
        svc = serve_on_ray(cfg, replicas=replicas, address=address,  # type: ignore[arg-type]
                           host=host, port=port)
        c.info(f"serving {svc.model_name} on {svc.url} with {svc.replicas} Ray Serve "
               f"replicas{' (healing once per cluster)' if svc.heal else ''}; Ctrl-C stops",
               quiet=quiet)
        svc.wait()

    @app.command()
    def demo(
        out: Path = typer.Option(Path("bastion-demo"), "--out", help="Output folder."),
        seed: int = c.SeedOpt,
        fast: bool = typer.Option(False, "--fast",
                                  help="Smaller traffic and training (a quick check)."),
        tracking_uri: str | None = c.TrackingOpt,
        timeout: float | None = c.TimeoutOpt,
        quiet: bool = c.QuietOpt,
        debug: bool = c.DebugOpt,
    ) -> None:
        """Run the whole loop on built-in digits: train, scan, harden, serve, attack,
        detect, heal, report."""
        import sys
        from functools import partial

        from bastion.demo import run_demo
        from bastion.jobs import run_with_deadline

        # a progress bar in a terminal; one line per step when stderr is not a TTY
        job = partial(run_demo, out, seed=seed, fast=fast, tracking_uri=tracking_uri,
                      progress=c.show_progress(quiet), quiet=quiet or sys.stderr.isatty())
        res = run_with_deadline(job, timeout=timeout, what="demo", out_dir=out)
        if not quiet:
            c.info(f"report: {res.html_path} and {res.json_path}")
            for line in res.headline():
                c.info(f"  {line}")
