"""Whole jobs from specs to files: what the CLI commands call, usable from Python too.

A job resolves a model and data from their specs, runs a library function, writes the
report atomically and records an MLflow run. This module sits at the top of the layer
stack, beside ``cli`` and ``service``: it may import everything below.
"""

from __future__ import annotations

import importlib
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bastion.errors import BastionError

T = TypeVar("T")

#: At its deadline a job creating or migrating a local MLflow store gets this many more
#: seconds to finish that step: killed halfway, it would leave a broken store behind.
STORE_INIT_GRACE_S = 60.0


class JobTimeout(BastionError):
    """A job stopped at its ``--timeout``."""


def _describe(exc: BaseException) -> tuple[Any, ...]:
    if isinstance(exc, BastionError):
        return ("bastion", type(exc).__module__, type(exc).__qualname__, exc.message,
                exc.hint)
    return ("other", type(exc).__name__, " ".join(str(exc).split())[:500])


def _rebuild(desc: tuple[Any, ...]) -> BaseException:
    if desc[0] == "bastion":
        _, mod, name, message, hint = desc
        try:
            cls = getattr(importlib.import_module(mod), name)
            if isinstance(cls, type) and issubclass(cls, BastionError):
                return cls(message, hint=hint)
        except (ImportError, AttributeError, TypeError):
            pass
        return BastionError(message, hint=hint)
    return RuntimeError(f"{desc[1]}: {desc[2]}")


def _child(fn: Callable[[], Any], conn: Any) -> None:
    import threading

    from bastion.registry import tracking

    lock = threading.Lock()  # a job may open runs from several threads

    def send(msg: tuple[Any, ...]) -> None:
        with lock:
            conn.send(msg)

    # tell the parent which MLflow runs are open, so it can close them if it kills us
    tracking.set_run_listener(lambda event, run_id, uri: send(("run", event, run_id, uri)))
    try:
        result = fn()
        try:
            send(("ok", result))
        except Exception as exc:  # an unpicklable result: say so instead of hanging
            send(("error", _describe(exc)))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        send(("error", _describe(exc)))
    finally:
        tracking.set_run_listener(None)
        conn.close()


def check_timeout(timeout: float | None) -> float | None:
    """``None`` or a finite number of seconds above zero, else one clear error."""
    if timeout is None:
        return None
    if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
        raise BastionError(f"--timeout must be a positive number of seconds, got {timeout}",
                           hint="e.g. --timeout 600, or leave it out for no limit")
    return float(timeout)


def _remove_partial(out: Path | None, existed: bool) -> str:
    """After a stop: remove an output folder the job created, or the temporary files of
    the atomic writers inside one that was there before. Returns what was done."""
    if out is None:
        return ""
    for debris in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(debris, ignore_errors=True)
    if not existed and out.is_dir() and not out.is_symlink():
        shutil.rmtree(out, ignore_errors=True)
        return f"; its partial output {out} was removed"
    if out.is_dir():
        for debris in [*out.glob(".*.tmp"), *out.glob(".*.tmp-*")]:
            if debris.is_dir():
                shutil.rmtree(debris, ignore_errors=True)
            else:
                debris.unlink(missing_ok=True)
    return "; no report of this run was written"


def _close_runs(runs: dict[str, str], *, status: str, why: str) -> str:
    """End the MLflow runs a killed child left open, tagged ``bastion.stopped=why``.
    Returns ``""``, or what could not be closed (to end the error line with)."""
    if not runs:
        return ""
    from bastion.registry.tracking import close_abandoned_run

    failed = []
    for run_id, uri in runs.items():
        warning = close_abandoned_run(run_id, uri, status=status,
                                      tags={"bastion.stopped": why})
        if warning:
            logging.getLogger(__name__).debug(warning)
            failed.append(" ".join(warning.split())[:200])
    return "".join(f"; {w}" for w in failed)


