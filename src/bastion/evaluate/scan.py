"""The worst-case evaluator: a cascade of attacks, in the spirit of AutoAttack.

Croce & Hein (2020) showed that one attack is not enough and that a fixed, parameter-free
ensemble run as a cascade gives a reliable worst case cheaply: each attack only works on
the points every earlier attack failed on, and a point counts as broken if *any* attack
broke it. :func:`scan` does that, per epsilon:

- white-box model: a preset (:mod:`bastion.evaluate.presets`; ``standard`` by default:
  APGD-CE, APGD-T, FAB-T, then the black-box Square attack as a guard against gradient
  masking, with a pilot that measures the gradient stages' cost per removed point and
  escalation when the gradients lie);
- black-box model (default): Square, then HopSkipJump (a minimal attack);
- or any list of registered attack names (or attack objects), run in that order.

Every claimed success is re-verified on the model (label flipped, within the budget and
the bounds) before it counts. A break at a small epsilon also counts at every larger one
(the same input is inside the larger ball), so the worst-case curve never rises. The
result is a :class:`~bastion.evaluate.report.ScanReport` with per-stage numbers, examples
and the warnings of :mod:`bastion.evaluate.sanity`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, cast

import numpy as np

from bastion._util import set_seed
from bastion.attacks.base import Attack, FixedEpsilonAttack, MinimalAttack, check_norm
from bastion.errors import BastionError, DataError, ModelError
from bastion.evaluate import presets, sanity
from bastion.evaluate.report import AttackSummary, Example, ScanReport, eps_key
from bastion.models.base import is_white_box

#: default budgets, as fractions of the input range ``hi - lo``
DEFAULT_EPSILONS: dict[str, tuple[float, ...]] = {
    "linf": (0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255),
    "l2": (0.0, 0.25, 0.5, 1.0, 2.0),
}
#: the default cascades (AutoAttack-style for white-box models)
WHITE_BOX_CASCADE: tuple[str, ...] = ("apgd-ce", "apgd-t", "square")
BLACK_BOX_CASCADE: tuple[str, ...] = ("square", "hsj")
#: largest input (in values) whose pixels are stored with an example
MAX_EXAMPLE_VALUES = 4096


def scan(
    model: Any,
    x: Any,
    y: Any,
    *,
    norm: str = "linf",
    epsilons: Sequence[float] | float | None = None,
    attacks: Sequence[str | Attack] | None = None,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 500,
    n_examples: int = 8,
    progress: bool = False,
    attack_options: Mapping[str, Mapping[str, Any]] | None = None,
    sanity_checks: bool = True,
    preset: str = "standard",
    escalate: bool | None = None,
    eot_samples: int = 10,
    bpda: Any | None = None,
    surrogate: Any | None = None,
    engine: Any | None = None,
) -> ScanReport:
    """Worst-case robust accuracy of ``model`` on ``(x, y)`` over a cascade of attacks.

    Args:
        model: a Bastion model (``predict_proba``, ``n_classes``, ``input_shape``,
            ``bounds``); white-box when it has ``logits``.
        x: inputs ``(n, *model.input_shape)`` with values inside ``model.bounds``.
        y: integer labels ``(n,)`` in ``[0, model.n_classes)``.
        norm: ``"linf"`` or ``"l2"``.
        epsilons: budgets to evaluate; by default a norm-specific ladder scaled to the
            input range (``DEFAULT_EPSILONS`` times ``hi - lo``). ``0`` gives clean accuracy.
        attacks: attack names from :data:`bastion.attacks.ATTACKS` (or attack objects),
            run as a cascade in that order; by default ``WHITE_BOX_CASCADE`` for a
            white-box model and ``BLACK_BOX_CASCADE`` otherwise.
        seed: seeds every attack and the global RNGs; one seed gives one result.
        limit: evaluate only the first ``limit`` points.
        batch_size: points per attack call.
        n_examples: broken points kept as examples in the report.
        progress: show a Rich progress bar.
        attack_options: per-attack constructor options, e.g. ``{"apgd-ce": {"steps": 20}}``.
        sanity_checks: run the checks of :mod:`bastion.evaluate.sanity` (they cost a
            gradient pass and one cheap attack at a full-range epsilon).
        preset: ``quick``, ``standard`` (default) or ``thorough`` (see
            :mod:`bastion.evaluate.presets`); sets the cascade when ``attacks`` is None.
        escalate: escalate when the gradients lie (a gradient-free stage breaks points the
            gradient stages left standing, or the input gradients vanish): Square rounds
            with a new seed and twice the queries on the survivors until a round removes
            nothing, within the preset's budget. Default: on for ``standard`` and
            ``thorough`` presets, off for ``quick`` and for an explicit ``attacks`` list.
        eot_samples: draws averaged per query when ``thorough`` finds a randomised model.
        bpda: a differentiable stand-in ``x -> logits`` for a model with declared
            non-differentiable preprocessing; gradient stages use its gradient with the
            real model's outputs (BPDA).
        surrogate: a white-box model to transfer APGD-CE adversarials from (a final stage;
            every transferred input is verified on ``model``).
        engine: where the attack shards run: a :class:`bastion.engine.Engine`
            (``get_engine("ray", address)``) or None for this process. The model and the
            data go once into the engine's object store; every point's random numbers are
            keyed by ``(seed, point index)``, so the report is the same on any engine.

    Raises:
        DataError: the data does not fit the model (shape, NaN/Inf, bounds, labels, empty).
        ModelError: the object is not a usable model, or a white-box attack was asked
            for on a black-box model.
        BastionError: bad epsilons, norm, attack names or options.
    """
    t_start = time.perf_counter()
    _check_model(model)
    norm = check_norm(norm)
    eps_list = _check_epsilons(epsilons, norm, model.bounds)
    limit, batch_size, n_examples = _check_ints(limit, batch_size, n_examples)
    xa, ya, n_given = _check_data(model, x, y, limit)
    preset = presets.check_preset(preset)
    custom = attacks is not None
    white = is_white_box(model)
    if escalate is None:
        escalate = (not custom) and preset != "quick"
    attack_model, notes = _attack_model(model, xa, preset, custom, eot_samples, bpda)
    stages = _resolve_attacks(model, attacks, norm=norm, seed=seed, options=attack_options,
                              preset=preset)
    if surrogate is not None:
        stages.append(("transfer", TransferAttack(surrogate, norm=norm, seed=seed)))

    set_seed(seed)
    n, n_eps = len(ya), len(eps_list)
    clean_pred = _predict(model, xa, batch_size)
    correct = clean_pred == ya
    if engine is None or isinstance(engine, str):
        from bastion.engine import get_engine

        engine = get_engine(engine or "local")
    run = _Cascade(model, attack_model, xa, ya, np.tile(correct, (n_eps, 1)), eps_list, norm,
                   batch_size, n_examples, engine=engine)

    # the pilot: every stage alone on the first points, to measure its cost per removal
    order_info: dict[str, Any] = {"measured": False}
    pilot = np.zeros(n, dtype=bool)
    measure = (not custom) and white and preset != "quick" and len(stages) > 1
    n_pilot = min(presets.PILOT_POINTS, max(4, int(correct.sum()) // presets.PILOT_SHARE))
    if measure and int(correct.sum()) >= 4 * n_pilot:
        pilot[np.flatnonzero(correct)[:n_pilot]] = True
        start = run.robust.copy()
        own: list[dict[str, Any]] = []
        for k, (name, atk) in enumerate(stages, start=1):
            if not getattr(atk, "white_box", False):
                continue  # gradient-free stages run last anyway: not worth a pilot
            set_seed(seed + k)
            summ, broke = run.stage(k, name, atk, mask=pilot, phase="pilot", start=start,
                                    stage_seed=seed + k)
            own.append({"stage": name, "points": n_pilot, "removed": int(broke),
                        "time_s": round(summ.time_s, 3),
                        "s_per_removal": (summ.time_s / broke) if broke else None,
                        "queries": int(summ.queries_total),
                        "queries_per_removal": (summ.queries_total / broke) if broke else None,
                        "gradient": bool(getattr(atk, "white_box", False))})
        own = _pilot_rows(stages, own)
        stages = _order_stages(stages, own)
        order_info = {"measured": True, "pilot_points": n_pilot, "stages": own,
                      "order": [nm for nm, _ in stages],
                      "rule": "gradient stages by model queries (forward and backward "
                              "passes) per removed pilot point (ascending; counted, not "
                              "timed, so one seed gives one order on any machine; "
                              "none removed: last, in preset order); gradient-free stages "
                              "after them in preset order (they are the masking check, and "
                              "the costliest per point on robust models), so the pilot "
                              "does not run them"}
    elif not custom:
        order_info["note"] = ("preset order (quick preset, black-box model or too few "
                              "correctly classified points for a pilot)")

    with _progress_bar(progress, len(stages)) as advance:
        for k, (name, atk) in enumerate(stages, start=1):
            advance(f"{name} ({k}/{len(stages)})")
            set_seed(seed + k)
            # the pilot already ran the gradient stages on its points; not the others
            piloted = bool(pilot.any()) and bool(getattr(atk, "white_box", False))
            run.stage(k, name, atk, mask=~pilot if piloted else None, phase="main",
                      stage_seed=seed + k)

    # escalation: the gradients lied (a gradient-free stage broke what gradient stages left)
    evidence = _masking_evidence(run.summaries)
    grad_info: dict[str, Any] = {}
    if escalate and white:
        pick = np.flatnonzero(correct)[: sanity.SANITY_POINTS]
        grad_info, _ = sanity.check_gradients(attack_model, xa[pick], ya[pick], [])
    zero_frac = grad_info.get("zero_grad_fraction") or 0.0
    # escalate on any two points (the masking *warning* asks more: its interval above a rate):
    # escalating costs at most the stated budget; a number the gradients lied about, more
    triggered = evidence["points"] >= 2 or zero_frac > sanity.ZERO_GRAD_SHARE
    escalations: list[dict[str, Any]] = []
    if escalate and triggered:
        escalations = _escalate(run, preset, norm, seed, len(stages), stages)
    evidence["zero_grad_fraction"] = zero_frac if grad_info else None
    evidence["escalated"] = bool(escalations)
    robust = run.robust
    first, summaries, stage_warnings = run.first, run.summaries, run.warnings
    stage_warnings += notes

    robust_acc = {eps_key(e): float(robust[j].mean()) for j, e in enumerate(eps_list)}
    clean_acc = float(correct.mean())
    examples = _examples(first, xa, ya, clean_pred, model.input_shape, n_examples)
    broken_by: list[str | None] = [None] * n
    broken_eps: list[float | None] = [None] * n
    for i in np.flatnonzero(~correct):
        broken_by[i], broken_eps[i] = "clean", 0.0
    for p, rec in first.items():
        broken_by[p], broken_eps[p] = str(rec["attack"]), float(rec["epsilon"])

    warnings = list(stage_warnings)
    sanity_info: dict[str, Any] = {}
    if sanity_checks:
        warnings += sanity.check_clean_accuracy(clean_acc, model.n_classes)
        warnings += sanity.check_rejected(summaries)
        warnings += sanity.check_monotone(summaries)
        warnings += sanity.check_black_box_after_white_box(summaries, n, evidence=evidence,
                                                           escalations=escalations)
        pick = np.flatnonzero(correct)[: sanity.SANITY_POINTS]
        info, w = sanity.check_randomized(model, xa[pick])
        sanity_info.update(info)
        warnings += w
        info, w = sanity.check_gradients(attack_model, xa[pick], ya[pick], summaries)
        sanity_info.update(info)
        warnings += w
        set_seed(seed)
        try:
            info, w = sanity.check_large_epsilon(model, xa[pick], ya[pick], norm=norm, seed=seed)
            sanity_info.update(info)
            warnings += w
        except Exception as exc:  # a failing check must not lose the scan
            sanity_info["large_eps_note"] = f"failed: {type(exc).__name__}: {exc}"

    from bastion import __version__

    return ScanReport(
        clean_accuracy=clean_acc,
        robust_accuracy=robust_acc,
        per_attack=summaries,
        n_points=n,
        norm=norm,  # type: ignore[arg-type]
        epsilons=eps_list,
        seed=int(seed),
        warnings=warnings,
        model=_model_info(model),
        data=_data_info(xa, ya, n_given, limit, correct, model),
        attacks=[name for name, _ in stages],
        preset="custom" if custom else preset,
        lower_bound=not custom and preset == "quick",
        robust_interval={eps_key(e): list(presets.wilson_interval(int(robust[j].sum()), n))
                         for j, e in enumerate(eps_list)},
        stage_order=order_info,
        escalations=escalations,
        masking_evidence=evidence,
        sanity=sanity_info,
        duration_s=time.perf_counter() - t_start,
        bastion_version=__version__,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        examples=examples,
        first_broken_by=broken_by,
        first_broken_eps=broken_eps,
    )


# --------------------------------------------------------------------------- validation


def _check_model(model: Any) -> None:
    missing = [a for a in ("predict_proba", "n_classes", "input_shape", "bounds")
               if not hasattr(model, a)]
    if missing:
        raise ModelError(
            f"{type(model).__name__} is not a Bastion model: it lacks {', '.join(missing)}",
            hint="wrap it with bastion.models (e.g. TorchModel) first",
        )


def _check_epsilons(
    epsilons: Sequence[float] | float | None, norm: str, bounds: tuple[float, float]
) -> list[float]:
    width = float(bounds[1]) - float(bounds[0])
    if epsilons is None:
        return [e * width for e in DEFAULT_EPSILONS[norm]]
    if isinstance(epsilons, int | float):
        epsilons = [float(epsilons)]
    eps = [float(e) for e in epsilons]
    if not eps:
        raise BastionError(
            "the epsilon list is empty", hint="give at least one budget, e.g. epsilons=[0.1]"
        )
    for e in eps:
        if not math.isfinite(e) or e < 0:
            raise BastionError(
                f"epsilon must be a finite number >= 0, got {e}",
                hint="budgets are perturbation sizes in input units, e.g. 8/255 for linf",
            )
    out: list[float] = []
    for e in sorted(eps):
        if not out or not math.isclose(e, out[-1], rel_tol=1e-9, abs_tol=1e-12):
            out.append(e)
    return out


def _check_ints(limit: int | None, batch_size: int, n_examples: int) -> tuple[int | None, int, int]:
    if limit is not None and (int(limit) != limit or limit < 1):
        raise BastionError(f"limit must be an integer >= 1, got {limit}",
                           hint="or pass limit=None to use every point")
    if int(batch_size) != batch_size or batch_size < 1:
        raise BastionError(f"batch_size must be an integer >= 1, got {batch_size}")
    if int(n_examples) != n_examples or n_examples < 0:
        raise BastionError(f"n_examples must be an integer >= 0, got {n_examples}")
    return (None if limit is None else int(limit)), int(batch_size), int(n_examples)


def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _check_data(
    model: Any, x: Any, y: Any, limit: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    try:
        xa = _to_numpy(x).astype(np.float32, copy=False)
    except (TypeError, ValueError) as exc:
        raise DataError(f"x is not a numeric array: {exc}") from exc
    shape = tuple(int(s) for s in model.input_shape)
    if xa.shape == shape:
        raise DataError(
            f"x has the shape of one input {shape}, not a batch",
            hint="add a batch dimension, e.g. x[None]",
        )
    if xa.ndim == 0 or tuple(xa.shape[1:]) != shape:
        raise DataError(
            f"x has shape {tuple(xa.shape)}, but the model takes batches of shape "
            f"(n, {', '.join(map(str, shape))})",
            hint="reshape the inputs (e.g. add the channel axis for images) or use the "
            "model the data was made for",
        )
    n_given = int(xa.shape[0])
    if n_given == 0:
        raise DataError("x is empty", hint="pass at least one input")
    ya_raw = _to_numpy(y)
    if ya_raw.ndim == 2 and ya_raw.shape == (n_given, model.n_classes):
        raise DataError("y looks one-hot encoded", hint="pass class indices, e.g. y.argmax(1)")
    if ya_raw.ndim != 1:
        raise DataError(f"y must be a 1-D array of labels, got shape {tuple(ya_raw.shape)}")
    if len(ya_raw) != n_given:
        raise DataError(f"x has {n_given} inputs but y has {len(ya_raw)} labels",
                        hint="pass one label per input")
    if limit is not None:
        xa, ya_raw = xa[:limit], ya_raw[:limit]
    xa = np.ascontiguousarray(xa)
    bad = ~np.isfinite(xa.reshape(len(xa), -1)).all(axis=1)
    if bad.any():
        raise DataError(
            f"x has NaN or infinite values in {int(bad.sum())} input(s) "
            f"(first at index {int(np.flatnonzero(bad)[0])})",
            hint="drop or impute those inputs before scanning",
        )
    lo, hi = float(model.bounds[0]), float(model.bounds[1])
    xmin, xmax = float(xa.min()), float(xa.max())
    tol = 1e-6 * max(1.0, abs(lo), abs(hi))
    if xmin < lo - tol or xmax > hi + tol:
        raise DataError(
            f"x has values in [{xmin:.4g}, {xmax:.4g}], outside the model's bounds "
            f"[{lo:.4g}, {hi:.4g}]",
            hint="scale the inputs to the bounds (e.g. divide pixels by 255) or build the "
            "model with the bounds the data really has",
        )
    if not np.issubdtype(ya_raw.dtype, np.integer):
        if not (np.issubdtype(ya_raw.dtype, np.number) and np.all(ya_raw == np.round(ya_raw))):
            raise DataError("y must hold integer class labels", hint="e.g. y.astype(int)")
    ya = ya_raw.astype(np.int64)
    out = (ya < 0) | (ya >= model.n_classes)
    if out.any():
        raise DataError(
            f"{int(out.sum())} label(s) outside [0, {model.n_classes}) (e.g. "
            f"{int(ya[out][0])} at index {int(np.flatnonzero(out)[0])})",
            hint="map labels to 0..n_classes-1, or use a model with more classes",
        )
    return xa, ya, n_given


def _resolve_attacks(
    model: Any,
    attacks: Sequence[str | Attack] | None,
    *,
    norm: str,
    seed: int,
    options: Mapping[str, Mapping[str, Any]] | None,
    preset: str = "quick",
) -> list[tuple[str, Attack]]:
    from bastion.attacks import ATTACKS, get_attack

    white = is_white_box(model)
    base: dict[str, dict[str, Any]] = {}
    if attacks is None and white:
        staged = presets.preset_stages(preset, norm)
        attacks = [nm for nm, _ in staged]
        base = {nm: o for nm, o in staged}
    elif attacks is None:
        attacks = list(BLACK_BOX_CASCADE)
    elif isinstance(attacks, str):
        attacks = [attacks]
    attacks = list(attacks)
    if not attacks:
        raise BastionError("the attack list is empty",
                           hint=f"name at least one of: {', '.join(ATTACKS)}")
    opts = {str(k).lower().replace("_", "-"): dict(v) for k, v in (options or {}).items()}
    names = [a.lower().replace("_", "-") for a in attacks if isinstance(a, str)]
    stray = [k for k in opts if k not in names]
    if stray:
        raise BastionError(
            f"attack_options names {', '.join(stray)}, which is not in the cascade "
            f"{', '.join(names) or '(attack objects only)'}",
            hint="check the spelling, or add the attack to attacks=[...]",
        )
    out: list[tuple[str, Attack]] = []
    for a in attacks:
        if isinstance(a, str):
            name = a.lower().replace("_", "-")
            atk = get_attack(name, norm=norm, seed=seed,
                             **{**base.get(name, {}), **opts.get(name, {})})
        elif isinstance(a, FixedEpsilonAttack | MinimalAttack):
            atk = a
            name = str(getattr(a, "name", type(a).__name__))
        else:
            raise BastionError(
                f"{a!r} is neither an attack name nor an attack object",
                hint=f"use names from: {', '.join(ATTACKS)}",
            )
        if not isinstance(atk, FixedEpsilonAttack | MinimalAttack):
            raise BastionError(f"{name} is not a fixed-epsilon or minimal attack")
        atk_norm = getattr(atk, "norm", norm)
        if isinstance(atk_norm, str) and atk_norm != norm:
            raise BastionError(
                f"attack {name} works in norm {atk_norm}, but the scan is in {norm}",
                hint=f"build it with norm={norm!r}",
            )
        if getattr(atk, "white_box", False) and not white:
            raise ModelError(
                f"attack {name} needs gradients, but the model is black-box (no logits)",
                hint="use black-box attacks (square, hsj) or a white-box model adapter",
            )
        out.append((name, atk))
    return out


# --------------------------------------------------------------------------- running


def _predict(model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    if not len(x):
        return np.zeros(0, dtype=np.int64)
    parts = [np.asarray(model.predict_proba(x[i : i + batch_size])).argmax(1)
             for i in range(0, len(x), batch_size)]
    return np.concatenate(parts).astype(np.int64)


def _norms(delta: np.ndarray, norm: str) -> np.ndarray:
    d = delta.reshape(len(delta), -1).astype(np.float64)
    if norm == "linf":
        return np.abs(d).max(axis=1) if d.shape[1] else np.zeros(len(d))
    return np.sqrt((d * d).sum(axis=1))


def _verify(
    model: Any, x: np.ndarray, y: np.ndarray, x_adv: np.ndarray, claimed: np.ndarray,
    norm: str, batch_size: int, eps: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-check claimed successes on the model: ``(verified, norms, adv_pred)``."""
    x_adv = np.asarray(x_adv, dtype=np.float32)
    pn = _norms(x_adv - x, norm)
    adv_pred = np.full(len(x), -1, dtype=np.int64)
    idx = np.flatnonzero(claimed)
    if len(idx):
        adv_pred[idx] = _predict(model, x_adv[idx], batch_size)
    lo, hi = float(model.bounds[0]), float(model.bounds[1])
    tol_b = 1e-6 * max(1.0, abs(lo), abs(hi))
    flat = x_adv.reshape(len(x_adv), -1)
    in_bounds = (flat.min(axis=1) >= lo - tol_b) & (flat.max(axis=1) <= hi + tol_b)
    ok = claimed & (adv_pred != y) & (adv_pred >= 0) & in_bounds
    if eps is not None:
        ok &= pn <= eps * (1 + 1e-4) + 1e-6
    return ok, pn, adv_pred


