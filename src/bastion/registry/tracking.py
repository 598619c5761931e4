"""MLflow run tracking that never loses the report.

Every Bastion command records its run in MLflow: parameters, metrics and the report
files as artifacts. The store is, in order of precedence, the ``tracking_uri`` argument
(the CLI's ``--tracking-uri``), the ``MLFLOW_TRACKING_URI`` environment variable, or a
local SQLite database ``./mlflow.db`` in the working folder (artifacts under
``./mlartifacts``).

Tracking is best effort by design: if the store is unreachable or broken, a warning is
recorded on the :class:`TrackedRun` (``run.warnings``) and the command carries on, so the
report on disk is never lost because of tracking.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bastion.errors import BastionError

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "bastion"


def default_tracking_uri() -> str:
    """The tracking URI Bastion uses when none is given."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@contextmanager
def store_init_lock(uri: str, timeout: float = 120.0) -> Iterator[None]:
    """Hold a file lock (``<db>.lock`` beside a local SQLite store) while MLflow creates or
    migrates the store, so processes started at once in one folder do not race its schema
    migration (the losers failed with "table ... already exists" or an Alembic
    CommandError). Other stores need no lock: it yields at once."""
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if not path or path.startswith(":memory:") or "?" in path:
        yield
        return
    from filelock import FileLock

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=timeout):
        _notify("init-start", "", uri)  # a process killed now would leave a half-made store
        try:
            yield
        finally:
            _notify("init-end", "", uri)


#: Told ``(event, run_id, tracking_uri)`` when :func:`track_run` opens ("start") or closes
#: ("end") a run, and when a local store is being created or migrated ("init-start",
#: "init-end", no run id). :func:`bastion.jobs.run_with_deadline` listens in its child
#: process: it closes the runs of a child it killed, and never kills one mid-migration.
RunListener = Callable[[str, str, str], None]
_run_listener: RunListener | None = None


def set_run_listener(listener: RunListener | None) -> RunListener | None:
    """Install ``listener`` (``None`` removes it); returns the previous one."""
    global _run_listener
    previous, _run_listener = _run_listener, listener
    return previous


def _notify(event: str, run_id: str, uri: str) -> None:
    if _run_listener is not None:
        try:
            _run_listener(event, run_id, uri)
        except Exception as exc:  # a listener must never break the job
            log.debug("run listener failed: %s", exc)


def _http_defaults(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        # MLflow's defaults retry for minutes; a dead server should cost seconds.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def close_abandoned_run(run_id: str, tracking_uri: str, *, status: str,
                        tags: Mapping[str, Any]) -> str | None:
    """End a run that a killed process left ``RUNNING`` with ``status`` (``KILLED`` or
    ``FAILED``) and ``tags`` saying why. A run already ended is left alone. Best effort:
    returns a warning instead of raising when the store cannot be reached."""
    try:
        _http_defaults(tracking_uri)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        if client.get_run(run_id).info.status != "RUNNING":
            return None
        for k, v in tags.items():
            client.set_tag(run_id, k, str(v))
        client.set_terminated(run_id, status=status)
    except Exception as exc:
        return _redact_text(f"MLflow run {run_id} could not be closed: "
                            f"{type(exc).__name__}: {exc}")
    return None


def _artifact_location() -> str:
    return (Path.cwd() / "mlartifacts").as_uri()


class TrackedRun:
    """A handle on one MLflow run; every method swallows tracking failures into
    ``warnings`` instead of raising."""

    def __init__(self, run_id: str | None, tracking_uri: str) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.warnings: list[str] = []

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _fail(self, what: str, exc: BaseException) -> None:
        msg = _redact_text(f"MLflow tracking failed while {what}: {type(exc).__name__}: {exc}")
        self.warnings.append(msg)
        log.warning(msg)
        self.run_id = None  # stop trying after the first failure

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:
            return
        try:
            import mlflow

            clean = {k: str(v)[:6000] for k, v in params.items() if v is not None}
            mlflow.log_params(clean)
        except Exception as exc:  # tracking is best effort
            self._fail("logging parameters", exc)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        try:
            import mlflow

            clean = {
                _metric_key(k): float(v)
                for k, v in metrics.items()
                if v is not None and math.isfinite(float(v))
            }
            mlflow.log_metrics(clean, step=step)
        except Exception as exc:
            self._fail("logging metrics", exc)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        if not self.active:
            return
        try:
            import mlflow

            from bastion._util import ensure_inside, safe_files

            p = Path(path)
            ensure_inside(p.parent, p.name)  # raises: a link is never uploaded
            if p.is_dir():
                safe_files(p)  # raises on any link or special file inside
                mlflow.log_artifacts(str(p), artifact_path=artifact_path)
            elif p.exists():
                mlflow.log_artifact(str(p), artifact_path=artifact_path)
        except BastionError as exc:
            msg = f"not uploaded to MLflow: {exc}"
            self.warnings.append(msg)
            log.warning(msg)
        except Exception as exc:
            self._fail(f"uploading {path}", exc)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        try:
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items()})
        except Exception as exc:
            self._fail("setting tags", exc)


def _metric_key(k: str) -> str:
    # MLflow metric names allow alphanumerics, _ - . / and space
    return "".join(c if (c.isalnum() or c in "_-./ ") else "_" for c in str(k))


@contextmanager
def track_run(
    command: str,
    *,
    params: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    enabled: bool = True,
) -> Iterator[TrackedRun]:
    """Open an MLflow run named after ``command``; yield a :class:`TrackedRun`.

    Never raises because of tracking: a broken store gives ``run.warnings`` and a run
    that no-ops. Exceptions of the command itself propagate, and the run is then ended
    with status ``FAILED``.
    """
    uri = tracking_uri or default_tracking_uri()
    _http_defaults(uri)
    run = TrackedRun(None, uri)
    if not enabled:
        yield run
        return
    started = False
    try:
        import mlflow

        mlflow.set_tracking_uri(uri)
        with store_init_lock(uri):  # the first touch creates/migrates the store
            exp = mlflow.get_experiment_by_name(experiment)
            if exp is None:
                kwargs: dict[str, Any] = {}
                if uri.startswith("sqlite:"):
                    kwargs["artifact_location"] = _artifact_location()
                exp_id = mlflow.create_experiment(experiment, **kwargs)
            else:
                exp_id = exp.experiment_id
        active = mlflow.start_run(experiment_id=exp_id, run_name=command)
        started = True
        run.run_id = active.info.run_id
        _notify("start", run.run_id, uri)
        mlflow.set_tag("bastion.command", command)
    except Exception as exc:
        run._fail(f"opening a run at {_redact(uri)}", exc)
    if params:
        run.log_params(params)
    status = "FINISHED"
    started_id = run.run_id
    try:
        yield run
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if started:
            try:
                import mlflow

                mlflow.end_run(status=status)
                if started_id is not None:
                    _notify("end", started_id, uri)
            except Exception as exc:
                run._fail("closing the run", exc)


_CRED = re.compile(r"://[^/@\s]+@")


def _redact_text(text: str) -> str:
    """Hide ``user:password@`` in every URL inside ``text``."""
    return _CRED.sub("://***@", text)


def _redact(uri: str) -> str:
    """Hide credentials in a URI (``scheme://user:pass@host`` -> ``scheme://***@host``)."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri
