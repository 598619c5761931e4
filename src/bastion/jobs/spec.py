"""What every job spec shares: validation into one clear line, the seed, MLflow tracking,
the deadline and the engine fields.

A spec is a frozen pydantic model: ``ScanSpec(model="builtin:digits-cnn", ...)`` checks
types and ranges when it is built and raises :class:`SpecError` (a
:class:`~bastion.errors.BastionError`, one line naming the field, the value and the fix);
the CLI prints that line and exits 2, as for any bad option. Defaults equal the CLI's.
Checks that need the data or the model (an epsilon against the input range, an attack
name against the model's kind) stay in the library and run when the job starts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, NamedTuple, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, field_validator

from bastion.errors import BastionError

ENGINES = ("local", "ray")

R = TypeVar("R")

#: A list of names (attacks, probes, detectors...): any sequence in, a tuple kept.
Names = Annotated[Sequence[str], AfterValidator(tuple)]
#: A list of numbers (epsilons): any sequence in, a tuple kept.
Numbers = Annotated[Sequence[float], AfterValidator(tuple)]


class JobResult(NamedTuple, Generic[R]):
    """What a job returns: its report, the files it wrote and the MLflow warnings (a
    tracking store that failed; the report is written regardless). Unpacks as
    ``report, paths, warnings = scan(spec)``."""

    report: R
    paths: dict[str, Path]
    warnings: list[str]


class SpecError(BastionError):
    """A job spec with a bad value. The CLI exits with :attr:`exit_code` (2, a usage
    error), as click does for an option it rejects itself."""

    exit_code = 2


def _one_line(name: str, exc: ValidationError) -> SpecError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    field = ".".join(str(p) for p in first["loc"]) or "spec"
    cls = _SPECS.get(name)
    if first["type"] == "extra_forbidden":
        fields = ", ".join(sorted(cls.model_fields)) if cls is not None else ""
        return SpecError(f"{name} has no field {field!r}", hint=f"the fields are {fields}")
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "missing":
        got = ""
    else:
        got = repr(first.get("input"))
        got = ", got " + (got if len(got) <= 80 else got[:77] + "...")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    option = _option(cls, str(first["loc"][0])) if first["loc"] else None
    return SpecError(f"{name}.{field}: {msg}{got}{more}",
                     hint=f"fix {field} (CLI option {option})" if option else None)


def _option(cls: type[JobSpec] | None, field: str) -> str:
    """The CLI option of a field: the first ``--option`` its docstring names."""
    info = cls.model_fields.get(field) if cls is not None else None
    found = re.search(r"``(--[a-z0-9-]+)", (info.description or "") if info else "")
    return found.group(1) if found else "--" + field.replace("_", "-")


_SPECS: dict[str, type[JobSpec]] = {}


class JobSpec(BaseModel):
    """Fields every job takes. Subclasses add the command's own options."""

    # defer_build: a spec's validator is built when it is first used, not at import
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True,
                              defer_build=True)

    seed: int = 0
    """Random seed; one seed, one result (``--seed``)."""
    engine: Literal["local", "ray"] = "local"
    """Where the work runs: ``local`` (this process) or ``ray`` (a Ray cluster;
    ``--engine``)."""
    ray_address: str | None = None
    """The Ray cluster with ``engine="ray"``: ``auto``, ``ray://HOST:PORT`` or
    ``HOST:PORT`` (``--ray-address``; default: ``$BASTION_RAY_ADDRESS``, else a local
    cluster). Ignored by the local engine."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _SPECS[cls.__name__] = cls

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _one_line(type(self).__name__, exc) from None

    @field_validator("ray_address")
    @classmethod
    def _check_ray_address(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip()
        if v == "auto" or v.startswith("ray://") or _host_port(v):
            return v
        raise ValueError(f"{v!r} is not a Ray address: use auto, HOST:PORT (the GCS port "
                         "of `ray start --head`) or ray://HOST:PORT (Ray Client)")


def _host_port(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536 and "/" not in host


class TrackedSpec(JobSpec):
    """A job that records an MLflow run."""

    tracking_uri: str | None = None
    """MLflow tracking URI (``--tracking-uri``; default ``$MLFLOW_TRACKING_URI`` or
    ``./mlflow.db``)."""
    track: bool = True
    """Record an MLflow run (``--no-track`` sets it to False)."""


class DeadlineSpec(TrackedSpec):
    """A tracked job that can be stopped at a deadline."""

    timeout: float | None = None
    """Stop the job after this many seconds (``--timeout``): it runs in a forked child,
    killed at the deadline; no report is written and its MLflow run ends as KILLED."""

    @field_validator("timeout")
    @classmethod
    def _check_timeout(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError("must be a positive number of seconds")
        return v


def engine_of(spec: JobSpec) -> Any:
    """The execution engine a job hands its work to: ``None`` for the local engine (the
    library's own loops in this process).

    This is the one place a job learns its engine: each job calls it once and passes the
    result on, so wiring :mod:`bastion.engine` in is one line here.
    """
    if spec.engine == "local":
        return None
    raise BastionError(f"engine {spec.engine!r} is not available for this job yet",
                       hint="run with engine='local' (--engine local)")


def ray_engine(spec: JobSpec) -> Any:
    """For the jobs that run on an engine (scan, the data and privacy audits, the red
    team): ``None`` for the local engine; for ``ray``, the address is checked here (before
    anything is written, without connecting) and a zero-argument function is returned
    that connects and gives the :class:`bastion.engine.Engine`. Call it where the work
    runs: inside the job's deadline child, since a Ray connection does not survive a fork.
    """
    if spec.engine == "local":
        return None
    from bastion.engine.base import check_engine, get_engine

    check_engine("ray", spec.ray_address)

    def connect() -> Any:
        return get_engine("ray", spec.ray_address)

    return connect