def _empty_stats(n_eps: int, n: int) -> dict[str, Any]:
    return {
        "broken": np.zeros((n_eps, n), dtype=bool),
        "attacked": np.zeros((n_eps, n), dtype=bool),
        "success": np.zeros((n_eps, n), dtype=bool),
        "records": [],
        "queries": 0,
        "time_s": 0.0,
        "grad": [],
        "rejected": 0,
        "kind": "fixed",
        "margin": np.full((n_eps, n), np.nan),
    }


def _chunks(idx: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(idx), size):
        yield idx[i : i + size]


def _point_kw(atk: Any, c: np.ndarray) -> dict[str, Any]:
    """``point_ids=c`` when the attack's ``run`` takes it: each point's random numbers are
    keyed by its index in the evaluation set, so its result does not depend on its batch
    (or the worker it ran on)."""
    try:
        params = inspect.signature(atk.run).parameters
    except (TypeError, ValueError):
        return {}
    return {"point_ids": np.asarray(c, dtype=np.int64)} if "point_ids" in params else {}


def _shard_size(engine: Any, n_todo: int, batch_size: int) -> int:
    """Points per call: ``batch_size`` locally; on several workers one shard per worker
    (at most ``batch_size`` points): an attack's per-iteration cost is partly fixed, so
    smaller shards than that cost more in all. (Random numbers are per point, so the split
    does not change what an attack finds.)"""
    workers = int(getattr(engine, "workers", 1) or 1)
    if workers <= 1 or n_todo <= 0:
        return batch_size
    return max(1, min(batch_size, math.ceil(n_todo / workers)))


