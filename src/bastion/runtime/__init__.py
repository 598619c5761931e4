"""Bastion in production: the guarded model, monitors, the healing controller and the
retrain pipeline, over the event store.

- :mod:`bastion.store.events` (re-exported here): :class:`EventStore` (SQLite WAL by
  default or PostgreSQL by URL; durable appends, concurrent ones sharing a commit), event
  kinds. It lives on the ground floor, so lower layers import it without reaching here.
- :mod:`.detectors`: :func:`build_detectors` (fit + calibrate the guard's detectors).
- :mod:`.guard`: :class:`GuardedModel`, :class:`GuardPolicy`, :class:`GuardDecision`,
  :func:`record_feedback`.
- :mod:`.monitors`: :class:`Signal` and the monitors.
- :mod:`.retrain`: :class:`RetrainPipeline`, :class:`RetrainConfig`, gates.
- :mod:`.healing`: :class:`HealingController`, :class:`HealingPolicy`.

Names are imported lazily, so ``import bastion.runtime`` is cheap.

A minimal loop (what the service and ``bastion demo`` build on)::

    from bastion.registry.models import ModelRegistry
    from bastion.runtime import (EventStore, GuardedModel, HealingController,
                                 HealingPolicy, RetrainPipeline, build_detectors,
                                 record_feedback)

    store = EventStore("sqlite:///bastion-events.db")
    reg = ModelRegistry("digits", store=store)            # MLflow under ./mlflow.db
    v = reg.register("models/cnn"); reg.promote(v, reason="baseline", actor="me")
    champion = reg.load("champion")
    guard = GuardedModel(champion, detectors=build_detectors(champion, x_ref, fpr=0.01),
                         fallback=reg.load("fallback") if reg.get_alias("fallback") else None,
                         store=store, model_version=v)
    answers = guard.predict(x_batch, client_id="alice")     # list[GuardDecision]
    record_feedback(store, {answers[0].request_id: 7})
    ctl = HealingController(HealingPolicy(), store, reg,
                            RetrainPipeline((x_ref, y_ref), (x_hold, y_hold)))
    report = ctl.step()                                     # what `bastion heal --once` runs
    # after a promotion: reload reg.load("champion") and rebuild the guard; the guard
    # itself re-reads quarantine and traffic routing from the store
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EventStore": "bastion.store.events", "Event": "bastion.store.events",
    "EVENT_KINDS": "bastion.store.events",
    "build_detectors": "detectors", "pgd_attack": "detectors",
    "GuardedModel": "guard", "GuardPolicy": "guard", "GuardDecision": "guard",
    "Reason": "guard", "record_feedback": "guard",
    "Signal": "monitors", "InputDriftMonitor": "monitors", "HealthMonitor": "monitors",
    "AccuracyMonitor": "monitors", "AlertRateMonitor": "monitors",
    "ClientAlertMonitor": "monitors",
    "RetrainPipeline": "retrain", "RetrainConfig": "retrain", "RetrainResult": "retrain",
    "GateResult": "retrain",
    "HealingController": "healing", "HealingPolicy": "healing", "Rule": "healing",
    "StepReport": "healing",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod = _LAZY[name]
        return getattr(importlib.import_module(mod if "." in mod else f"bastion.runtime.{mod}"),
                       name)
    raise AttributeError(f"module 'bastion.runtime' has no attribute {name!r}")
