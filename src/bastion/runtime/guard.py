"""The guarded model: detectors in the request path and a declarative policy.

:class:`GuardedModel` answers a batch of inputs for one client. For every input it runs
each detector (scores against calibrated thresholds), the optional per-client extraction
detector, and the quarantine list; the :class:`GuardPolicy` turns what fired into a
verdict (``allow``, ``flag`` or ``block``) and says which model answers: the champion,
the fallback (e.g. a hardened or smoothed model), or none (a refused, blocked request).
Every :class:`GuardDecision` carries every detector's score, the reasons (each check that
fired: detector, score, threshold, action) and which model answered and why.

With an :class:`~bastion.store.events.EventStore`, each answer is written as a
``prediction`` event (plus a ``verdict`` event when flagged or blocked) and the guard
reads the shared state the healing controller writes: quarantined clients
(``quarantined_clients``), where traffic goes (``traffic``: ``champion`` or
``fallback``) and how it is tuned (``guard_tuning``, see :class:`GuardTuning`: every
detector's threshold moved to ``fpr_scale`` times its calibrated false-positive rate, and
optionally every input squeezed to ``squeeze_bits`` bits before a model answers it).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from bastion.errors import BastionError, DataError
from bastion.store import events as ev

Action = Literal["ignore", "flag", "block"]
Verdict = Literal["allow", "flag", "block"]

#: shared-state keys (in the event store) the guard reads and the controller writes
STATE_QUARANTINE = "quarantined_clients"
STATE_TRAFFIC = "traffic"
STATE_TUNING = "guard_tuning"


class GuardTuning(BaseModel):
    """What the healing controller may turn at run time (state ``guard_tuning``).

    - ``fpr_scale``: every detector that kept its calibration scores fires at the
      threshold it would have had at ``fpr_scale`` times its calibrated false-positive
      rate (``2``: flags about twice as much clean traffic, and more attacks; ``0.5``:
      half). Detectors calibrated some other way keep their threshold.
    - ``squeeze_bits``: when set, each input is reduced to ``2**bits`` levels per feature
      (feature squeezing, Xu et al. 2018) before the champion or the fallback answers
      it; the detectors still score the input as sent. An attacker who knows it adapts
      (BPDA breaks squeezing): it buys time against a fixed attack, not robustness.
    """

    model_config = ConfigDict(extra="forbid")

    fpr_scale: float = Field(default=1.0, gt=0.0, le=50.0)
    squeeze_bits: int | None = Field(default=None, ge=1, le=16)

    @property
    def is_default(self) -> bool:
        return self.fpr_scale == 1.0 and self.squeeze_bits is None

    @classmethod
    def read(cls, store: ev.EventStore) -> GuardTuning:
        """The tuning in ``store`` (the default when unset or unreadable)."""
        raw = store.get_state(STATE_TUNING, None)
        try:
            return cls.model_validate(raw) if isinstance(raw, dict) else cls()
        except Exception:  # a bad value written by hand must not stop the request path
            return cls()


def squeeze_inputs(a: np.ndarray, bits: int, bounds: tuple[Any, ...]) -> np.ndarray:
    """``a`` (inside ``bounds``) quantised to ``2**bits`` levels per feature; unchanged
    when the bounds are not one finite range (nothing to quantise against)."""
    try:
        lo, hi = float(bounds[0]), float(bounds[1])
    except (TypeError, ValueError, IndexError):  # no scalar range (e.g. per-feature)
        return a
    if len(bounds) != 2 or not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return a
    import torch

    from bastion.defend.squeeze import reduce_bit_depth

    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return reduce_bit_depth(t, int(bits), (lo, hi)).numpy()


class InputError(DataError):
    """Inputs that cannot be answered; ``code`` says how: ``invalid_request`` (not a
    rectangular array of finite numbers), ``bad_inputs`` (wrong shape, outside the
    model's bounds) or ``batch_too_large``."""

    def __init__(self, message: str, *, code: str = "bad_inputs",
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class CheckedInputs:
    """A batch :func:`check_inputs` accepted: a float32 array of shape ``(n, *shape)``
    within ``bounds``. The guard answers it without checking it again (as long as the
    model it was checked against still has that shape and bounds)."""

    __slots__ = ("array", "shape", "bounds")

    def __init__(self, array: np.ndarray, shape: tuple[int, ...],
                 bounds: tuple[float, float]) -> None:
        self.array, self.shape, self.bounds = array, shape, bounds

    def __len__(self) -> int:
        return len(self.array)

    def fits(self, shape: Sequence[int], bounds: tuple[Any, ...]) -> bool:
        return self.shape == tuple(shape) and self.bounds == bounds


def _any_bool(v: Any) -> bool:
    stack = [v]
    while stack:
        x = stack.pop()
        if type(x) is list:
            stack.extend(x)
        elif type(x) is bool:
            return True
    return False


def check_inputs(x: Any, *, input_shape: Sequence[int], bounds: tuple[Any, ...],
                 max_batch: int, scan_bools: bool = True,
                 allow_single: bool = False) -> CheckedInputs:
    """The one check of a batch of inputs (JSON lists or an array) before the guard.

    A non-empty batch of at most ``max_batch`` inputs, a rectangular array of finite
    numbers (booleans and strings refused, even mixed with numbers), each input of the
    model's ``input_shape`` (or flat with as many values), within ``bounds``. Converted
    once, to float32. ``scan_bools=False`` skips the search for a boolean among numbers
    (the caller knows there is none, e.g. its JSON text holds no ``true``/``false``);
    ``allow_single`` takes one input without a batch axis (library callers).

    Raises:
        InputError: what is wrong, with its ``code``.
    """
    shape = tuple(int(s) for s in input_shape)
    if isinstance(x, list):
        if not x:
            raise InputError("inputs must be a non-empty list of inputs (empty batch)",
                             code="invalid_request")
        if len(x) > max_batch and not (allow_single and len(shape) == 1):
            raise InputError(f"batch of {len(x)} inputs is larger than the limit {max_batch}",
                             code="batch_too_large", hint="send smaller batches")
    try:
        a = np.asarray(x)
    except (TypeError, ValueError, RecursionError):
        raise InputError("inputs must be numeric: a rectangular array of numbers (every "
                         "input the same shape)", code="invalid_request") from None
    kind = a.dtype.kind
    if kind == "b" or (scan_bools and kind in "iu" and isinstance(x, list) and _any_bool(x)):
        raise InputError("inputs must be numbers, not booleans", code="invalid_request")
    if kind == "U" or (kind == "O" and isinstance(x, list) and x
                       and all(isinstance(t, str) for t in x)):
        raise InputError(f"this model takes numeric inputs of shape "
                         f"({', '.join(map(str, shape))}), not text: send arrays of numbers",
                         code="invalid_request")
    if kind not in "iuf":
        raise InputError("inputs must be numeric: a rectangular array of numbers (every "
                         "input the same shape, no strings, booleans or nulls)",
                         code="invalid_request")
    if kind == "f" and scan_bools and isinstance(x, list) and _any_bool(x):
        raise InputError("inputs must be numbers, not booleans", code="invalid_request")
    with np.errstate(over="ignore", invalid="ignore"):  # a client's 1e39 is not a log line
        a = a.astype(np.float32, copy=False)
    lo = hi = 0.0
    if a.size:
        lo, hi = a.min(), a.max()  # NaN and +-Infinity show in these
        if not (np.isfinite(lo) and np.isfinite(hi)):
            flat = a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(-1, 1)
            bad = ~np.isfinite(flat).all(axis=1)
            raise InputError(f"inputs contain NaN or Infinity (first at input "
                             f"{int(np.argmax(bad))}; a value beyond float32's range counts "
                             "as Infinity)", code="invalid_request")
    d = int(np.prod(shape))
    if allow_single and a.ndim == len(shape):
        a = a[None]
    if a.ndim == 2 and a.shape[1] == d and shape != (d,):
        a = a.reshape(len(a), *shape)
    if a.ndim != len(shape) + 1 or tuple(a.shape[1:]) != shape:
        raise InputError(f"inputs have shape {tuple(a.shape)}; expected (n, "
                         f"{', '.join(map(str, shape))}) or (n, {d})")
    if len(a) == 0:
        raise InputError("empty batch: send at least one input", code="invalid_request")
    if len(a) > max_batch:
        raise InputError(f"batch of {len(a)} inputs is larger than the limit {max_batch}",
                         code="batch_too_large", hint="send smaller batches")
    blo, bhi = bounds
    if lo < blo - 1e-6 or hi > bhi + 1e-6:
        raise InputError(f"input values fall outside the model's bounds [{blo}, {bhi}] "
                         f"(min {lo:.4g}, max {hi:.4g})")
    return CheckedInputs(a, shape, tuple(bounds))  # type: ignore[arg-type]


class CheckedTexts:
    """A batch of texts :func:`check_texts` accepted: a 1-d object array of ``str``."""

    __slots__ = ("array", "max_chars")

    def __init__(self, array: np.ndarray, max_chars: int) -> None:
        self.array, self.max_chars = array, max_chars

    def __len__(self) -> int:
        return len(self.array)


#: a text input's characters that are refused: control characters (Unicode category Cc)
#: other than tab, newline and carriage return, and lone surrogates (not valid UTF-8)
_ALLOWED_CC = frozenset("\t\n\r")


def _bad_char(t: str) -> str | None:
    for ch in t:
        o = ord(ch)
        if (o < 32 or 127 <= o < 160) and ch not in _ALLOWED_CC:
            return f"control character U+{o:04X}"
        if 0xD800 <= o <= 0xDFFF:
            return f"lone surrogate U+{o:04X} (not valid UTF-8)"
    return None


def check_texts(x: Any, *, max_batch: int, max_chars: int,
                allow_single: bool = False) -> CheckedTexts:
    """The one check of a batch of texts for a text model (``modality == "text"``).

    A non-empty JSON list of at most ``max_batch`` strings, each with some non-blank
    character, at most ``max_chars`` characters, and no control character (tab, newline
    and carriage return allowed) or lone surrogate. ``allow_single`` takes one string
    (library callers).

    Raises:
        InputError: what is wrong, with its ``code`` (``text_too_long`` for a string over
            the limit).
    """
    if allow_single and isinstance(x, str):
        x = [x]
    if isinstance(x, np.ndarray) and x.ndim == 1 and x.dtype.kind in "OU":
        x = x.tolist()
    if not isinstance(x, list | tuple):
        raise InputError("this model classifies text: inputs must be a list of strings, "
                         "e.g. [\"book a flight to paris\"]", code="invalid_request")
    if not x:
        raise InputError("inputs must be a non-empty list of strings (empty batch)",
                         code="invalid_request")
    if len(x) > max_batch:
        raise InputError(f"batch of {len(x)} inputs is larger than the limit {max_batch}",
                         code="batch_too_large", hint="send smaller batches")
    for i, t in enumerate(x):
        if not isinstance(t, str):
            raise InputError(f"this model classifies text: input {i} is "
                             f"{type(t).__name__ if t is not None else 'null'}, not a string "
                             "(send a list of strings, e.g. [\"book a flight\"])",
                             code="invalid_request")
        if len(t) > max_chars:
            raise InputError(f"input {i} has {len(t)} characters; the limit is {max_chars}",
                             code="text_too_long", hint="send shorter texts")
        if not t.strip():
            raise InputError(f"input {i} is empty or blank: send some text",
                             code="invalid_request")
        bad = _bad_char(t) if not t.isprintable() else None
        if bad is not None:
            raise InputError(f"input {i} contains a {bad}: send plain text",
                             code="invalid_request")
    a = np.empty(len(x), dtype=object)
    a[:] = [str(t) for t in x]
    return CheckedTexts(a, int(max_chars))


def is_text(model: Any) -> bool:
    """A model that classifies strings (``modality == "text"``)."""
    return getattr(model, "modality", None) == "text"


class GuardPolicy(BaseModel):
    """What the guard does when detectors fire.

    - ``actions``: per detector name, ``flag`` or ``block`` when it fires (``ignore``
      scores it without acting); detectors not named use ``default_action``.
    - ``on_flag``: who answers a flagged input: ``champion`` or ``fallback``.
    - ``on_block``: ``refuse`` (no label) or ``fallback`` (answer, still marked blocked).
    - ``block_after``: block when at least this many detectors fire at once (``0`` = off).
    - ``extraction_action``: verdict for a client the extraction detector flags.
    - ``log_inputs``: store each input in its prediction event (drift monitors and the
      retrain pipeline need them).
    """

    model_config = ConfigDict(extra="forbid")

    actions: dict[str, Action] = Field(default_factory=dict)
    default_action: Action = "flag"
    on_flag: Literal["champion", "fallback"] = "fallback"
    on_block: Literal["refuse", "fallback"] = "refuse"
    block_after: int = Field(default=0, ge=0)
    extraction_action: Action = "flag"
    log_inputs: bool = True

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> GuardPolicy:
        """Read a policy from a YAML or JSON file."""
        from bastion.runtime.healing import _read_mapping, _validate

        doc = _read_mapping(path)
        return _validate(cls, doc.get("guard", doc), path)


class Reason(BaseModel):
    """A check that fired on one input: which, its score and threshold, the policy's
    action for it, and a note (the extraction test's, or the quarantine's)."""

    detector: str
    score: float | None = None
    threshold: float | None = None
    fired: bool
    action: Action
    note: str | None = None


class GuardDecision(BaseModel):
    """The guard's answer for one input.

    ``reasons`` holds the checks that fired (empty for a clean input); ``scores`` every
    detector's score for the input (higher = more suspicious; compare them with the
    thresholds in :attr:`GuardedModel.thresholds`), plus ``extraction`` once the
    client's query-pattern test gives one."""

    index: int
    request_id: str
    client_id: str
    label: int | None
    probabilities: list[float] | None
    verdict: Verdict
    reasons: list[Reason]
    scores: dict[str, float | None]
    answered_by: Literal["champion", "fallback", "none"]
    model_version: str | None
    why: str


def _trusted(cls: type[BaseModel], **values: Any) -> Any:
    """``cls.model_construct(**values)`` (no validation) for trusted ``values`` naming
    every field of ``cls`` (a plain model: no aliases, no private attributes); about 5x
    cheaper, which matters at several per answered input."""
    m = cls.__new__(cls)
    object.__setattr__(m, "__dict__", {k: values[k] for k in cls.__pydantic_fields__})
    object.__setattr__(m, "__pydantic_fields_set__", _all_fields_set(cls, values))
    object.__setattr__(m, "__pydantic_extra__", None)
    object.__setattr__(m, "__pydantic_private__", None)
    return m


_FIELDS_SETS: dict[type, set[str]] = {}


def _all_fields_set(cls: type[BaseModel], values: dict[str, Any]) -> set[str]:
    """The fields-set of a :func:`_trusted` instance: one shared set per class when
    ``values`` names exactly the class's fields (as the guard's builds do)."""
    shared = _FIELDS_SETS.get(cls)
    if shared is None:
        shared = _FIELDS_SETS[cls] = set(cls.__pydantic_fields__)
    return shared if len(values) == len(shared) else set(values)


def _reason(detector: str, score: float | None, threshold: float | None, fired: bool,
            action: Any, note: str | None) -> Reason:
    """A :class:`Reason` from trusted values, as :func:`_trusted` builds it but without
    the keyword round trip (several per answered input)."""
    m = _new_reason(Reason)
    _set(m, "__dict__", {"detector": detector, "score": score, "threshold": threshold,
                         "fired": fired, "action": action, "note": note})
    _set(m, "__pydantic_fields_set__", _REASON_FIELDS_SET)
    _set(m, "__pydantic_extra__", None)
    _set(m, "__pydantic_private__", None)
    return m


_new_reason = Reason.__new__
_set = object.__setattr__
_REASON_FIELDS = ("detector", "score", "threshold", "fired", "action", "note")
# every Reason the guard builds has all its fields set, so they share one fields-set (pydantic
# only ever adds a field name to it, on assignment, and copies it for model_copy)
_REASON_FIELDS_SET = set(_REASON_FIELDS)
assert tuple(Reason.model_fields) == _REASON_FIELDS  # _reason writes them in this order


def _takes_label(det: Any) -> bool:
    """Whether the extraction detector's ``observe``/``update`` takes a third argument."""
    import inspect

    fn = getattr(det, "observe", None) or getattr(det, "update", None)
    if fn is None:
        raise BastionError("the extraction detector has no observe() or update()",
                           hint="give an object with observe(client_id, x)")
    try:
        return len(inspect.signature(fn).parameters) >= 3
    except (TypeError, ValueError):
        return False


def _extraction_check(det: Any, client_id: str, x: np.ndarray, label: int | None,
                      takes_label: bool | None = None
                      ) -> tuple[bool, float | None, str | None]:
    """Ask a per-client extraction detector about one query ``x``; duck-typed.

    The detector may offer ``observe(client_id, x[, label])`` or ``update(client_id, x[,
    label])`` (e.g. :class:`bastion.detect.extraction.QueryStreamMonitor`; ``label`` is
    the champion's predicted class) returning a bool, a score (compared with its
    ``threshold_``) or a dict with ``flagged``/``score``; and optionally
    ``is_flagged(client_id)``. ``takes_label``: the answer of :func:`_takes_label` for
    ``det``, if known (it is looked up otherwise).
    """
    if takes_label is None:
        takes_label = _takes_label(det)
    fn = getattr(det, "observe", None) or getattr(det, "update", None)
    assert fn is not None  # _takes_label raised otherwise
    res = fn(client_id, x, label) if takes_label else fn(client_id, x)
    return _extraction_verdict(det, client_id, res)


def _extraction_verdict(det: Any, client_id: str, res: Any
                        ) -> tuple[bool, float | None, str | None]:
    """Read an extraction detector's answer (see :func:`_extraction_check`)."""
    score: float | None = None
    flagged = False
    note = None
    if isinstance(res, Mapping):
        flagged = bool(res.get("flagged", False))
        score = None if res.get("score") is None else float(res["score"])
        note = res.get("note") or res.get("reason")
    elif isinstance(res, bool | np.bool_):
        flagged = bool(res)
    elif isinstance(res, int | float | np.floating):
        score = float(res)
        thr = getattr(det, "threshold_", None)
        flagged = thr is not None and score > float(thr)
    check = getattr(det, "is_flagged", None)
    if callable(check):
        flagged = flagged or bool(check(client_id))
    return flagged, score, None if note is None else str(note)


class GuardedModel:
    """A model with detectors in the request path; see the module docs.

    Args:
        model: the champion (any Bastion model with ``predict_proba``).
        detectors: ``{name: detector}``, each with ``score(x)`` and a calibrated
            ``threshold_`` (see :func:`bastion.runtime.detectors.build_detectors`).
        policy: the :class:`GuardPolicy` (default: flag on any detector, fallback answers).
        fallback: the model that answers flagged/blocked inputs (or all traffic when the
            controller switched it there); without one, the champion answers.
        extraction_detector: optional per-client query-pattern detector.
        store: event store for prediction/verdict events and the shared state.
        model_version / fallback_version: labels recorded with each answer.
        max_batch: largest batch accepted in one call.
        max_text_chars: longest text accepted (a text model's inputs).
    """

    def __init__(
        self,
        model: Any,
        *,
        detectors: Mapping[str, Any] | None = None,
        policy: GuardPolicy | None = None,
        fallback: Any | None = None,
        extraction_detector: Any | None = None,
        store: ev.EventStore | None = None,
        model_version: str | int | None = None,
        fallback_version: str | int | None = None,
        max_batch: int = 1024,
        max_text_chars: int = 10_000,
    ) -> None:
        self.detectors = dict(detectors or {})
        for name, d in self.detectors.items():
            if not callable(getattr(d, "score", None)):
                raise BastionError(f"detector {name!r} has no score()")
            if getattr(d, "threshold_", None) is None:
                raise BastionError(f"detector {name!r} is not calibrated",
                                   hint="call calibrate(x_clean, fpr=...) first")
        self.policy = policy or GuardPolicy()
        self.extraction_detector = extraction_detector
        self.store = store
        self.max_batch = int(max_batch)
        self.max_text_chars = int(max_text_chars)
        if extraction_detector is not None and is_text(model):
            raise BastionError("the extraction detector (PRADA) measures distances between "
                               "numeric inputs; it does not apply to a text model",
                               hint="build the guard without extraction_detector")
        self._lock = threading.RLock()
        self.quarantined: set[str] = set()
        self.traffic: Literal["champion", "fallback"] = "champion"
        self.model = model
        self.model_version = None if model_version is None else str(model_version)
        self.fallback = fallback
        self.fallback_version = None if fallback_version is None else str(fallback_version)
        self._check_model(model)
        if fallback is not None:
            self._check_model(fallback)
        self.tuning = GuardTuning()
        self._thr_cache: dict[tuple[int, float], float] = {}
        self._state_checked = 0.0
        self._ex_sig: tuple[Any, bool] | None = None  # (extraction detector, takes label)

    @property
    def thresholds(self) -> dict[str, float | None]:
        """Each check's threshold: a score above it fires (``extraction``: the query-
        pattern detector's, ``None`` when it has none)."""
        scale = self.tuning.fpr_scale
        out: dict[str, float | None] = {n: self._threshold(d, scale)
                                        for n, d in self.detectors.items()}
        if self.extraction_detector is not None:
            t = getattr(self.extraction_detector, "threshold_", None)
            out["extraction"] = None if t is None else float(t)
        return out

    def _threshold(self, det: Any, scale: float) -> float:
        """``det``'s threshold under ``fpr_scale`` ``scale`` (cached per detector)."""
        base = float(det.threshold_)
        f = getattr(det, "fpr_", None)
        if scale == 1.0 or f is None:
            return base
        key = (id(det), scale)
        thr = self._thr_cache.get(key)
        if thr is None:
            from bastion.detect._calibrated import threshold_at

            t = threshold_at(det, float(f) * scale)
            thr = base if t is None else t
            self._thr_cache[key] = thr
        return thr

    @staticmethod
    def _check_model(m: Any) -> None:
        for a in ("predict_proba", "input_shape", "n_classes"):
            if not hasattr(m, a):
                raise BastionError(f"{type(m).__name__} is not a Bastion model (no {a})")

    # -- live changes ---------------------------------------------------------------
    def swap_model(self, model: Any, *, version: str | int | None = None) -> None:
        """Replace the champion (after a promotion or rollback), between requests.

        Detectors that read the model (confidence, squeeze, learned) keep the model they
        were built with: rebuild them with
        :func:`~bastion.runtime.detectors.build_detectors` and make a new guard when the
        new champion differs much from the old one."""
        self._check_model(model)
        with self._lock:
            self.model = model
            self.model_version = None if version is None else str(version)

    def swap_fallback(self, model: Any | None, *, version: str | int | None = None) -> None:
        """Replace (or remove) the fallback model."""
        if model is not None:
            self._check_model(model)
        with self._lock:
            self.fallback = model
            self.fallback_version = None if version is None else str(version)

    def quarantine(self, client_id: str, *, reason: str = "manual") -> None:
        """Block every later request of ``client_id`` (persisted when there is a store)."""
        with self._lock:
            self.quarantined.add(str(client_id))
            if self.store is not None:
                q = set(self.store.get_state(STATE_QUARANTINE, []) or [])
                q.add(str(client_id))
                self.store.set_state(STATE_QUARANTINE, sorted(q))

    def release(self, client_id: str) -> None:
        """Lift a quarantine."""
        with self._lock:
            self.quarantined.discard(str(client_id))
            if self.store is not None:
                q = set(self.store.get_state(STATE_QUARANTINE, []) or [])
                q.discard(str(client_id))
                self.store.set_state(STATE_QUARANTINE, sorted(q))

    def refresh_state(self) -> None:
        """Re-read quarantine and traffic routing from the store (done at most once a
        second by :meth:`predict`)."""
        if self.store is None:
            return
        q = self.store.get_state(STATE_QUARANTINE, []) or []
        t = self.store.get_state(STATE_TRAFFIC, "champion")
        tuning = GuardTuning.read(self.store)
        with self._lock:
            self.quarantined = {str(c) for c in q}
            self.traffic = "fallback" if t == "fallback" else "champion"
            self.tuning = tuning
            self._state_checked = time.monotonic()

    # -- the request path -----------------------------------------------------------
    def _inputs(self, x: Any) -> np.ndarray:
        model = self.model
        if is_text(model):
            if type(x) is CheckedTexts:
                return x.array  # checked by check_texts: trusted as is
            return check_texts(x, max_batch=self.max_batch, max_chars=self.max_text_chars,
                               allow_single=True).array
        bounds = tuple(getattr(model, "bounds", (-np.inf, np.inf)))
        if type(x) is CheckedInputs and x.fits(model.input_shape, bounds):
            return x.array  # checked by check_inputs against this model: trusted as is
        return check_inputs(x, input_shape=model.input_shape, bounds=bounds,
                            max_batch=self.max_batch, allow_single=True).array

    def predict(self, x: Any, *, client_id: str = "anonymous",
                request_ids: Sequence[str] | None = None) -> list[GuardDecision]:
        """Guarded answers for a batch ``x`` (or one input) from ``client_id``."""
        return self.predict_many([(x, client_id, request_ids)])[0]

    def predict_many(self, batches: Sequence[tuple[Any, str, Sequence[str] | None]]
                     ) -> list[list[GuardDecision]]:
        """Guarded answers for several batches ``(x, client_id, request_ids or None)``
        at once (e.g. concurrent requests of different clients): one forward pass of the
        champion, each detector once over every input, one event-store write. Each
        batch gets the answers :meth:`predict` would give it (the per-client extraction
        detector sees the batches in the given order). All or none: a bad batch raises
        :class:`~bastion.errors.DataError` before anything is answered or stored."""
        if not batches:
            return []
        if self.store is not None and time.monotonic() - self._state_checked > 1.0:
            self.refresh_state()
        arrays: list[np.ndarray] = []
        cids: list[str] = []
        rids: list[str] = []
        index: list[int] = []
        sizes: list[int] = []
        for x, client_id, request_ids in batches:
            ab = self._inputs(x)
            nb = len(ab)
            rb = [str(r) for r in request_ids] if request_ids is not None else [
                uuid.uuid4().hex for _ in range(nb)]
            if len(rb) != nb:
                raise DataError(f"{len(rb)} request ids for {nb} inputs")
            arrays.append(ab)
            cids += [str(client_id)] * nb
            rids += rb
            index += range(nb)
            sizes.append(nb)
        a = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        n = len(a)
        with self._lock:
            model, mver = self.model, self.model_version
            fb, fver = self.fallback, self.fallback_version
            traffic = self.traffic if fb is not None else "champion"
            quarantined = [c in self.quarantined for c in cids]
            tuning = self.tuning
        text = is_text(model)
        # squeezing on (the healing controller's ``squeeze_on``): the models answer the
        # squeezed input, the detectors judge the input as sent
        a_ans = a if text or tuning.squeeze_bits is None else squeeze_inputs(
            a, tuning.squeeze_bits, tuple(getattr(model, "bounds", ())))
        squeezing = a_ans is not a
        # one forward pass of the champion answers the input and every squeezed copy the
        # squeeze detectors on this champion need (tiny models cost mostly per call)
        parts, squeeze_rows = [a], {}
        for name, det in self.detectors.items():
            if getattr(det, "model", None) is model and callable(
                    getattr(det, "squeezed", None)) and callable(
                    getattr(det, "score_from_proba", None)):
                copies = det.squeezed(a)
                squeeze_rows[name] = (len(parts), len(copies))
                parts += copies
        if squeezing:
            parts.append(a_ans)
        p_all = np.asarray(model.predict_proba(parts[0] if len(parts) == 1 else
                                               np.concatenate(parts)), dtype=np.float64)
        p_champ = p_all[:n]
        p_ans = p_all[len(p_all) - n:] if squeezing else p_champ
        champ_labels: list[int] = p_ans.argmax(1).tolist()
        # every check's score and whether it fired, one column per detector; a Reason is
        # built only for a check that fired (most inputs have none)
        names = list(self.detectors)
        scores = np.empty((n, len(names)), dtype=np.float64)
        fired_m = np.zeros((n, len(names)), dtype=bool)
        thresholds: list[float] = []
        actions: list[Any] = []
        # per input: how many acting detectors fired, and whether a blocking one did
        n_acting = np.zeros(n, dtype=np.int64)
        blocking = np.zeros(n, dtype=bool)

        def tally(fired: np.ndarray, action: str) -> None:
            if action != "ignore":
                np.add(n_acting, fired, out=n_acting)
                if action == "block":
                    np.logical_or(blocking, fired, out=blocking)

        for j, (name, det) in enumerate(self.detectors.items()):
            action = self.policy.actions.get(name, self.policy.default_action)
            if name.startswith("confidence") and hasattr(det, "from_proba") and \
                    getattr(det, "model", None) is model:
                s = det.from_proba(p_champ, getattr(det, "kind", "maxprob"))
            elif name in squeeze_rows:
                first, k = squeeze_rows[name]
                s = det.score_from_proba(p_champ, [p_all[(first + j2) * n:(first + j2 + 1) * n]
                                                   for j2 in range(k)])
            else:
                s = det.score(a)
            thr = self._threshold(det, tuning.fpr_scale)
            scores[:, j] = np.asarray(s, dtype=np.float64).reshape(n)
            np.greater(scores[:, j], thr, out=fired_m[:, j])
            tally(fired_m[:, j], action)
            thresholds.append(thr)
            actions.append(action)
        exd = self.extraction_detector
        checks: list[tuple[bool, float | None, str | None]] | None = None
        ex_thr: float | None = None
        if exd is not None:
            t = getattr(exd, "threshold_", None)
            ex_thr = None if t is None else float(t)
            if self._ex_sig is None or self._ex_sig[0] is not exd:
                self._ex_sig = (exd, _takes_label(exd))
            many = getattr(exd, "observe_many", None)
            if callable(many) and not self._ex_sig[1]:
                # a detector that takes a request's queries at once (one test per
                # request and client); its verdict after them answers each of them
                rows_of: dict[str, list[int]] = {}
                for i, c in enumerate(cids):
                    rows_of.setdefault(c, []).append(i)
                checks = [(False, None, None)] * n
                for c, rows in rows_of.items():
                    verdict = _extraction_verdict(exd, c, many(c, a[rows]))
                    for i in rows:
                        checks[i] = verdict
            else:
                checks = [_extraction_check(exd, cids[i], a[i], champ_labels[i],
                                            self._ex_sig[1]) for i in range(n)]
            tally(np.array([c[0] for c in checks], dtype=bool), self.policy.extraction_action)
        construct = _reason
        score_rows: list[list[float]] = scores.tolist()
        any_fired: list[bool] = np.logical_or.reduce(fired_m, axis=1).tolist()
        score_dicts: list[dict[str, float | None]] = []
        reasons: list[list[Reason]] = []
        for i in range(n):
            sc: dict[str, float | None] = dict(zip(names, score_rows[i], strict=True))
            rs: list[Reason] = []
            if any_fired[i]:
                for j in np.flatnonzero(fired_m[i]).tolist():
                    rs.append(construct(names[j], score_rows[i][j], thresholds[j], True,
                                        actions[j], None))
            if checks is not None:
                hit, ex_score, note = checks[i]
                if ex_score is not None:
                    sc["extraction"] = ex_score
                if hit:
                    rs.append(construct("extraction", ex_score, ex_thr, True,
                                        self.policy.extraction_action,
                                        None if note is None else str(note)))
            score_dicts.append(sc)
            reasons.append(rs)
        verdicts: list[Verdict] = []
        block_after = self.policy.block_after
        n_act, blk = n_acting.tolist(), blocking.tolist()
        for i in range(n):
            v: Verdict = "allow"
            if blk[i] or (block_after and n_act[i] >= block_after):
                v = "block"
            elif n_act[i]:
                v = "flag"
            if quarantined[i]:
                reasons[i].append(construct("quarantine", None, None, True, "block",
                                            "client is quarantined"))
                v = "block"
            verdicts.append(v)
        need_fb = [i for i in range(n) if fb is not None and (
            traffic == "fallback" or (verdicts[i] == "flag" and self.policy.on_flag ==
                                      "fallback")
            or (verdicts[i] == "block" and self.policy.on_block == "fallback"))]
        p_fb = None
        if need_fb and fb is not None:
            p_fb = np.asarray(fb.predict_proba(a_ans[need_fb]), dtype=np.float64)
        fb_rows = {i: k for k, i in enumerate(need_fb)}
        champ_probs: list[list[float]] = p_ans.tolist()
        fb_probs: list[list[float]] = [] if p_fb is None else p_fb.tolist()
        fb_labels: list[int] = [] if p_fb is None else p_fb.argmax(1).tolist()
        out: list[GuardDecision] = []
        by: Literal["champion", "fallback", "none"]
        no_fb_traffic = not (fb is not None and traffic == "fallback")
        sq_note = (f"; answered on the input squeezed to {tuning.squeeze_bits} bits"
                   if squeezing else "")
        for i in range(n):
            v = verdicts[i]
            if v == "allow" and no_fb_traffic:  # the common case, without the branches
                out.append(_trusted(
                    GuardDecision, index=index[i], request_id=rids[i], client_id=cids[i],
                    label=champ_labels[i], probabilities=champ_probs[i], verdict=v,
                    reasons=reasons[i], scores=score_dicts[i], answered_by="champion",
                    model_version=mver, why="no detector fired" + sq_note))
                continue
            fired_names = [r.detector for r in reasons[i] if r.action != "ignore"]
            label: int | None
            probs: list[float] | None
            if v == "block" and (quarantined[i] or self.policy.on_block == "refuse"
                                 or i not in fb_rows):
                by, probs, label, ver = "none", None, None, None
                why = "blocked: " + ", ".join(fired_names) + "; request refused"
            elif i in fb_rows and p_fb is not None:
                by, ver = "fallback", fver
                probs, label = fb_probs[fb_rows[i]], fb_labels[fb_rows[i]]
                if traffic == "fallback" and v == "allow":
                    why = "traffic is switched to the fallback model by the healing controller"
                else:
                    why = f"{v}: {', '.join(fired_names)} fired; answered by the fallback"
            else:
                by, probs, label, ver = "champion", champ_probs[i], champ_labels[i], mver
                why = "no detector fired" if v == "allow" else (
                    f"{v}: {', '.join(fired_names)} fired; "
                    + ("no fallback model, " if fb is None else "") + "answered by the champion")
            if by != "none":
                why += sq_note
            # our own values, of the declared types: no validation pass per answer
            out.append(_trusted(
                GuardDecision, index=index[i], request_id=rids[i], client_id=cids[i],
                label=label, probabilities=probs, verdict=v, reasons=reasons[i],
                scores=score_dicts[i], answered_by=by, model_version=ver, why=why))
        if self.store is not None:
            self._log(a, out, p_champ)
        split, k = [], 0
        for nb in sizes:
            split.append(out[k:k + nb])
            k += nb
        return split

    def _log(self, a: np.ndarray, decisions: list[GuardDecision], p_champ: np.ndarray) -> None:
        from bastion.detect.adversarial import _entropy

        store = self.store
        assert store is not None
        ent = _entropy(p_champ).tolist()
        labels = p_champ.argmax(1).tolist()
        conf = p_champ.max(1).tolist()
        inputs: list[Any] | None = None
        if self.policy.log_inputs:
            inputs = a.tolist() if a.dtype == object else a.reshape(len(a), -1).round(6).tolist()
        rows: list[dict[str, Any]] = []
        for i, d in enumerate(decisions):  # row i of ``a`` and ``p_champ``
            payload: dict[str, Any] = {
                "label": d.label, "verdict": d.verdict, "answered_by": d.answered_by,
                "champion_label": labels[i], "confidence": conf[i], "entropy": ent[i],
                "scores": d.scores,
                "fired": [r.detector for r in d.reasons] if d.reasons else [],
            }
            if inputs is not None:
                payload["input"] = inputs[i]
            rows.append({"kind": ev.PREDICTION, "payload": payload, "client_id": d.client_id,
                         "request_id": d.request_id, "model_version": d.model_version})
            if d.verdict != "allow":
                rows.append({"kind": ev.VERDICT, "client_id": d.client_id,
                             "request_id": d.request_id, "model_version": d.model_version,
                             "payload": {"verdict": d.verdict, "why": d.why,
                                         "reasons": [r.model_dump() for r in d.reasons]}})
        store.append_many(rows)


def record_feedback(store: ev.EventStore, labels: Mapping[str, int], *,
                    client_id: str | None = None, n_classes: int | None = None) -> list[int]:
    """Store true labels for earlier predictions, by request id.

    Raises:
        DataError: an unknown request id, or a label outside ``[0, n_classes)``.
    """
    if not labels:
        return []
    known = {e.request_id for e in store.query(kinds=ev.PREDICTION,
                                                request_id=list(labels), limit=None)}
    unknown = [r for r in labels if r not in known]
    if unknown:
        raise DataError(f"unknown request ids: {unknown[:5]}",
                        hint="send feedback only for request ids a prediction returned")
    rows = []
    for rid, y in labels.items():
        yi = int(y)
        if yi < 0 or (n_classes is not None and yi >= n_classes):
            raise DataError(f"label {y} for {rid} is out of range")
        rows.append({"kind": ev.FEEDBACK, "request_id": rid, "client_id": client_id,
                     "payload": {"label": yi}})
    return store.append_many(rows)