def _fixed_shard(item: tuple[np.ndarray, list[int]], *, atk: FixedEpsilonAttack, model: Any,
                 attack_model: Any, x: np.ndarray, y: np.ndarray, eps_list: list[float],
                 norm: str, batch_size: int, stage_seed: int) -> dict[str, Any]:
    """One shard of a fixed-epsilon stage (runs on an engine worker): the attack on the
    points ``c`` at the epsilons ``cols``, every claimed success verified on ``model``."""
    c, cols = item
    set_seed(stage_seed)
    res = atk.run(model if attack_model is None else attack_model, x[c], y[c],
                  epsilons=[eps_list[j] for j in cols], **_point_kw(atk, c))
    succ_all = np.asarray(res.success).reshape(len(cols), len(c)).astype(bool)
    adv_all = np.asarray(res.x_adv)
    g = res.extra.get("grad_norm_mean") if res.extra else None
    out: dict[str, Any] = {"queries": int(np.asarray(res.queries).sum()),
                           "grad": float(g) if isinstance(g, int | float | np.floating)
                           else None, "per_eps": []}
    for jj, j in enumerate(cols):
        ok, pn, apred = _verify(model, x[c], y[c], adv_all[jj], succ_all[jj], norm,
                                batch_size, eps_list[j])
        keep = np.flatnonzero(ok)  # only the verified adversarials travel back
        pe: dict[str, Any] = {"claimed": succ_all[jj], "ok": ok, "pn": pn, "apred": apred,
                              "adv": {int(p): adv_all[jj][p].copy() for p in keep}}
        if not getattr(atk, "white_box", False):
            # how close the random search came on the points it did not break (one forward
            # pass each): the escalation restarts the closest first
            pe["margin"] = _margins(model, x[c], y[c], adv_all[jj], ok, batch_size)
        out["per_eps"].append(pe)
    return out