def _restore_terminal() -> None:
    """A child killed while drawing a progress bar leaves the cursor hidden and the bar's
    line unfinished: show the cursor and clear that line, on each stream that is a
    terminal, so the error line that follows starts clean."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and stream.isatty():
                stream.write("\r\x1b[2K\x1b[?25h")
                stream.flush()
        except (OSError, ValueError):  # a closed stream: nothing to restore
            pass


def run_with_deadline(fn: Callable[[], T], *, timeout: float | None, what: str,
                      out_dir: str | Path | None = None) -> T:
    """Run ``fn()`` and return its result; with ``timeout`` (seconds), run it in a
    child process that is killed at the deadline.

    A forward pass stuck in C++ (a TorchScript ``while True``) cannot be interrupted
    inside the process, so the job runs in a forked child: at the deadline the child is
    killed, the partial output in ``out_dir`` is removed (the whole folder when the job
    created it, else the atomic writers' temporary files), the MLflow runs it left open
    are ended as ``KILLED`` with the tag ``bastion.stopped=timeout``, a progress bar it
    was drawing is cleared, and :class:`JobTimeout` is raised. Errors in the child come
    back as the same :class:`BastionError` class; the result is sent back through a pipe
    between the two Bastion processes.
    """
    import multiprocessing as mp

    if timeout is None:
        return fn()
    timeout = check_timeout(timeout)
    assert timeout is not None
    if "fork" not in mp.get_all_start_methods():
        raise BastionError("--timeout needs a system that can fork processes (Linux, macOS)",
                           hint="run without --timeout")
    ctx = mp.get_context("fork")
    out = Path(out_dir).expanduser() if out_dir is not None else None
    existed = out is not None and out.exists()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, send), name=f"bastion-{what}")
    proc.start()
    send.close()
    deadline = time.monotonic() + timeout
    msg: Any = None
    runs: dict[str, str] = {}  # MLflow runs the child has open: run id -> tracking URI
    in_init = False  # the child is creating or migrating a local MLflow store
    try:
        while True:
            now = time.monotonic()
            if now >= deadline and not (in_init and now < deadline + STORE_INIT_GRACE_S):
                break
            if recv.poll(min(deadline - now, 0.25) if now < deadline else 0.1):
                try:
                    got = recv.recv()
                except EOFError:  # the child died without a word
                    got = ("died", None)
                if got[0] == "run":
                    _, event, run_id, uri = got
                    if event == "start":
                        runs[run_id] = uri
                    elif event == "end":
                        runs.pop(run_id, None)
                    else:
                        in_init = event == "init-start"
                    continue
                msg = got
                break
            if not proc.is_alive() and not recv.poll(0):
                msg = ("died", None)
                break
    except BaseException:  # Ctrl-C: take the child down too
        proc.kill()
        proc.join(5)
        recv.close()
        _restore_terminal()
        _close_runs(runs, status="KILLED", why="interrupted")
        raise
    if msg is None:
        proc.kill()
    proc.join(10)
    recv.close()
    if msg is None:
        _restore_terminal()
        done = _remove_partial(out, existed)
        done += _close_runs(runs, status="KILLED", why="timeout")
        raise JobTimeout(f"{what} stopped at the --timeout of {timeout:g} s{done}",
                         hint="allow more time with a larger --timeout, or give the job "
                         "less to do (--limit, fewer epsilons or attacks); a model that "
                         "never answers needs fixing")
    if msg[0] == "ok":
        return msg[1]  # type: ignore[no-any-return]
    if msg[0] == "died":
        _restore_terminal()
        _remove_partial(out, existed)
        lost = _close_runs(runs, status="FAILED", why="died")
        raise BastionError(f"{what} ended unexpectedly (exit code {proc.exitcode}){lost}",
                           hint="rerun without --timeout to see the error")
    raise _rebuild(msg[1])


def load_any_model(spec: str, **kwargs: Any) -> Any:
    """Resolve ``spec`` like :func:`bastion.models.resolve_model`, and also load the
    wrapper folders that ``bastion harden`` writes for squeezing, smoothing and ensembles
    (they live in ``bastion.defend``, which the models layer may not import)."""
    from bastion.defend.persist import is_hardened_folder, load_hardened
    from bastion.models import resolve_model

    if is_hardened_folder(Path(spec).expanduser()):
        return load_hardened(spec)
    return resolve_model(spec, **kwargs)


def run_scan(
    *,
    model_spec: str,
    data_spec: str,
    out_dir: str | Path,
    norm: str = "linf",
    epsilons: Sequence[float] = (0.05, 0.1, 0.2),
    attacks: Sequence[str] | None = None,
    limit: int | None = None,
    weights: str | None = None,
    label_column: str = "label",
    attack_options: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
    track: bool = True,
    progress: bool = False,
    preset: str = "standard",
    engine: Any = None,
    ray_address: str | None = None,
) -> tuple[Any, dict[str, Path], list[str]]:
    """Scan ``model_spec`` on the test split of ``data_spec`` and write the report.

    ``engine`` (``"local"``, ``"ray"`` or a :class:`bastion.engine.Engine`) and
    ``ray_address``: where the attack shards run (default: this process).

    Returns ``(report, paths, tracking_warnings)`` where ``paths`` has keys ``json`` and
    ``html``. Everything is validated before anything is written: on a bad model, bad data
    or bad options a :class:`BastionError` is raised and ``out_dir`` is left untouched. A
    failing MLflow store only adds to ``tracking_warnings``; the report is written first.
    """
    from bastion._util import set_seed
    from bastion.attacks.base import check_epsilons, check_norm
    from bastion.data import load_data
    from bastion.data.validate import check_dataset_for_model
    from bastion.evaluate import scan, write_scan_report
    from bastion.evaluate.presets import check_preset
    from bastion.registry.tracking import track_run

    preset = check_preset(preset)
    norm = check_norm(norm)
    epsilons = check_epsilons(epsilons)
    if limit is not None and limit < 1:
        raise BastionError(f"--limit must be at least 1, got {limit}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BastionError(f"output path {out} is a file", hint="give a folder path")
    from bastion.engine import resolve_engine

    eng = resolve_engine(engine, ray_address)  # a bad address fails here, before any work
    set_seed(seed)
    ds = load_data(data_spec, label_column=label_column, seed=seed)
    model = load_any_model(
        model_spec,
        weights=weights,
        input_shape=ds.input_shape,
        n_classes=ds.n_classes,
        bounds=ds.bounds,
        seed=seed,
        progress=progress,
    )
    check_dataset_for_model(ds, model)
    x, y = ds.x_test, ds.y_test
    if limit is not None:
        x, y = x[:limit], y[:limit]
    params = {
        "model": model_spec,
        "data": data_spec,
        "norm": norm,
        "epsilons": ",".join(str(e) for e in epsilons),
        "attacks": ",".join(attacks) if attacks else "default",
        "preset": preset,
        "limit": limit,
        "n_points": len(x),
        "seed": seed,
        "engine": getattr(eng, "name", "local"),
    }
    report = scan(
        model,
        x,
        y,
        norm=norm,
        epsilons=epsilons,
        attacks=list(attacks) if attacks else None,
        seed=seed,
        attack_options=attack_options,
        progress=progress,
        preset=preset,
        engine=eng,
    )
    report.data = {**dict(report.data or {}), "spec": data_spec, "split": "test", "name": ds.name}
    report.model = {**dict(report.model or {}), "spec": model_spec}
    paths = write_scan_report(report, out)
    warnings: list[str] = []
    with track_run("scan", params=params, tracking_uri=tracking_uri, enabled=track) as run:
        metrics: dict[str, float] = {"clean_accuracy": report.clean_accuracy}
        for k, v in report.robust_accuracy.items():
            metrics[f"robust_accuracy_eps_{k}"] = v
        run.log_metrics(metrics)
        run.set_tags({"bastion.n_warnings": len(report.warnings)})
        for p in paths.values():
            run.log_artifact(p, artifact_path="report")
    warnings.extend(run.warnings)
    return report, {k: Path(v) for k, v in paths.items()}, warnings
