"""Group fairness in monitoring: selection rate and error rate by the values of a declared
protected column of a tabular model, with intervals, and an alert when the gap between
groups drifts beyond what the model showed on trusted data (fairlearn, extra ``ops``).

:class:`GroupFairnessMonitor` (``name = "fairness"``) reads the latest answered inputs
(the protected column is one of the model's input features; its logged value names the
group) and the labelled feedback, and computes with fairlearn's
:class:`~fairlearn.metrics.MetricFrame`:

- the **selection rate** (share answered with ``positive_label``) per group, from every
  answer (no labels needed);
- the **error rate** per group, from the answers that got a feedback label.

Each rate has a 95% Wilson interval; the **gap** is the largest minus the smallest rate
over the groups with at least ``min_group`` answers. The reference gap is the same gap of
the champion on the trusted holdout. The monitor fires when a gap exceeds the reference
gap by more than ``tolerance`` with one-sided significance ``alpha`` (a z test on the
difference of the two extreme groups' proportions), i.e. the disparity grew, not merely
exists. Quarantined clients' and blocked inputs are left out.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from bastion.errors import BastionError
from bastion.runtime.guard import STATE_QUARANTINE
from bastion.runtime.monitors import Signal, labelled_feedback
from bastion.store import events as ev

__all__ = ["FairnessSettings", "GroupFairnessMonitor", "group_rates"]


class FairnessSettings(BaseModel):
    """The service config's ``fairness:`` section."""

    model_config = ConfigDict(extra="forbid")

    protected_column: str = Field(min_length=1, max_length=256)
    positive_label: int = Field(default=1, ge=0)
    window: int = Field(default=1000, ge=20)
    min_group: int = Field(default=30, ge=5)
    tolerance: float = Field(default=0.1, ge=0.0, le=1.0)
    alpha: float = Field(default=0.01, gt=0.0, lt=0.5)


def _wilson(k: int, n: int) -> list[float]:
    from bastion.evaluate.presets import wilson_interval

    return [round(float(v), 4) for v in wilson_interval(int(k), int(n))]