def _margins(model: Any, x: np.ndarray, y: np.ndarray, x_adv: np.ndarray, done: np.ndarray,
             batch_size: int) -> np.ndarray:
    """The probability margin (true class minus the best other) at ``x_adv`` for the points
    not ``done``, NaN for the others."""
    out = np.full(len(y), np.nan)
    rest = np.flatnonzero(~done)
    if not len(rest):
        return out
    xa = np.asarray(x_adv, dtype=np.float32)[rest]
    p = np.concatenate([np.asarray(model.predict_proba(xa[i:i + batch_size]), dtype=np.float64)
                        for i in range(0, len(xa), batch_size)])
    rows = np.arange(len(rest))
    true = p[rows, y[rest]].copy()
    p[rows, y[rest]] = -np.inf
    out[rest] = true - p.max(axis=1)
    return out


def _run_fixed(
    atk: FixedEpsilonAttack, model: Any, x: np.ndarray, y: np.ndarray, robust: np.ndarray,
    eps_list: list[float], norm: str, batch_size: int, attack_model: Any = None,
    engine: Any = None, shared: dict[str, Any] | None = None, stage_seed: int = 0,
) -> dict[str, Any]:
    """One call per chunk covers every epsilon at which the chunk's points still stand
    (so the attack's clean pass runs once per point, not once per epsilon). Points are
    grouped by how many epsilons they still stand at (robustness only falls with epsilon).
    The chunks run on ``engine`` (local by default) and are merged in order."""
    st = _empty_stats(len(eps_list), len(y))
    t0 = time.perf_counter()
    recorded: set[int] = set()
    depth = robust.sum(axis=0)  # point i stands at eps_list[:depth[i]]
    items: list[tuple[np.ndarray, list[int]]] = []
    for k in sorted({int(d) for d in depth if d > 0}, reverse=True):
        cols = [j for j in range(k) if eps_list[j] > 0]  # nothing moves inside a zero budget
        if not cols:
            continue
        idx = np.flatnonzero(depth == k)
        items += [(c, cols) for c in _chunks(idx, _shard_size(engine, len(idx), batch_size))]
    eng, sh = _engine_and_shared(engine, shared, model, attack_model, x, y)
    results = eng.map(_fixed_shard, items, shared={**sh, "atk": atk, "eps_list": eps_list,
                                                   "norm": norm, "batch_size": batch_size,
                                                   "stage_seed": stage_seed})
    for (c, cols), r in zip(items, results, strict=True):
        st["queries"] += r["queries"]
        if r["grad"] is not None:
            st["grad"].append((r["grad"], len(c)))
        for jj, j in enumerate(cols):
            e = eps_list[j]
            pe = r["per_eps"][jj]
            ok = pe["ok"]
            st["rejected"] += int((pe["claimed"] & ~ok).sum())
            st["attacked"][j, c] = True
            st["success"][j, c] = ok
            st["broken"][j, c] = ok
            if "margin" in pe:
                st["margin"][j, c] = pe["margin"]
            for p in np.flatnonzero(ok):
                if int(c[p]) in recorded:
                    continue  # epsilons ascend: the first record is the smallest budget
                recorded.add(int(c[p]))
                st["records"].append(
                    (int(c[p]), e, {"x_adv": pe["adv"][int(p)],
                                    "adv_pred": int(pe["apred"][p]), "norm": float(pe["pn"][p])})
                )
    st["time_s"] = time.perf_counter() - t0
    return st


