"""Whole jobs from specs to files: what the CLI commands call, usable from Python too.

A job resolves a model and data from their specs, runs a library function, writes the
report atomically and records an MLflow run. This module sits at the top of the layer
stack, beside ``cli`` and ``service``: it may import everything below.
"""

from __future__ import annotations

import importlib
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bastion.errors import BastionError

T = TypeVar("T")


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
    try:
        result = fn()
        try:
            conn.send(("ok", result))
        except Exception as exc:  # an unpicklable result: say so instead of hanging
            conn.send(("error", _describe(exc)))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        conn.send(("error", _describe(exc)))
    finally:
        conn.close()


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


def run_with_deadline(fn: Callable[[], T], *, timeout: float | None, what: str,
                      out_dir: str | Path | None = None) -> T:
    """Run ``fn()`` and return its result; with ``timeout`` (seconds), run it in a
    child process that is killed at the deadline.

    A forward pass stuck in C++ (a TorchScript ``while True``) cannot be interrupted
    inside the process, so the job runs in a forked child: at the deadline the child is
    killed, the partial output in ``out_dir`` is removed (the whole folder when the job
    created it, else the atomic writers' temporary files) and :class:`JobTimeout` is
    raised. Errors in the child come back as the same :class:`BastionError` class;
    the result is sent back through a pipe between the two Bastion processes.
    """
    import multiprocessing as mp

    if timeout is None:
        return fn()
    if not timeout > 0:
        raise BastionError(f"--timeout must be a positive number of seconds, got {timeout}")
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
    deadline = time.monotonic() + float(timeout)
    msg: Any = None
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if recv.poll(min(left, 0.25)):
                try:
                    msg = recv.recv()
                except EOFError:  # the child died without a word
                    msg = ("died", None)
                break
            if not proc.is_alive() and not recv.poll(0):
                msg = ("died", None)
                break
    except BaseException:  # Ctrl-C: take the child down too
        proc.kill()
        proc.join(5)
        raise
    finally:
        recv_open = msg is None
        if recv_open:
            proc.kill()
        proc.join(10)
        recv.close()
    if msg is None:
        done = _remove_partial(out, existed)
        secs = f"{float(timeout):g}"
        raise JobTimeout(f"{what} stopped at the --timeout of {secs} s{done}",
                         hint="allow more time with a larger --timeout, or give the job "
                         "less to do (--limit, fewer epsilons or attacks); a model that "
                         "never answers needs fixing")
    if msg[0] == "ok":
        return msg[1]  # type: ignore[no-any-return]
    if msg[0] == "died":
        _remove_partial(out, existed)
        raise BastionError(f"{what} ended unexpectedly (exit code {proc.exitcode})",
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
) -> tuple[Any, dict[str, Path], list[str]]:
    """Scan ``model_spec`` on the test split of ``data_spec`` and write the report.

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
