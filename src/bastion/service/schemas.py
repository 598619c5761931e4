"""Pydantic schemas of every request and response of the Bastion service.

Requests forbid unknown fields (a typo is a 422 naming the field, not a silent
default). Inputs are checked here as far as they can be without the model: a
rectangular array of finite numbers; the service then checks the shape and bounds
against the serving model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from bastion.web.errors import ErrorBody as ErrorBody
from bastion.web.errors import ErrorResponse as ErrorResponse

CLIENT_ID_PATTERN = r"^[A-Za-z0-9_.:@\-]{1,128}$"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Request):
    """A batch of inputs. Each input is nested lists in the model's input shape (e.g.
    ``[[[...8 numbers...] x 8]]`` for ``(1, 8, 8)``) or a flat list of the right
    length. Numbers only: booleans, strings and nulls are refused (checked, with the
    shape and the model's bounds, by
    :func:`~bastion.runtime.guard.check_inputs`, the one check the fast path shares).
    For a text model, a list of strings instead (checked by
    :func:`~bastion.runtime.guard.check_texts`: non-blank, at most ``max_text_chars``
    characters, no control characters)."""

    inputs: list[Any] = Field(..., min_length=1,
                              description="A batch of inputs (at least one): numbers, or "
                              "strings for a text model.")
    client_id: str | None = Field(
        default=None, pattern=CLIENT_ID_PATTERN,
        description="A label for who is asking, in open mode only (also X-Client-Id); "
                    "with API keys the key names the client.")
    explain: StrictBool = Field(
        default=False, description="Also return an attribution per input (integrated "
        "gradients for torch models, KernelSHAP otherwise; one value per word for a text "
        "model); rate-limited per client (explain_rate_per_s) and at most "
        "explain_max_batch inputs.")


class ReferenceOut(BaseModel):
    """The clean reference input nearest to a flagged input, and its attribution."""

    index: int
    label: int
    distance: float | None = Field(default=None, description="Euclidean distance to the "
                                   "input (numeric models).")
    similarity: float | None = Field(default=None, description="Cosine similarity of the "
                                     "model's features (text models).")
    attribution: list[Any]


class ExplanationOut(BaseModel):
    """One input's attribution: in the input's shape, or one value per word for a text
    model (``unit: word``, with the words and their character spans)."""

    method: Literal["integrated_gradients", "kernel_shap"]
    target: int
    attribution: list[Any]
    baseline: str
    convergence_delta: float | None = None
    unit: Literal["word"] | None = Field(default=None, description="`word` for a text "
                                         "model, absent otherwise.")
    words: list[str] | None = Field(default=None, description="A text's words (runs of "
                                    "non-space characters), one attribution each.")
    spans: list[list[int]] | None = Field(default=None, description="Each word's [start, "
                                          "end) character offsets in the text.")
    truncated_at: int | None = Field(default=None, description="Where the tokenizer cut "
                                     "the text (its words after it get 0.0); null if not "
                                     "cut.")
    explained_model: Literal["champion", "fallback"]
    reference: ReferenceOut | None = Field(
        default=None, description="For a flagged or blocked input: the nearest clean "
        "reference input's attribution for the same class.")


class ReasonOut(BaseModel):
    """A check that fired on the input."""

    detector: str
    score: float | None = None
    threshold: float | None = None
    fired: bool
    action: str
    note: str | None = None


class PredictionOut(BaseModel):
    """One answered input."""

    request_id: str
    label: int | None
    probabilities: list[float] | None
    verdict: Literal["allow", "flag", "block"]
    answered_by: Literal["champion", "fallback", "none"]
    model_version: str | None
    why: str
    reasons: list[ReasonOut] = Field(description="The checks that fired (empty: none did).")
    scores: dict[str, float | None] = Field(
        description="Every detector's score for the input (higher = more suspicious; "
                    "thresholds in GET /v1/health), and `extraction` once the client's "
                    "query-pattern test gives one.")


class PredictResponse(BaseModel):
    """Parallel lists (one entry per input) plus the details per input."""

    model_version: str | None = Field(description="The champion version serving now.")
    client_id: str
    request_ids: list[str]
    labels: list[int | None]
    probabilities: list[list[float] | None]
    verdicts: list[Literal["allow", "flag", "block"]]
    predictions: list[PredictionOut]
    explanations: list[ExplanationOut] | None = Field(
        default=None, description="With explain: true, one per input.")
    label_names: list[str | None] | None = Field(
        default=None, description="A text model's class names of the labels (its "
        "id2label); null for other models.")


class FeedbackItem(_Request):
    request_id: str = Field(..., min_length=1, max_length=256)
    label: StrictInt = Field(..., ge=0, le=2**31 - 1,
                             description="The true class (an integer: not 3.0, \"3\" "
                                         "or true).")


class FeedbackRequest(_Request):
    """True labels for earlier predictions, by request id."""

    feedback: list[FeedbackItem] = Field(..., min_length=1)
    client_id: str | None = Field(default=None, pattern=CLIENT_ID_PATTERN)


class FeedbackResponse(BaseModel):
    accepted: int
    event_ids: list[int]
    correct: int = Field(description="How many of the labels agree with the answer given.")


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    model_name: str
    champion_version: int | None
    fallback_version: int | None
    traffic: str
    guard: bool
    detectors: list[str]
    thresholds: dict[str, float | None] = Field(
        description="Each check's threshold: a score above it fires.")
    quarantined_clients: list[str]
    tuning: dict[str, Any] = Field(
        default_factory=dict, description="The guard's run-time tuning the healing "
        "controller set (fpr_scale, squeeze_bits); reader or admin only.")
    events: int
    admin_routes: bool
    auth: Literal["keys", "open"] = Field(
        description="keys: API keys required; open: anyone is admin (local demos only)")
    warning: str | None = None
    uptime_s: float
    last_error: str | None = None
    modality: Literal["text", "numeric"] = Field(
        default="numeric", description="What POST /v1/predict takes: strings (text) or "
        "arrays of numbers.")
    skipped_detectors: dict[str, str] = Field(
        default_factory=dict, description="Configured detectors not run on this model, "
        "with why (e.g. feature squeezing on a text model).")


class VersionOut(BaseModel):
    version: int
    aliases: list[str]
    created_at: float
    run_id: str | None
    tags: dict[str, str]
    metrics: dict[str, float]


class AliasMoveOut(BaseModel):
    alias: str
    version: int
    from_version: int | None
    at: str
    ts: float
    reason: str
    actor: str


class ModelsResponse(BaseModel):
    model_name: str
    aliases: dict[str, int]
    versions: list[VersionOut]
    history: list[AliasMoveOut]
    serving: dict[str, Any]


class PromoteRequest(_Request):
    version: StrictInt = Field(..., ge=1, le=2**31 - 1)
    reason: str = Field(default="promoted via the API", min_length=1, max_length=500)


class RollbackRequest(_Request):
    version: StrictInt | None = Field(default=None, ge=1, le=2**31 - 1,
                                description="Version to roll back to (default: previous).")
    reason: str = Field(default="rolled back via the API", min_length=1, max_length=500)


class AliasChangeResponse(BaseModel):
    champion: int
    previous: int | None
    aliases: dict[str, int]


class QuarantineResponse(BaseModel):
    quarantined: list[str] = Field(description="Quarantined client names.")


class UnquarantineRequest(_Request):
    reason: str = Field(default="lifted via the API", min_length=1, max_length=500)


class UnquarantineResponse(BaseModel):
    client_id: str
    lifted: bool
    quarantined: list[str]


class EventOut(BaseModel):
    id: int
    ts: float
    at: str
    kind: str
    client_id: str | None
    request_id: str | None
    model_version: str | None
    payload: dict[str, Any]


class EventsResponse(BaseModel):
    count: int
    events: list[EventOut]


class Point(BaseModel):
    t: float
    v: float | None


class Series(BaseModel):
    name: str
    points: list[Point]


class DashboardData(BaseModel):
    """What the dashboard draws (times are epoch seconds, buckets of ``bucket_s``)."""

    now: float
    bucket_s: float
    traffic: list[Series]
    drift: list[Series]
    accuracy: list[Series]
    alerts: list[EventOut]
    healing: list[EventOut]
    explanations: list[EventOut] = Field(default_factory=list)
    models: ModelsResponse
    health: HealthResponse


def predict_response_json(model_version: str | None, client_id: str, decisions: Any,
                          class_names: list[str] | None = None) -> bytes:
    """A :class:`PredictResponse` as JSON bytes, built straight from the guard's
    decisions (same fields and order as ``PredictResponse(...).model_dump_json()``;
    a non-finite number becomes ``null``, as pydantic writes it). With ``class_names``
    (a text model's), ``label_names`` names each label."""
    import orjson

    preds = []
    for d in decisions:
        preds.append({
            "request_id": d.request_id, "label": d.label, "probabilities": d.probabilities,
            "verdict": d.verdict, "answered_by": d.answered_by,
            "model_version": d.model_version, "why": d.why,
            # a Reason's fields, in their declared order, are its __dict__ (written by
            # _reason_fields below without a copy per reason)
            "reasons": d.reasons, "scores": d.scores})
    body = {"model_version": model_version, "client_id": client_id,
            "request_ids": [p["request_id"] for p in preds],
            "labels": [p["label"] for p in preds],
            "probabilities": [p["probabilities"] for p in preds],
            "verdicts": [p["verdict"] for p in preds], "predictions": preds,
            "explanations": None,
            "label_names": None if class_names is None else [
                None if p["label"] is None else class_names[p["label"]] for p in preds]}
    # numpy scalars (a custom detector's score) are written as numbers too
    return orjson.dumps(body, default=_reason_fields, option=orjson.OPT_SERIALIZE_NUMPY)


def _reason_fields(o: Any) -> Any:
    """orjson's fallback: a pydantic model (a Reason) as its fields."""
    if isinstance(o, BaseModel):
        return o.__dict__
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