def _engine_and_shared(engine: Any, shared: dict[str, Any] | None, model: Any,
                       attack_model: Any, x: np.ndarray, y: np.ndarray
                       ) -> tuple[Any, dict[str, Any]]:
    if engine is None:
        from bastion.engine import LocalEngine

        engine = LocalEngine()
    if shared is None:  # once per scan; the attack model only when it is another object
        shared = engine.share(model=model, x=x, y=y)
        shared["attack_model"] = (None if attack_model is None or attack_model is model
                                  else engine.share(m=attack_model)["m"])
    return engine, shared


def _minimal_shard(c: np.ndarray, *, atk: MinimalAttack, model: Any, attack_model: Any,
                   x: np.ndarray, y: np.ndarray, norm: str, batch_size: int,
                   stage_seed: int) -> dict[str, Any]:
    """One shard of a minimal-perturbation stage (runs on an engine worker)."""
    set_seed(stage_seed)
    res = atk.run(model if attack_model is None else attack_model, x[c], y[c],
                  **_point_kw(atk, c))
    claimed = np.asarray(res.success).reshape(-1, len(c))[0].astype(bool)
    x_adv = np.asarray(res.x_adv)[0]
    ok, pn, apred = _verify(model, x[c], y[c], x_adv, claimed, norm, batch_size, None)
    g = res.extra.get("grad_norm_mean") if res.extra else None
    return {"claimed": claimed, "ok": ok, "pn": pn, "apred": apred,
            "adv": {int(p): x_adv[p].copy() for p in np.flatnonzero(ok)},
            "queries": int(np.asarray(res.queries).sum()),
            "grad": float(g) if isinstance(g, int | float | np.floating) else None}


