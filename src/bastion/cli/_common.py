"""What every CLI command shares: options, error handling, progress and output rules.

Commands stay thin: parse, call one library function, render. A :class:`BastionError`
becomes one line on stderr and exit code 1, with no traceback unless ``--debug``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from bastion.errors import BastionError

err_console = Console(stderr=True, highlight=False)

SeedOpt = typer.Option(0, "--seed", help="Random seed; one seed, one result.")
OutOpt = typer.Option(..., "--out", help="Output folder (created if missing).")
TrackingOpt = typer.Option(
    None,
    "--tracking-uri",
    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db).",
)
NoTrackOpt = typer.Option(False, "--no-track", help="Do not record an MLflow run.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress output.")
DebugOpt = typer.Option(False, "--debug", help="Show full tracebacks on errors.")
EngineOpt = typer.Option(
    None, "--engine", metavar="local|ray",
    help="Where the parallel work runs: local (this process) or ray (a Ray cluster; needs "
    "the ray extra). A bad name or address: one line, exit 2.")
RayAddressOpt = typer.Option(
    None, "--ray-address", metavar="auto|HOST:PORT|ray://HOST:PORT",
    help="The Ray cluster for --engine ray (default: $BASTION_RAY_ADDRESS, else auto: the "
    "cluster started on this machine with `ray start --head`).")


def engine_fields(engine: str | None, ray_address: str | None) -> dict[str, Any]:
    """``--engine``/``--ray-address`` as job-spec fields: a Ray address alone means Ray; an
    unknown engine or an address for the local engine is one line, exit 2."""
    from bastion.engine.base import ENGINES, EngineError

    if engine is None and ray_address is None:
        return {}  # the spec's default; a job can tell an explicit --engine local apart
    name = (engine or ("ray" if ray_address else "local")).strip().lower()
    if name not in ENGINES:
        raise EngineError(f"unknown engine {engine!r}", hint=f"use one of: {', '.join(ENGINES)}")
    if name == "local" and ray_address:
        raise EngineError("--ray-address is only for --engine ray",
                          hint="add --engine ray, or drop --ray-address")
    return {"engine": name, "ray_address": ray_address}


def _check_timeout(value: float | None) -> float | None:
    from bastion.jobs import check_timeout

    return check_timeout(value)  # a BastionError: one line, before any work starts


TimeoutOpt = typer.Option(
    None, "--timeout", metavar="SECONDS", callback=_check_timeout,
    help="Stop the job after this many seconds (exit 1, no report written, its MLflow "
    "run ended as KILLED).")


def show_progress(quiet: bool) -> bool:
    """Progress bars only in an interactive terminal and when not ``--quiet``."""
    return (not quiet) and sys.stderr.isatty()


PROGRESS_LOGGER = "bastion.progress"
TICK_EVERY_S = 5.0


class _ProgressLines(logging.Handler):
    """Progress on stderr when it is not a terminal: every stage line (logger
    ``bastion.progress``), and ticks (``bastion.progress.tick``: epochs, batches) at most
    one every :data:`TICK_EVERY_S` seconds."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.t0 = time.monotonic()
        self.last_tick = -1e9

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        if record.name.endswith(".tick"):
            if now - self.last_tick < TICK_EVERY_S:
                return
            self.last_tick = now
        try:
            sys.stderr.write(f"[{now - self.t0:6.1f}s] {record.getMessage()}\n")
            sys.stderr.flush()
        except Exception:  # a closed pipe must not break the job
            pass


def install_progress_lines(argv: list[str]) -> logging.Handler | None:
    """Log progress lines to stderr when it is not a terminal (and not ``--quiet``)."""
    if "-q" in argv or "--quiet" in argv or sys.stderr.isatty():
        return None
    log = logging.getLogger(PROGRESS_LOGGER)
    handler = _ProgressLines()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


def remove_progress_lines(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger(PROGRESS_LOGGER).removeHandler(handler)


def stage(message: str) -> None:
    """A progress line for a new stage (shown when stderr is not a terminal)."""
    logging.getLogger(PROGRESS_LOGGER).info(message)


def tick(message: str) -> None:
    """A frequent progress line (an epoch); shown at most every few seconds."""
    logging.getLogger(PROGRESS_LOGGER + ".tick").info(message)


def info(message: str, *, quiet: bool = False) -> None:
    """A status line on stderr (stdout stays clean for ``--json``)."""
    if not quiet:
        err_console.print(message, soft_wrap=True)  # one line, whatever the width


def parse_floats(text: str, *, what: str = "--eps") -> list[float]:
    """Parse ``"0.05,0.1"`` into floats, with an error naming the option."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise BastionError(f"{what} is empty", hint="give a comma-separated list, e.g. 0.1,0.2")
    try:
        return [float(p) for p in parts]
    except ValueError as exc:
        raise BastionError(f"{what} must be comma-separated numbers, got {text!r}") from exc


def parse_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [p.strip() for p in text.split(",") if p.strip()]
    return items or None


def parse_settings(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """Parse repeated ``--set ATTACK.PARAM=VALUE`` into ``{attack: {param: value}}``.

    Values are read as JSON when possible (numbers, booleans), else kept as strings.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise BastionError(
                f"cannot read --set {item!r}",
                hint="write it as ATTACK.PARAM=VALUE, e.g. pgd.steps=20",
            )
        key, raw = item.split("=", 1)
        name, param = key.split(".", 1)
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name.strip(), {})[param.strip()] = value
    return out


def prepare_out_dir(out: Path) -> Path:
    """Create the output folder; refuse a path that is an existing file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BastionError(f"--out {out} is a file", hint="give a folder path")
    out.mkdir(parents=True, exist_ok=True)
    return out


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("BASTION_DEBUG", "") not in ("", "0")
