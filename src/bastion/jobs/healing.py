"""The ``heal`` job: the healing controller over the event store (``bastion heal``).

Each step reads the events since the last one, runs the monitors and acts on what fired
(quarantine, retrain, validate, promote or roll back); the registry records every alias
change. ``once`` runs one step; otherwise steps repeat every ``interval`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from bastion.jobs.spec import JobResult, JobSpec, engine_of


class HealSpec(JobSpec):
    """What ``bastion heal`` runs. Defaults are the CLI's."""

    model: str
    """Registered model name (``--model``)."""
    reference: str
    """Trusted data spec: its train split is the reference, its test split the holdout
    that gates a retrained candidate (``--reference``)."""
    once: bool = False
    """Run one controller step and return (``--once``)."""
    events: str = "sqlite:///bastion-events.db"
    """Event store URL (``sqlite:///PATH`` or ``postgresql://...``; ``--events``)."""
    policy: Path | None = None
    """Healing policy, YAML or JSON (``--policy``)."""
    interval: float = Field(default=30.0, ge=0.1)
    """Seconds between steps without :attr:`once` (``--interval``)."""
    tracking_uri: str | None = None
    """MLflow tracking URI of the registry (``--tracking-uri``)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many steps (``None``: one with :attr:`once`, else run until
    stopped)."""


def heal(spec: HealSpec, *, on_step: Callable[[Any], None] | None = None) -> JobResult[Any]:
    """Run the healing controller; ``on_step`` gets each step's
    :class:`~bastion.runtime.healing.StepReport`. Returns ``JobResult(last StepReport,
    {}, [])`` after one step with ``once`` or after ``max_steps``; otherwise runs until
    interrupted."""
    from bastion.runtime.healing import build_controller

    engine_of(spec)  # the controller runs once, here
    ctl = build_controller(spec.model, spec.reference, events_url=spec.events,
                           tracking_uri=spec.tracking_uri, policy=spec.policy, seed=spec.seed)
    steps = 1 if spec.once else spec.max_steps
    done = 0
    while True:
        rep = ctl.step()
        done += 1
        if on_step is not None:
            on_step(rep)
        if steps is not None and done >= steps:
            return JobResult(rep, {}, [])
        time.sleep(spec.interval)
