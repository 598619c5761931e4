"""The ``bastion`` command line.

Commands are thin: they parse options, call one library function and render the result.
Every command takes ``--seed``; long work shows progress only in a terminal.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import typer
from rich.markup import escape

from bastion import __version__
from bastion.cli import _common as c
from bastion.errors import BastionError

app = typer.Typer(
    name="bastion",
    help="Red-team, harden, guard and self-heal the ML models behind AI agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bastion {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Bastion: attacks, defenses, detectors and self-healing for ML models."""


@app.command()
def train(
    model: str = typer.Option(
        "cnn", "--model", help="Architecture: cnn, wong-cnn, mlp, logreg, text-intent (text)."),
    data: str = typer.Option(..., "--data", help="Data spec, e.g. builtin:digits or mnist:PATH."),
    out: Path = c.OutOpt,
    epochs: int | None = typer.Option(
        None, "--epochs", min=1, help="Default 10 (text-intent: 60 over frozen features)."),
    lr: float | None = typer.Option(None, "--lr", help="Default 1e-3 (text-intent: 1e-2)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    label_column: str = typer.Option("label", "--label-column"),
    seed: int = c.SeedOpt,
    tracking_uri: str | None = c.TrackingOpt,
    no_track: bool = c.NoTrackOpt,
    timeout: float | None = c.TimeoutOpt,
    quiet: bool = c.QuietOpt,
    debug: bool = c.DebugOpt,
) -> None:
    """Train a model from the zoo and save it as a Bastion model folder."""
    from bastion.jobs import TrainSpec
    from bastion.jobs import train as train_job

    spec = TrainSpec(model=model, data=data, out=out, epochs=epochs, lr=lr,
                     batch_size=batch_size, label_column=label_column, seed=seed,
                     tracking_uri=tracking_uri, track=not no_track, timeout=timeout)
    metrics, _, warnings = train_job(spec, progress=c.show_progress(quiet))
    for w in warnings:
        c.info(f"[yellow]warning:[/] {w}", quiet=quiet)
    acc = metrics.get("test_accuracy")
    c.info(
        f"saved {model} to {out}" + (f" (test accuracy {acc:.4f})" if acc is not None else ""),
        quiet=quiet,
    )


@app.command()
def scan(
    model: str = typer.Option(
        ...,
        "--model",
        help="Model folder, TorchScript, .skops, onnx:FILE, hf:FOLDER, python:FILE.py:FUNCTION "
        "or builtin:NAME.",
    ),
    data: str = typer.Option(
        ..., "--data", help="Data spec, e.g. builtin:digits, mnist:PATH, csv:PATH, parquet:PATH."
    ),
    out: Path = c.OutOpt,
    norm: str = typer.Option("linf", "--norm", help="linf or l2."),
    eps: str = typer.Option("0.05,0.1,0.2", "--eps", help="Comma-separated epsilons."),
    attacks: str | None = typer.Option(
        None,
        "--attacks",
        help="Comma-separated attacks run as a cascade instead of the preset's "
        "(black-box models default to square,hsj).",
    ),
    preset: str = typer.Option(
        "standard",
        "--preset",
        help="quick: APGD-CE, APGD-T (1 target), Square-500, reported as a lower bound; "
        "standard (default): AutoAttack's APGD-CE, APGD-T, FAB-T, Square-5000 (at least "
        "torchattacks' AutoAttack budget on every stage), measured order, "
        "escalation when gradients lie; thorough: standard plus restarts, EOT for "
        "randomised models and a larger escalation budget.",
    ),
    limit: int | None = typer.Option(None, "--limit", help="Use the first N test points."),
    weights: str | None = typer.Option(None, "--weights", help="State dict for python:FILE:FN."),
    label_column: str = typer.Option("label", "--label-column"),
    settings: list[str] | None = typer.Option(
        None, "--set", help="Attack option ATTACK.PARAM=VALUE (repeatable), e.g. apgd-ce.steps=50."
    ),
    as_json: bool = typer.Option(False, "--json", help="Also print the report JSON to stdout."),
    seed: int = c.SeedOpt,
    tracking_uri: str | None = c.TrackingOpt,
    no_track: bool = c.NoTrackOpt,
    timeout: float | None = c.TimeoutOpt,
    engine: str | None = c.EngineOpt,
    ray_address: str | None = c.RayAddressOpt,
    quiet: bool = c.QuietOpt,
    debug: bool = c.DebugOpt,
) -> None:
    """Worst-case robustness scan (--preset quick|standard|thorough): report.json and .html."""
    from bastion.jobs import ScanSpec
    from bastion.jobs import scan as scan_job

    spec = ScanSpec(
        model=model, data=data, out=out, norm=norm, epsilons=tuple(c.parse_floats(eps)),
        attacks=c.parse_list(attacks), limit=limit, weights=weights,
        label_column=label_column, attack_options=c.parse_settings(settings), seed=seed,
        tracking_uri=tracking_uri, track=not no_track, timeout=timeout, preset=preset,
        **c.engine_fields(engine, ray_address))
    report, paths, warnings = scan_job(spec, progress=c.show_progress(quiet))
    for w in warnings:
        c.info(f"[yellow]warning:[/] {w}", quiet=quiet)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    if not quiet and getattr(report, "kind", None) == "text":
        c.info(f"clean accuracy {report.clean_accuracy:.3f}; robust accuracy after the text "
               f"cascade ({', '.join(report.attacks)}) {report.robust_accuracy['cascade']:.3f} "
               f"on {report.n_points} texts")
        for a in report.per_attack:
            c.info(f"  {a['attack']}: success {a['success_rate']:.1%}, "
                   f"{a['queries_mean']:.0f} queries a text")
        for w in report.warnings:
            c.info(f"[yellow]check:[/] {w}")
        c.info(f"report: {paths['json']} and {paths['html']}")
    elif not quiet:
        ra = ", ".join(
            f"eps={k}: {v:.3f} (95% {report.robust_interval[k][0]:.3f}-"
            f"{report.robust_interval[k][1]:.3f})" if k in report.robust_interval
            else f"eps={k}: {v:.3f}" for k, v in report.robust_accuracy.items())
        if report.lower_bound:
            ra += f" [preset {report.preset}: a lower bound on attack strength]"
        c.info(f"clean accuracy {report.clean_accuracy:.3f}; robust accuracy {ra}")
        for w in report.warnings:
            c.info(f"[yellow]check:[/] {w}")
        c.info(f"report: {paths['json']} and {paths['html']}")


def _register_optional() -> None:
    """Add the command groups that live in their own modules."""
    import importlib

    for mod in (
        "bastion.cli.harden",
        "bastion.cli.audit",
        "bastion.cli.runtime",
        "bastion.cli.serve",
        "bastion.cli.llm",
        "bastion.cli.keys",
        "bastion.cli.quarantine",
    ):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:  # that command group is not part of this build
                continue
            raise
        module.register(app)


_register_optional()


def _click_classes() -> tuple[tuple[type[BaseException], ...], ...]:
    """Typer may raise click's exceptions or those of its own vendored copy of click."""
    usage: list[type[BaseException]] = [click.ClickException]
    exits: list[type[BaseException]] = [click.exceptions.Exit, typer.Exit]
    aborts: list[type[BaseException]] = [click.exceptions.Abort, typer.Abort]
    try:
        from typer._click import exceptions as vendored

        usage.append(vendored.ClickException)
    except ImportError:  # older Typer uses click itself
        pass
    return tuple(usage), tuple(exits), tuple(aborts)


_USAGE, _EXIT, _ABORT = _click_classes()


def _metavar(param: Any) -> str:
    """What a person reads for an option's value: INTEGER, FLOAT, TEXT, PATH, A,B,C."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""  # a flag takes no value
    desc = getattr(param, "type_descriptor", None)
    if desc is not None and getattr(desc, "is_choice", False):
        return "|".join(str(c) for c in (desc.choices or ()))
    if "comma" in (getattr(param, "help", None) or "").lower():
        return "A,B,C"
    if desc is not None and getattr(desc, "is_path", False):
        return "PATH"
    ann: Any = getattr(desc, "annotation", None)
    if desc is not None and getattr(desc, "is_ranged", False):
        ann = {"int": int, "float": float}.get(str(desc.ranged_type_name), ann)
    if getattr(ann, "__origin__", None) is list:
        ann = ann.__args__[0]
    names = {int: "INTEGER", float: "FLOAT", Path: "PATH", bool: ""}
    return names.get(ann, "TEXT") if isinstance(ann, type) else "TEXT"


def _humanise(cmd: Any) -> Any:
    """Plain help (full option names at any width, never cut by a table column) with
    readable metavars, for every command and sub-command."""
    if hasattr(cmd, "rich_markup_mode"):
        cmd.rich_markup_mode = None
    for p in getattr(cmd, "params", []):
        kind = getattr(p, "param_type_name", "")
        if kind == "option" and p.metavar is None:
            p.metavar = _metavar(p)
        elif kind == "argument":
            # the argument's own name (PREFIX, as click shows it) and no type like <str>
            if p.metavar is None:
                p.metavar = (p.name or "value").upper()
            if hasattr(p, "display_type_rich"):
                p.display_type_rich = lambda ctx=None: ""
    for sub in (getattr(cmd, "commands", None) or {}).values():
        _humanise(sub)
    return cmd


def get_command() -> Any:
    """The click command behind ``bastion`` (what :func:`run` invokes)."""
    return _humanise(typer.main.get_command(app))


def run(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv``; return the exit code instead of exiting.

    A :class:`BastionError` prints ``error: <message>`` on one line (exit 1; a bad job spec,
    :class:`~bastion.jobs.SpecError`, exit 2 like a bad option); an unexpected exception
    prints one line too (exit 2); ``--debug`` shows tracebacks.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = c.debug_requested(args)
    command = get_command()
    lines = c.install_progress_lines(args)
    try:
        # without standalone mode, click returns a typer.Exit's code instead of raising
        rc = command.main(args=args, prog_name="bastion", standalone_mode=False)
        return rc if type(rc) is int else 0
    except _EXIT as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except _USAGE as exc:
        usage: Any = exc  # click.UsageError (the class is looked up at run time)
        usage.show()
        return int(usage.exit_code)
    except _ABORT:
        c.err_console.print("aborted")
        return 130
    except BastionError as exc:
        if debug:
            raise
        c.err_console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return int(getattr(exc, "exit_code", 1))  # a bad job spec (SpecError): 2
    except KeyboardInterrupt:
        c.err_console.print("interrupted")
        return 130
    except Exception as exc:
        if debug:
            raise
        c.err_console.print(
            f"[red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} "
            "(rerun with --debug for the traceback, and please report it)",
            soft_wrap=True,
        )
        return 2
    finally:
        c.remove_progress_lines(lines)


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


__all__ = ["app", "main", "run"]