def group_rates(groups: np.ndarray, hits: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per group: ``n``, ``k`` (hits), ``rate`` and its 95% Wilson ``interval``, computed
    with fairlearn's MetricFrame (the rate is the mean of the 0/1 ``hits``)."""
    from fairlearn.metrics import MetricFrame, count

    if len(groups) == 0:
        return {}
    hits = np.asarray(hits, dtype=np.int64)
    mf = MetricFrame(metrics={"rate": lambda yt, yp: float(np.mean(yp)), "n": count},
                     y_true=hits, y_pred=hits, sensitive_features=np.asarray(groups))
    out: dict[str, dict[str, Any]] = {}
    for g, row in mf.by_group.iterrows():
        n = int(row["n"])
        k = int(round(float(row["rate"]) * n))
        out[str(g)] = {"n": n, "k": k, "rate": round(float(row["rate"]), 4),
                       "interval_95": _wilson(k, n)}
    return out


def _gap(rates: dict[str, dict[str, Any]], min_group: int) -> dict[str, Any] | None:
    big = {g: r for g, r in rates.items() if r["n"] >= min_group}
    if len(big) < 2:
        return None
    hi = max(big, key=lambda g: big[g]["rate"])
    lo = min(big, key=lambda g: big[g]["rate"])
    a, b = big[hi], big[lo]
    se = math.sqrt(a["rate"] * (1 - a["rate"]) / a["n"] + b["rate"] * (1 - b["rate"]) / b["n"])
    return {"gap": round(a["rate"] - b["rate"], 4), "high": hi, "low": lo,
            "se": se, "interval_95": [round(a["rate"] - b["rate"] - 1.96 * se, 4),
                                      round(a["rate"] - b["rate"] + 1.96 * se, 4)]}


def _group_of(v: float) -> str:
    return f"{float(v):g}"


class GroupFairnessMonitor:
    """See the module docs.

    Args:
        column: index of the protected column among the model's input features.
        column_name: its name (for messages).
        reference_x, reference_y: the trusted holdout; ``reference_pred``: the champion's
            answers on it (the reference gaps come from these).
    """

    name = "fairness"

    def __init__(self, column: int, column_name: str, *, reference_x: np.ndarray,
                 reference_y: np.ndarray, reference_pred: np.ndarray,
                 settings: FairnessSettings) -> None:
        self.column, self.column_name, self.s = int(column), str(column_name), settings
        flat = np.asarray(reference_x).reshape(len(reference_x), -1)
        if not 0 <= self.column < flat.shape[1]:
            raise BastionError(f"protected column index {column} is outside the "
                               f"{flat.shape[1]} input features")
        groups = np.asarray([_group_of(v) for v in flat[:, self.column]])
        pred = np.asarray(reference_pred)
        self.reference = {
            "selection_rate": group_rates(groups, pred == settings.positive_label),
            "error_rate": group_rates(groups, pred != np.asarray(reference_y)),
        }
        self.reference_gap = {m: (_gap(r, 1) or {"gap": 0.0})["gap"]
                              for m, r in self.reference.items()}

    def evaluate(self, store: ev.EventStore, *, after_id: int, upto_id: int) -> list[Signal]:
        quarantined = {str(c) for c in (store.get_state(STATE_QUARANTINE, []) or [])}
        s = self.s

        def usable(p: ev.Event) -> bool:
            inp = p.payload.get("input")
            return (isinstance(inp, list) and len(inp) > self.column
                    and p.payload.get("label") is not None
                    and str(p.client_id) not in quarantined)

        preds = [p for p in store.recent(ev.PREDICTION, s.window, after_id=after_id,
                                         before_id=upto_id) if usable(p)]
        pairs = [(p, f) for p, f in labelled_feedback(store, after_id=after_id,
                                                      upto_id=upto_id, limit=s.window)
                 if usable(p)]
        cur = {
            "selection_rate": group_rates(
                np.asarray([_group_of(p.payload["input"][self.column]) for p in preds]),
                np.asarray([int(p.payload["label"]) == s.positive_label for p in preds])),
            "error_rate": group_rates(
                np.asarray([_group_of(p.payload["input"][self.column]) for p, _ in pairs]),
                np.asarray([int(p.payload["label"]) != int(f.payload["label"])
                            for p, f in pairs])),
        }
        from scipy.stats import norm

        z = float(norm.ppf(1 - s.alpha))
        fired, parts, evidence = [], [], {}
        value = None
        for metric, rates in cur.items():
            g = _gap(rates, s.min_group)
            ref = self.reference_gap[metric]
            evidence[metric] = {"by_group": rates, "gap": g, "reference_gap": ref,
                                "reference_by_group": self.reference[metric]}
            if g is None:
                parts.append(f"{metric}: fewer than two groups with {s.min_group} answers")
                continue
            if metric == "selection_rate":
                value = g["gap"]
            limit = ref + s.tolerance
            stat = (g["gap"] - limit) / max(g["se"], 1e-9)
            evidence[metric]["z"] = round(stat, 3)
            msg = (f"{metric} gap {g['gap']:.3f} (95% {g['interval_95'][0]:.3f} to "
                   f"{g['interval_95'][1]:.3f}) between {self.column_name}={g['high']} and "
                   f"{self.column_name}={g['low']}, reference {ref:.3f}")
            parts.append(msg)
            if stat > z:
                fired.append(msg)
        return [Signal(
            monitor=self.name, fired=bool(fired), severity="warning" if fired else "info",
            message=("group disparity grew: " + "; ".join(fired)) if fired
            else "; ".join(parts), value=value,
            threshold=self.reference_gap["selection_rate"] + s.tolerance,
            evidence={"column": self.column_name, **evidence},
            window={"n_predictions": len(preds), "n_labelled": len(pairs)})]


def build_fairness_monitor(settings: FairnessSettings, *, feature_names: list[str] | None,
                           champion: Any, x_hold: np.ndarray, y_hold: np.ndarray
                           ) -> GroupFairnessMonitor:
    """The monitor for a tabular model whose inputs have ``feature_names``.

    Raises:
        BastionError: no feature names (not a table), or no such column.
    """
    if not feature_names:
        raise BastionError("fairness monitoring needs a tabular reference with named "
                           "columns", hint="use a csv: or parquet: reference, or drop "
                           "fairness from the config")
    if settings.protected_column not in feature_names:
        raise BastionError(f"protected column {settings.protected_column!r} is not an "
                           f"input feature; features: {feature_names[:20]}",
                           hint="set fairness.protected_column to one of them")
    col = feature_names.index(settings.protected_column)
    pred = np.asarray(champion.predict_proba(x_hold)).argmax(1)
    return GroupFairnessMonitor(col, settings.protected_column, reference_x=x_hold,
                                reference_y=y_hold, reference_pred=pred, settings=settings)