def _run_minimal(
    atk: MinimalAttack, model: Any, x: np.ndarray, y: np.ndarray, robust: np.ndarray,
    eps_list: list[float], norm: str, batch_size: int, attack_model: Any = None,
    engine: Any = None, shared: dict[str, Any] | None = None, stage_seed: int = 0,
) -> dict[str, Any]:
    st = _empty_stats(len(eps_list), len(y))
    st["kind"] = "minimal"
    t0 = time.perf_counter()
    live = np.array([e > 0 for e in eps_list])
    idx = np.flatnonzero((robust & live[:, None]).any(axis=0))
    items = list(_chunks(idx, _shard_size(engine, len(idx), batch_size)))
    eng, sh = _engine_and_shared(engine, shared, model, attack_model, x, y)
    results = eng.map(_minimal_shard, items, shared={**sh, "atk": atk, "norm": norm,
                                                     "batch_size": batch_size,
                                                     "stage_seed": stage_seed})
    for c, r in zip(items, results, strict=True):
        ok, pn, apred = r["ok"], r["pn"], r["apred"]
        st["rejected"] += int((r["claimed"] & ~ok).sum())
        st["queries"] += r["queries"]
        if r["grad"] is not None:
            st["grad"].append((r["grad"], len(c)))
        first_recorded: set[int] = set()
        for j, e in enumerate(eps_list):
            if e <= 0:
                continue
            at = robust[j, c]
            succ = ok & (pn <= e * (1 + 1e-4) + 1e-6)
            st["attacked"][j, c] = at
            st["success"][j, c] = succ & at
            st["broken"][j, c] = succ & at
            for p in np.flatnonzero(succ & at):
                if p in first_recorded:
                    continue
                first_recorded.add(int(p))
                st["records"].append(
                    (int(c[p]), e, {"x_adv": r["adv"][int(p)], "adv_pred": int(apred[p]),
                                    "norm": float(pn[p])})
                )
    st["time_s"] = time.perf_counter() - t0
    return st


class _Cascade:
    """The scan's running state: which points still stand at which epsilon, the first
    break of every point, the per-stage summaries and stage failures."""

    def __init__(self, model: Any, attack_model: Any, x: np.ndarray, y: np.ndarray,
                 robust: np.ndarray, eps_list: list[float], norm: str, batch_size: int,
                 n_examples: int, engine: Any = None) -> None:
        self.model, self.attack_model = model, attack_model
        self.x, self.y, self.robust = x, y, robust
        self.eps_list, self.norm, self.batch_size = eps_list, norm, batch_size
        self.n_examples = n_examples
        self.first: dict[int, dict[str, Any]] = {}
        self.summaries: list[AttackSummary] = []
        self.warnings: list[str] = []
        self.last_own = np.zeros(len(y), dtype=bool)
        # the smallest margin a gradient-free search reached on each point it did not
        # break, per epsilon (NaN: not searched): how close the point came to falling
        self.margin = np.full(robust.shape, np.nan)
        # the model and the data go into the engine's object store once, for every stage
        self.engine, self.shared = _engine_and_shared(engine, None, model, attack_model, x, y)

    def stage(self, k: int, name: str, atk: Attack, *, mask: np.ndarray | None = None,
              phase: str = "main", round_: int = 0, start: np.ndarray | None = None,
              stage_seed: int = 0) -> tuple[AttackSummary, int]:
        """Run one stage on the points still standing (within ``mask``; from ``start``
        instead of the current state for a pilot, where every stage runs on its own).
        Returns its summary and the number of points it broke on its own."""
        n = len(self.y)
        before = self.robust.copy()
        todo = (before if start is None else start) & (
            np.ones(n, dtype=bool) if mask is None else mask)[None]
        error = None
        try:
            if isinstance(atk, MinimalAttack):
                stats = _run_minimal(atk, self.model, self.x, self.y, todo, self.eps_list,
                                     self.norm, self.batch_size, self.attack_model,
                                     self.engine, self.shared, stage_seed)
            else:
                stats = _run_fixed(cast(FixedEpsilonAttack, atk), self.model, self.x, self.y,
                                   todo, self.eps_list, self.norm, self.batch_size,
                                   self.attack_model, self.engine, self.shared, stage_seed)
        except BastionError:
            raise
        except Exception as exc:  # an attack bug must not lose the whole scan
            stats = _empty_stats(len(self.eps_list), n)
            error = f"{type(exc).__name__}: {exc}"
            self.warnings.append(
                f"Attack {name} failed and was skipped ({error}); the robust accuracy "
                "is an overestimate by whatever it would have found. Fix the attack "
                "options or drop it from the list."
            )
        m = stats.get("margin")
        if m is not None and start is None:
            self.margin = np.fmin(self.margin, m)
        own_mask = (stats["broken"] & todo).any(axis=0)
        own = int(own_mask.sum())
        self.last_own = own_mask
        broken = stats["broken"] & before
        self.robust = np.logical_and.accumulate(before & ~broken, axis=0)
        for i, e, adv in stats["records"]:
            if not before[_eps_index(self.eps_list, e), i]:
                continue
            if i not in self.first or e < self.first[i]["epsilon"]:
                self.first[i] = {**adv, "epsilon": e, "attack": name}
        # only the examples need the adversarial inputs: keep those of the lowest
        # indices (the gallery picks by index), drop the rest to bound memory
        keep = set(sorted(self.first)[: self.n_examples])
        for i, rec in self.first.items():
            if i not in keep:
                rec.pop("x_adv", None)
        summ = _summary(k, name, atk, stats, before, self.robust, self.eps_list, n, error)
        summ.phase, summ.round = phase, round_  # type: ignore[assignment]
        self.summaries.append(summ)
        return summ, own


