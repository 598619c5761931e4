"""The service's settings: one pydantic model, readable from a YAML or JSON file.

The admin token is taken from ``$BASTION_ADMIN_TOKEN`` first, then from the config file's
``admin_token``; with neither, the admin routes (promote, rollback) are off. The token
is a :class:`pydantic.SecretStr`, so it never shows in a repr, a log line or the
``/v1/health`` answer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from bastion._util import read_mapping_file
from bastion.errors import BastionError
from bastion.runtime.alerting import AlertingConfig
from bastion.runtime.fairness import FairnessSettings
from bastion.runtime.guard import GuardPolicy
from bastion.runtime.healing import HealingPolicy
from bastion.web.limits import HttpLimits

ADMIN_TOKEN_ENV = "BASTION_ADMIN_TOKEN"
DEFAULT_DETECTORS: tuple[str, ...] = ("outlier", "confidence", "squeeze")


class ServiceConfig(BaseModel):
    """Everything ``create_app`` needs.

    - ``model``: ``registry:NAME`` (serve NAME's ``champion`` alias), or a Bastion model
      folder / ``builtin:NAME``, which is registered (once per content hash) under
      ``model_name`` and promoted when it is not the champion already.
    - ``reference``: a data spec; its training split is the trusted reference the
      detectors are calibrated on (and the retrain data), its test split the gates'
      holdout.
    - ``events_url``, ``tracking_uri``: the event store and the MLflow store.
    - ``guard``: run the detectors in the request path (``False``: answer with the bare
      champion, still logging every prediction; the benchmark's "guard off").
    - ``detectors``, ``fpr``: which detectors, calibrated to what false-positive rate.
    - ``outlier_method``: ``knn`` (NumPy k-NN distance, fast enough for the request path;
      the default) or PyOD's ``iforest`` / ``ecod`` (30-120 ms per request).
    - ``text_embedder``: for a text model, what the outlier detector embeds texts with:
      ``minilm`` (the shipped sentence encoder, the default) or ``model`` (the served
      model's own pooled features); see :mod:`bastion.detect.text`. ``max_text_chars``:
      the longest text a text model is sent (a longer one is a 413).
    - ``extraction``: per-client extraction (PRADA) detection.
    - ``policy``: the :class:`~bastion.runtime.guard.GuardPolicy`.
    - ``healing``: the :class:`~bastion.runtime.healing.HealingPolicy`;
      ``heal_interval_s > 0`` runs a controller step that often in the service;
      ``relative_client_monitor`` judges each client against the other clients (see
      :mod:`bastion.service.monitors`) instead of against the calibrated rate only.
    - ``reload_interval_s``: how often the service checks the registry's aliases (a
      promotion by ``bastion heal`` in another process is picked up within this).
    - ``max_batch``, ``max_body_bytes``, ``max_feedback``: request limits.
    - ``auth``: ``keys`` (the default: every route but ``/v1/health`` and the dashboard
      page needs an API key, see :mod:`bastion.web.auth`; with no key created yet only
      the admin token gets in) or ``open`` (local demos: callers without a key are
      admins, labelled by ``X-Client-Id``; said loudly at start-up and in
      ``/v1/health``). ``key_refresh_s``: how often the key table is re-read (a
      revocation takes effect within this).
    - ``max_queue_rows``: inputs waiting for the guard at most; a request that would
      queue more is refused with 503 and ``Retry-After`` (memory stays bounded).
    - ``limits``: timeouts, connection cap, per-key rate limit, in-flight cap and deadline
      (:class:`~bastion.web.limits.HttpLimits`; ``limits: {rate_limit_per_s: 20}`` in a
      config file).
    - ``explain_rate_per_s``, ``explain_burst``, ``explain_max_batch``: the separate,
      lower budget of ``POST /v1/predict`` with ``explain: true`` per client (``0``:
      explanations off) and its batch cap.
    - ``alerting``: receivers the alerts go out to (Alertmanager webhook, signed JSON
      webhook, Slack; :class:`~bastion.runtime.alerting.AlertingConfig`), delivered by
      a background worker per receiver with retries.
    - ``fairness``: for a tabular model, the protected input column whose groups the
      ``fairness`` monitor compares (selection and error rates, with intervals; see
      :mod:`bastion.runtime.fairness`); add a rule ``{monitor: fairness, actions:
      [alert]}`` (in the default policy) to alert on it.
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    reference: str
    model_name: str | None = None
    events_url: str = "sqlite:///bastion-events.db"
    tracking_uri: str | None = None
    admin_token: SecretStr | None = None
    guard: bool = True
    detectors: list[str] = Field(default_factory=lambda: list(DEFAULT_DETECTORS))
    fpr: float = Field(default=0.01, gt=0.0, lt=0.5)
    outlier_method: Literal["knn", "iforest", "ecod"] = "knn"
    reference_limit: int = Field(default=1000, ge=50)
    text_embedder: Literal["minilm", "model"] = "minilm"
    max_text_chars: int = Field(default=2000, ge=1, le=1_000_000)
    extraction: bool = True
    extraction_delta: float = Field(default=0.85, gt=0.0, lt=1.0)
    extraction_min_queries: int = Field(default=50, ge=3)
    extraction_window: int = Field(default=1000, ge=10)
    policy: GuardPolicy = Field(default_factory=GuardPolicy)
    healing: HealingPolicy = Field(default_factory=HealingPolicy)
    heal_interval_s: float = Field(default=0.0, ge=0.0)
    relative_client_monitor: bool = True
    reload_interval_s: float = Field(default=2.0, ge=0.0)
    max_batch: int = Field(default=256, ge=1, le=100_000)
    max_body_bytes: int = Field(default=2_000_000, ge=1024)
    max_feedback: int = Field(default=1000, ge=1)
    auth: Literal["keys", "open"] = "keys"
    key_refresh_s: float = Field(default=2.0, gt=0.0, le=3600.0)
    max_queue_rows: int = Field(default=1024, ge=1)
    limits: HttpLimits = Field(default_factory=HttpLimits)
    explain_rate_per_s: float = Field(default=0.5, ge=0.0)
    explain_burst: int = Field(default=5, ge=1, le=10_000)
    explain_max_batch: int = Field(default=16, ge=1, le=1024)
    alerting: AlertingConfig = Field(default_factory=AlertingConfig)
    fairness: FairnessSettings | None = None
    seed: int = 0

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> ServiceConfig:
        """Read a YAML (``.yaml``/``.yml``) or JSON file; a top-level ``service:`` key is
        accepted; ``overrides`` (not None) win over the file."""
        doc = read_mapping_file(path, what="config file", hint="check --config")
        doc = dict(doc.get("service", doc))
        doc.update({k: v for k, v in overrides.items() if v is not None})
        return cls.build(**doc)

    @classmethod
    def build(cls, **fields: Any) -> ServiceConfig:
        """Validate ``fields`` into a config, with a one-line :class:`BastionError`."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(x) for x in first.get("loc", ()))
            raise BastionError(f"bad service config: {loc}: {first.get('msg')}",
                               hint="see bastion.service.config.ServiceConfig") from None

    def token(self) -> str | None:
        """The admin token: ``$BASTION_ADMIN_TOKEN``, else the config's, else None."""
        env = os.environ.get(ADMIN_TOKEN_ENV, "")
        if env.strip():
            return env.strip()
        if self.admin_token is not None and self.admin_token.get_secret_value().strip():
            return self.admin_token.get_secret_value().strip()
        return None