class TransferAttack(FixedEpsilonAttack):
    """APGD-CE on a white-box ``surrogate``; the scan verifies every input on the real
    model (a transfer attack: no gradient of the real model is used)."""

    name = "transfer"
    white_box = False

    def __init__(self, surrogate: Any, *, norm: str, seed: int = 0, steps: int = 100) -> None:
        from bastion.attacks import get_attack

        if not is_white_box(surrogate):
            raise BastionError("the surrogate must be a white-box model (with logits)",
                               hint="wrap a torch module in TorchModel")
        self.surrogate, self.norm, self.seed = surrogate, norm, seed
        self.inner = cast(FixedEpsilonAttack,
                          get_attack("apgd-ce", norm=norm, seed=seed, steps=steps))

    def run(self, model: object, x: np.ndarray, y: np.ndarray, *,
            epsilons: Sequence[float], target: np.ndarray | None = None,
            point_ids: np.ndarray | None = None) -> Any:
        res = self.inner.run(self.surrogate, x, y, epsilons=epsilons, target=target,
                             point_ids=point_ids)
        res.attack = self.name
        return res

    def __repr__(self) -> str:
        return f"TransferAttack(surrogate={getattr(self.surrogate, 'name', '?')}, {self.inner!r})"


def _attack_model(model: Any, x: np.ndarray, preset: str, custom: bool, eot_samples: int,
                  bpda: Any) -> tuple[Any, list[str]]:
    """The model the attacks see: EOT over a randomised model (``thorough``), BPDA through
    a declared approximation. Predictions are always verified on the real model."""
    notes: list[str] = []
    out = model
    if preset == "thorough" and not custom:
        info, _ = sanity.check_randomized(model, x[: sanity.SANITY_POINTS])
        change = info.get("output_change_on_repeat") or 0.0
        if change > sanity.RANDOM_TOL:
            out = presets.EOTModel(model, eot_samples)
            notes.append(f"The model is randomised (outputs moved by {change:.3g} on a repeat "
                         f"query): the attacks saw the average of {eot_samples} draws (EOT).")
    if bpda is not None:
        if not is_white_box(model) and not callable(getattr(model, "predict_proba", None)):
            raise ModelError("bpda needs a model with predict_proba")
        out = presets.BPDAModel(out, bpda)
    return out, notes


def _pilot_rows(stages: list[tuple[str, Attack]], rows: list[dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """One row per stage, in stage order; gradient-free stages (not run in the pilot) get
    an empty measurement."""
    by_name = {r["stage"]: r for r in rows}
    return [by_name.get(nm, {"stage": nm, "points": 0, "removed": 0, "time_s": 0.0,
                             "s_per_removal": None, "queries": 0,
                             "queries_per_removal": None, "gradient": False})
            for nm, _ in stages]


def _order_stages(stages: list[tuple[str, Attack]], own: list[dict[str, Any]]
                  ) -> list[tuple[str, Attack]]:
    """Gradient stages by model queries per removed pilot point (none removed: last, in
    preset order), then the gradient-free stages in preset order. Queries, not seconds:
    wall time depends on the machine and its load, and the order must not (one seed, one
    report)."""
    grad = [(i, st) for i, st in enumerate(stages) if own[i]["gradient"]]
    free = [st for i, st in enumerate(stages) if not own[i]["gradient"]]

    def key(item: tuple[int, tuple[str, Attack]]) -> tuple[int, float, int]:
        i = item[0]
        spr = own[i]["queries_per_removal"]
        return (0, float(spr), i) if spr is not None else (1, 0.0, i)

    return [st for _, st in sorted(grad, key=key)] + free


def _masking_evidence(summaries: Sequence[AttackSummary]) -> dict[str, Any]:
    """Points gradient-free stages broke that the gradient stages before them left
    standing (main phase), per stage. (The pilot's share is added by the caller: points a
    gradient-free stage broke there that no gradient stage broke on its own.)"""
    by_stage: dict[str, int] = {}
    seen_white = False
    for s in summaries:
        if s.phase != "main":
            continue
        if s.white_box:
            seen_white = True
        elif seen_white and s.points_broken > 0:
            by_stage[f"{s.stage}. {s.name}"] = int(s.points_broken)
    return {"points": int(sum(by_stage.values())), "by_stage": by_stage,
            "gradient_stages": [s.name for s in summaries if s.white_box and s.phase == "main"]}


def _escalate(run: _Cascade, preset: str, norm: str, seed: int, k0: int,
              stages: Sequence[tuple[str, Attack]]) -> list[dict[str, Any]]:
    """Restarts of Square with the preset's full budget and schedule, each with a new seed,
    on the surviving points that came closest to falling: the ``ESCALATION_SHARE`` of the
    survivors with the smallest margin any gradient-free search reached (a point a random
    search left just short of the boundary is the one another draw breaks; a fresh short
    search on every survivor breaks almost none on a robust model). Rounds go on until one
    removes nothing, ``MAX_ROUNDS`` ran, or the budget (``ESCALATION_BUDGET`` times the
    preset's Square queries per point standing when escalation began, over all rounds) is
    spent. Each round ranks the survivors again, so a point that stays close is restarted
    again."""
    from bastion.attacks import get_attack

    base_q = next((int(getattr(a, "max_queries", 0)) for _, a in stages
                   if getattr(a, "name", "") == "square"), 1000) or 1000
    budget = int(presets.ESCALATION_BUDGET.get(preset, 3.0) * base_q)  # queries per point
    share = presets.ESCALATION_SHARE.get(preset, 0.2)
    standing0 = int(run.robust.any(axis=0).sum())
    rounds: list[dict[str, Any]] = []
    spent = 0.0  # queries per point standing at the start, over all rounds
    for r in range(1, presets.MAX_ROUNDS.get(preset, 3) + 1):
        standing = run.robust.any(axis=0)
        n_stand = int(standing.sum())
        k = min(n_stand, max(1, math.ceil(share * n_stand)))
        cost = base_q * k / max(standing0, 1)
        if not n_stand or spent + cost > budget + 1e-9:
            break
        # closeness: the smallest margin at an epsilon the point still stands at (a point
        # no gradient-free search has seen ranks after every measured one)
        marg = np.where(run.robust & ~np.isnan(run.margin), run.margin, np.inf)
        close = marg.min(axis=0)
        cand = np.flatnonzero(standing)
        pick = cand[np.argsort(close[cand], kind="stable")[:k]]
        mask = np.zeros(len(run.y), dtype=bool)
        mask[pick] = True
        atk = get_attack("square", norm=norm, seed=seed + 1000 * r, max_queries=base_q,
                         p_init=presets.SQUARE_P_INIT[norm])
        set_seed(seed + 1000 * r)
        summ, removed = run.stage(k0 + r, f"square-escalation-{r}", atk, phase="escalation",
                                  mask=mask, round_=r, stage_seed=seed + 1000 * r)
        spent += cost
        worst = float(close[pick].max()) if len(pick) else float("nan")
        rounds.append({"round": r, "attack": "square", "max_queries": base_q,
                       "seed": seed + 1000 * r, "points_attacked": summ.points_attacked,
                       "share_of_survivors": round(k / max(n_stand, 1), 4),
                       "margin_cutoff": worst if math.isfinite(worst) else None,
                       "removed": removed, "time_s": round(summ.time_s, 3),
                       "queries_per_point_spent": round(spent, 1)})
        if removed == 0:
            break
    if rounds:
        rounds[-1]["budget_queries_per_point"] = budget
    return rounds


def _eps_index(eps_list: list[float], e: float) -> int:
    return eps_list.index(e)


def _summary(
    k: int, name: str, atk: Attack, st: dict[str, Any], before: np.ndarray,
    after: np.ndarray, eps_list: list[float], n: int, error: str | None,
) -> AttackSummary:
    attacked, success = st["attacked"], st["success"]
    # an inversion: broken by this attack at a smaller epsilon, attacked and missed at a larger
    hit = success & attacked
    seen = np.logical_or.accumulate(hit, axis=0)
    prev = np.vstack([np.zeros((1, n), dtype=bool), seen[:-1]])
    inversions = int((attacked & ~success & prev).any(axis=0).sum())
    n_att = int(attacked.any(axis=0).sum())
    grads = st["grad"]
    gmean = (sum(g * w for g, w in grads) / sum(w for _, w in grads)) if grads else None
    newly = before & ~after
    kind: Literal["fixed", "minimal"] = (
        "minimal" if isinstance(atk, MinimalAttack) else "fixed"
    )
    return AttackSummary(
        stage=k,
        name=name,
        kind=kind,
        white_box=bool(getattr(atk, "white_box", False)),
        params=repr(atk),
        points_attacked=n_att,
        points_attacked_per_eps={
            eps_key(e): int(attacked[j].sum()) for j, e in enumerate(eps_list)
        },
        newly_broken={eps_key(e): int(newly[j].sum()) for j, e in enumerate(eps_list)},
        points_broken=int(newly.any(axis=0).sum()),
        success_rate={
            eps_key(e): (float(success[j].sum() / attacked[j].sum()) if attacked[j].any() else None)
            for j, e in enumerate(eps_list)
        },
        robust_accuracy_after={eps_key(e): float(after[j].mean()) for j, e in enumerate(eps_list)},
        queries_total=int(st["queries"]),
        queries_mean=float(st["queries"] / n_att) if n_att else 0.0,
        time_s=float(st["time_s"]),
        grad_norm_mean=None if gmean is None else float(gmean),
        non_monotone_points=inversions,
        rejected=int(st["rejected"]),
        error=error,
    )


# --------------------------------------------------------------------------- report parts


def _is_image(shape: Sequence[int]) -> bool:
    return len(shape) in (2, 3)


def _examples(
    first: dict[int, dict[str, Any]], x: np.ndarray, y: np.ndarray, clean_pred: np.ndarray,
    shape: Sequence[int], n_examples: int,
) -> list[Example]:
    out = []
    store_pixels = _is_image(shape) and int(np.prod(shape)) <= MAX_EXAMPLE_VALUES
    for i in sorted(first)[:n_examples]:
        r = first[i]
        xc, xv = x[i], np.asarray(r["x_adv"], dtype=np.float32)
        changes = None
        if len(shape) == 1:
            d = (xv - xc).astype(np.float64)
            top = np.argsort(-np.abs(d), kind="stable")[:5]
            changes = [
                {"feature": int(f), "clean": round(float(xc[f]), 6), "adv": round(float(xv[f]), 6),
                 "delta": round(float(d[f]), 6)}
                for f in top if d[f] != 0
            ]
        out.append(
            Example(
                index=int(i),
                true_label=int(y[i]),
                clean_pred=int(clean_pred[i]),
                adv_pred=int(r["adv_pred"]),
                epsilon=float(r["epsilon"]),
                attack=str(r["attack"]),
                perturbation_norm=float(r["norm"]),
                x_clean=np.round(xc.astype(np.float64), 4).tolist() if store_pixels else None,
                x_adv=np.round(xv.astype(np.float64), 4).tolist() if store_pixels else None,
                feature_changes=changes,
            )
        )
    return out


def _model_info(model: Any) -> dict[str, Any]:
    return {
        "name": str(getattr(model, "name", type(model).__name__)),
        "class": type(model).__name__,
        "input_shape": [int(s) for s in model.input_shape],
        "n_classes": int(model.n_classes),
        "bounds": [float(model.bounds[0]), float(model.bounds[1])],
        "white_box": is_white_box(model),
    }


def _data_info(
    x: np.ndarray, y: np.ndarray, n_given: int, limit: int | None, correct: np.ndarray,
    model: Any,
) -> dict[str, Any]:
    labels, counts = np.unique(y, return_counts=True)
    return {
        "n_given": n_given,
        "n_points": int(len(y)),
        "limit": limit,
        "kind": "image" if _is_image(model.input_shape) else "tabular",
        "x_min": float(x.min()),
        "x_max": float(x.max()),
        "clean_correct": int(correct.sum()),
        "label_counts": {str(int(k)): int(v) for k, v in zip(labels, counts, strict=True)},
    }


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Any]:
    if not enabled:  # one line per stage for whoever listens (the CLI, when not a TTY)
        yield lambda desc: logging.getLogger("bastion.progress").info("scan: %s", desc)
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()) as prog:
        task = prog.add_task("scan", total=total)
        started = [False]

        def advance(desc: str) -> None:
            if started[0]:
                prog.advance(task)
            started[0] = True
            prog.update(task, description=f"scan: {desc}")

        yield advance
        prog.update(task, completed=total)
