"""The service's state, without HTTP: the registry, the guarded champion, the event store,
the healing controller and the background loop that keeps them in step.

:class:`BastionService` is what ``create_app`` wraps (and what the demo and the tests can
call directly). Startup:

1. load the trusted reference data (``config.reference``);
2. open the event store and the :class:`~bastion.registry.models.ModelRegistry`;
3. make sure the registry has a champion: ``registry:NAME`` must have one; a model folder
   or ``builtin:NAME`` is registered when its content (SHA-256 of its files) is not a
   version yet, and then promoted. A restart with the same ``--model`` therefore keeps
   whatever the registry says now (a champion the healing controller promoted is not
   undone);
4. load the champion and the ``fallback`` alias (when set), calibrate the detectors on
   the reference data and wrap both in a :class:`~bastion.runtime.guard.GuardedModel`.

When the champion changes (the API's promote/rollback, the in-process controller, or
``bastion heal`` in another process, seen by polling the aliases every
``reload_interval_s``), the new champion is loaded, its detectors recalibrated, and the
guard replaced between requests.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from bastion.errors import BastionError, DataError, ModelError
from bastion.runtime.guard import (
    STATE_QUARANTINE,
    STATE_TRAFFIC,
    CheckedInputs,
    CheckedTexts,
    GuardDecision,
    GuardedModel,
    GuardTuning,
    check_inputs,
    check_texts,
    is_text,
)
from bastion.runtime.healing import TEXT_HEALING
from bastion.service.config import ServiceConfig
from bastion.service.fastdetect import KnnOutlierDetector
from bastion.service.metrics import ServiceMetrics
from bastion.store import events as ev
from bastion.web.limits import Overloaded

ACTOR = "service"
DIGEST_TAG = "bastion.sha256"


def folder_digest(folder: Path) -> str:
    """SHA-256 over a model folder's files (names and contents), in name order."""
    from bastion._util import folder_digest as digest

    return digest(folder)


def model_folder(spec: str) -> Path:
    """The model folder behind ``spec``: a Bastion model folder, ``builtin:NAME``, a text
    model folder (``bastion train --model text-intent``) or ``hf:PATH`` (a local Hugging
    Face sequence classifier, checked by :func:`~bastion.models.text.check_text_folder`)."""
    from bastion.models.persist import is_model_folder
    from bastion.models.resolve import builtin_model_path, load_builtin
    from bastion.models.text import check_text_folder, is_text_folder

    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        load_builtin(name)  # trains and caches on first use
        return builtin_model_path(name)
    if spec.startswith("hf:"):
        p = Path(spec[3:]).expanduser()
        if not is_text_folder(p) or is_model_folder(p):
            raise ModelError(f"cannot serve {spec!r}: not a Hugging Face model folder "
                             "(config.json and model.safetensors)",
                             hint="save it with model.save_pretrained(PATH, "
                             "safe_serialization=True) and tokenizer.save_pretrained(PATH)")
        check_text_folder(p)
        return p
    p = Path(spec).expanduser()
    if p.is_dir() and is_model_folder(p):
        return p
    if p.is_dir() and is_text_folder(p):
        check_text_folder(p)
        return p
    raise ModelError(f"cannot serve {spec!r}: not a Bastion model folder, text model folder, "
                     "hf:FOLDER, builtin:NAME or registry:NAME",
                     hint="save the model with bastion train / save_model, or register it")


_GENERIC_FOLDERS = {"model", "models", "out", "output", "outputs", "final", "best",
                    "latest", "checkpoint", "artifacts", "bastion-out"}


def default_model_name(spec: str) -> str:
    """The registered name when ``--name`` is not given: ``builtin:NAME`` / ``registry:NAME``
    keep NAME; a folder its own name, or its parent's when the folder has a generic name
    (``out/hardened/model`` -> ``hardened``)."""
    if spec.startswith(("builtin:", "registry:")):
        base = spec.split(":", 1)[1]
    else:
        p = Path(spec.removeprefix("hf:")).expanduser().resolve()
        base = p.name
        while base.lower() in _GENERIC_FOLDERS and p.parent != p:
            p = p.parent
            base = p.name
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", base).strip("-")
    return name or "bastion-model"


def ensure_champion(registry: Any, spec: str) -> None:
    """Make sure ``registry`` has a champion for ``spec`` (step 3 of the module docs):
    ``registry:NAME`` must have one; a model folder or ``builtin:NAME`` is registered
    when its content is not a version yet, then promoted."""
    reg = registry
    if spec.startswith("registry:"):
        if reg.get_alias("champion") is None:
            raise ModelError(f"registered model {reg.name!r} has no champion",
                             hint="promote a version (bastion models promote) or serve "
                             "a model folder")
        return
    folder = model_folder(spec)
    digest = folder_digest(folder)
    known = [v.version for v in reg.versions() if v.tags.get(DIGEST_TAG) == digest]
    if known and reg.get_alias("champion") is not None:
        return  # this model is registered already; keep the registry's champion
    v = known[0] if known else reg.register(
        folder, tags={DIGEST_TAG: digest, "bastion.source": f"serve {spec}"})
    if reg.get_alias("champion") != v:
        reg.promote(v, reason=f"served by bastion serve --model {spec}", actor=ACTOR)


class ExtractionWatch:
    """Per-client extraction detection for the guard (PRADA,
    :class:`~bastion.detect.extraction.PradaDetector`).

    The guard asks ``observe(client_id, x)``; this keeps one detector per client and
    starts a client's detector afresh every ``window`` queries (bounding memory and time:
    PRADA's growing set otherwise grows with every query); a client once flagged stays
    flagged. Scores are ``1 - W`` (Shapiro-Wilk), so higher means more suspicious and
    ``threshold_ = 1 - delta``.

    An exact repeat of one of the client's earlier queries (a retry, a cached page) is
    not fed to PRADA: it adds nothing an extraction attacker could learn from, and its
    zero distance would make an honest client's stream look synthetic.
    """

    def __init__(self, *, delta: float = 0.85, min_queries: int = 50, window: int = 1000,
                 max_clients: int = 10_000) -> None:
        self.delta, self.min_queries, self.window = float(delta), int(min_queries), int(window)
        self.max_clients = int(max_clients)
        self.threshold_ = 1.0 - self.delta
        self._dets: dict[str, Any] = {}
        self._flagged: set[str] = set()
        self._seen: dict[str, set[bytes]] = {}
        self._lock = threading.Lock()

    def observe(self, client_id: str, x: np.ndarray) -> dict[str, Any]:
        """One query from ``client_id``; the client's verdict after it."""
        return self.observe_many(client_id, np.asarray(x)[None])

    def observe_many(self, client_id: str, xs: np.ndarray) -> dict[str, Any]:
        """Several queries of one request from ``client_id``, in order; the client's
        verdict after the last (one Shapiro-Wilk test per request, not per query)."""
        from bastion.detect.extraction import PradaDetector

        qs = np.ascontiguousarray(xs, dtype=np.float32).reshape(len(xs), -1)
        with self._lock:
            det = self._dets.get(client_id)
            for q in qs:
                if det is None or det.n_queries_ >= self.window:
                    if det is not None:
                        det.test()  # the old window's last queries
                        if det.drift_detected:
                            self._flagged.add(client_id)
                    if det is None and len(self._dets) >= self.max_clients:
                        old = next(iter(self._dets))
                        self._dets.pop(old)
                        self._seen.pop(old, None)
                    det = self._dets[client_id] = PradaDetector(
                        delta=self.delta, min_queries=self.min_queries, window=self.window)
                    self._seen[client_id] = set()
                seen = self._seen[client_id]
                key = hashlib.blake2b(q.tobytes(), digest_size=12).digest()
                if key not in seen:
                    seen.add(key)
                    det.update(q, test=False)
            assert det is not None
            det.test()
            if det.drift_detected:
                self._flagged.add(client_id)
            flagged = client_id in self._flagged
            return {"flagged": flagged, "score": 1.0 - float(det.w_),
                    "note": "query stream looks like model extraction (PRADA)" if flagged
                    else None}

    def flagged(self) -> list[str]:
        with self._lock:
            return sorted(self._flagged)


class _Pending:
    __slots__ = ("x", "client_id", "out", "error", "done")

    def __init__(self, x: Any, client_id: str) -> None:
        self.x, self.client_id = x, client_id
        self.out: list[GuardDecision] | None = None
        self.error: BaseException | None = None
        self.done = False


class RequestCoalescer:
    """Answers concurrent requests together (the guard's work is mostly per call).

    A caller queues its batch; whichever caller finds no pass in progress becomes the
    leader, takes the queued batches (up to ``max_rows`` inputs) and answers them with
    one :meth:`~bastion.runtime.guard.GuardedModel.predict_many` call (one forward
    pass, one event-store write), then wakes the others. A lone request is answered at
    once (nothing waits for company); under load, requests arriving during a pass share
    the next one. If a shared pass fails, each batch is retried alone so an error
    reaches only the caller it belongs to. At most ``max_queue_rows`` inputs wait: a
    batch that would queue more (behind others) raises :class:`Overloaded`.
    """

    def __init__(self, max_rows: int = 256, max_queue_rows: int = 1024) -> None:
        self.max_rows = max(int(max_rows), 1)
        self.max_queue_rows = max(int(max_queue_rows), 1)
        self._cv = threading.Condition()
        self._queue: list[_Pending] = []
        self._queued_rows = 0
        self._busy = False

    def predict(self, guard: Any, x: Any, client_id: str) -> list[GuardDecision]:
        """The guard's answers for ``x`` from ``client_id`` (shared with concurrent
        callers of the same guard when they overlap)."""
        p = _Pending(x, client_id)
        with self._cv:
            if self._queue and self._queued_rows + len(x) > self.max_queue_rows:
                raise Overloaded(f"{self._queued_rows} inputs are waiting for the guard "
                                 f"already (the limit is {self.max_queue_rows})")
            self._queue.append(p)
            self._queued_rows += len(x)
            while not p.done:
                if self._busy:
                    self._cv.wait()
                    continue
                self._busy = True
                group: list[_Pending] = []
                rows = 0
                while self._queue and (not group or rows + len(self._queue[0].x)
                                       <= self.max_rows):
                    q = self._queue.pop(0)
                    group.append(q)
                    rows += len(q.x)
                self._queued_rows -= rows
                self._cv.release()
                try:
                    self._answer(guard, group)
                finally:
                    self._cv.acquire()
                    self._busy = False
                    for g in group:
                        if g.out is None and g.error is None:
                            g.error = BastionError("the guard was interrupted before "
                                                   "answering")
                        g.done = True
                    self._cv.notify_all()
        if p.error is not None:
            raise p.error
        assert p.out is not None
        return p.out

    def answer(self, guard: Any, group: list[_Pending]) -> None:
        """Answer ``group`` (filling each item's ``out`` or ``error``) as one pass, taking
        turns with the passes of :meth:`predict` (one pass of the guard at a time)."""
        with self._cv:
            while self._busy:
                self._cv.wait()
            self._busy = True
        try:
            self._answer(guard, group)
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    @staticmethod
    def _answer(guard: Any, group: list[_Pending]) -> None:
        try:
            outs = guard.predict_many([(g.x, g.client_id, None) for g in group])
            for g, o in zip(group, outs, strict=True):
                g.out = o
            return
        except Exception as exc:
            if len(group) == 1:
                group[0].error = exc
                return
        for g in group:
            try:
                g.out = guard.predict(g.x, client_id=g.client_id)
            except Exception as exc:
                g.error = exc


class GuardWorker:
    """One thread that answers the requests an event loop hands it, in groups.

    :meth:`submit` queues a checked batch with a callback and returns at once; the
    worker takes everything queued (up to ``max_rows`` inputs), answers it with one
    guarded pass (through the service's :class:`RequestCoalescer`, so it never overlaps
    a pass of :meth:`BastionService.predict`), updates the metrics, and then calls each
    callback with ``(decisions, None)`` or ``(None, error)``. Under load, requests that
    arrive during a pass share the next one; a lone request is answered at once. The
    callbacks run in the worker thread (an asyncio caller hands the result back with
    ``loop.call_soon_threadsafe``).

    The queue is bounded: when ``max_queue_rows`` inputs are waiting, a batch that would
    add to them raises :class:`~bastion.web.limits.Overloaded` (the app answers 503 with
    ``Retry-After``) instead of growing memory; a batch alone in the queue is always
    taken.
    """

    def __init__(self, service: BastionService, max_rows: int = 256,
                 max_queue_rows: int = 1024) -> None:
        self.service = service
        self.max_rows = max(int(max_rows), 1)
        self.max_queue_rows = max(int(max_queue_rows), 1)
        self._cv = threading.Condition()
        self._queue: list[tuple[_Pending, Any]] = []
        self._queued_rows = 0
        self._thread: threading.Thread | None = None
        self._stop = False

    def submit(self, x: Any, client_id: str, done: Any) -> None:
        """Queue ``x`` (already checked by :meth:`BastionService.prepare_inputs`) from
        ``client_id``; ``done(decisions, error)`` is called once, from the worker."""
        with self._cv:
            if self._stop:
                raise BastionError("the service is shutting down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="bastion-guard",
                                                daemon=True)
                self._thread.start()
            if self._queue and self._queued_rows + len(x) > self.max_queue_rows:
                raise Overloaded(f"{self._queued_rows} inputs are waiting for the guard "
                                 f"already (the limit is {self.max_queue_rows})")
            self._queue.append((_Pending(x, client_id), done))
            self._queued_rows += len(x)
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue:
                    return
                group: list[tuple[_Pending, Any]] = []
                rows = 0
                while self._queue and (not group or rows + len(self._queue[0][0].x)
                                       <= self.max_rows):
                    item = self._queue.pop(0)
                    group.append(item)
                    rows += len(item[0].x)
                self._queued_rows -= rows
            pend = [g for g, _ in group]
            try:
                svc = self.service
                svc._coalescer.answer(svc.guard, pend)
                for g in pend:
                    if g.out is not None:
                        svc._count(g.out)
            except BaseException as exc:  # never leave a caller waiting
                for g in pend:
                    if g.out is None and g.error is None:
                        g.error = exc
            for g, done in group:
                try:
                    done(g.out, None if g.out is not None else (
                        g.error or BastionError("the guard did not answer")))
                except Exception:  # a caller's callback must not stop the worker
                    pass

    def close(self) -> None:
        """Answer what is queued, then stop the thread."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            t = self._thread
        if t is not None:
            t.join(timeout=30)


class BastionService:
    """See the module docs. Call :meth:`start` for the background loop and :meth:`close`
    at the end."""

    def __init__(self, config: ServiceConfig, *, data: Any = None,
                 extraction: Any = None) -> None:
        from bastion.data import load_data
        from bastion.registry.models import ModelRegistry

        self.config = config
        self.metrics = ServiceMetrics()
        self.started_at = time.time()
        self.last_error: str | None = None
        self._lock = threading.RLock()
        self._heal_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._coalescer = RequestCoalescer(max_rows=config.max_batch,
                                           max_queue_rows=config.max_queue_rows)
        self.worker = GuardWorker(self, max_rows=config.max_batch,
                                  max_queue_rows=config.max_queue_rows)
        # ``data``: an already split Dataset (the demo keeps its traffic pool apart)
        self.data = data if data is not None else load_data(config.reference, seed=config.seed)
        self.store = ev.EventStore(config.events_url)
        spec = config.model
        self.model_name = config.model_name or default_model_name(spec)
        self.registry = ModelRegistry(self.model_name, tracking_uri=config.tracking_uri,
                                      store=self.store)
        self._ensure_champion(spec)
        # ``extraction``: a per-client query-pattern watch shared with other processes
        # (the Ray replicas' one, :mod:`bastion.service.ray_serve`) instead of this one's
        self.extraction = (extraction if extraction is not None else ExtractionWatch(
            delta=config.extraction_delta, min_queries=config.extraction_min_queries,
            window=config.extraction_window)) if (config.extraction and config.guard) else None
        self.champion_version: int | None = None
        self.fallback_version: int | None = None
        self._champion: Any = None
        self._fallback: Any = None
        self.guard: GuardedModel
        #: detectors of ``config.detectors`` not run for this champion, with why (a text
        #: model has no pixels to squeeze); shown in ``GET /v1/health``
        self.skipped_detectors: dict[str, str] = {}
        self._controller: Any = None
        self._cursor = self.store.last_id()
        self.metrics.watch_store(self.store)
        from bastion.web.limits import TokenBuckets

        self._explain_lock = threading.Lock()
        # a text model's unit-length features of the reference texts, by model (computed
        # at its first explanation of a flagged text: 600 texts take seconds)
        self._ref_text_feats: weakref.WeakKeyDictionary[Any, np.ndarray] = \
            weakref.WeakKeyDictionary()
        self._explain_buckets = TokenBuckets(max(config.explain_rate_per_s, 1e-9),
                                             config.explain_burst)
        self.alerts: Any = None
        if config.alerting.receivers:
            from bastion.runtime.alerting import AlertDispatcher

            self.alerts = AlertDispatcher(self.store, config.alerting,
                                          model_name=self.model_name)
        self.sync_models(force=True)
        if config.heal_interval_s > 0 and self.is_text():
            self.close()
            raise BastionError(TEXT_HEALING, hint="serve it without --heal-interval")
        self._fairness_monitors()  # a bad fairness section fails here, at start-up
        last = self.store.recent(ev.HEALING_STEP, 1)
        if last:
            self.metrics.observe_event(ev.HEALING_STEP, last[0].payload)

    # -- models ---------------------------------------------------------------------
    def _ensure_champion(self, spec: str) -> None:
        ensure_champion(self.registry, spec)

    def _load(self, version: int) -> Any:
        from bastion.data.validate import check_dataset_for_model

        m = self.registry.load(version)
        if is_text(m) or getattr(self.data, "kind", None) == "text":
            self._check_text_reference(m)
        else:
            check_dataset_for_model(self.data, m)
        return m

    def _check_text_reference(self, m: Any) -> None:
        """A text model needs text reference data whose labels it knows (by name), and
        text data needs a text model: one line otherwise."""
        ds = self.data
        if not is_text(m):
            raise ModelError(f"the reference {self.config.reference!r} is text but the model "
                             f"takes numeric inputs of shape {tuple(m.input_shape)}",
                             hint="serve a text model (a text-intent folder or hf:FOLDER) "
                             "or pick the data the model was trained on")
        if getattr(ds, "kind", None) != "text":
            raise ModelError(f"the model classifies text but the reference "
                             f"{self.config.reference!r} is {ds.kind} data",
                             hint="use text data: clinc150:PATH, jsonl:PATH or text-csv:PATH")
        names = list(getattr(m, "class_names", None) or [])
        missing = [n for n in (ds.class_names or []) if n not in names]
        if names and missing:
            raise ModelError(f"the reference has labels the model does not know: "
                             f"{', '.join(map(str, missing[:5]))}",
                             hint=f"the model's labels: {', '.join(names[:10])}")

    def _build_guard(self, champion: Any, cv: int, fallback: Any, fv: int | None
                     ) -> GuardedModel:
        from bastion.runtime.detectors import build_detectors

        c = self.config
        dets: dict[str, Any] = {}
        self.skipped_detectors = {}
        if c.guard and c.detectors and is_text(champion):
            x = self._text_reference()
            dets, self.skipped_detectors = self._text_detectors(champion, x)
            self._record_reference_scores(dets, x)
            self._record_calibration(dets, x, cv)
        elif c.guard and c.detectors:
            x = self.data.x_train[: c.reference_limit]
            which = list(c.detectors)
            fast = "outlier" in which and c.outlier_method == "knn"
            if fast:
                which.remove("outlier")
            if which:
                dets = build_detectors(champion, x, fpr=c.fpr, which=which, seed=c.seed,
                                       outlier_method=c.outlier_method if not fast else "iforest")
            if fast:
                # fit on 60%, calibrate on the rest, as build_detectors does
                idx = np.random.default_rng(c.seed).permutation(len(x))
                cut = int(0.6 * len(x))
                dets = {"outlier": KnnOutlierDetector(seed=c.seed).fit(x[idx[:cut]]).calibrate(
                    x[idx[cut:]], fpr=c.fpr), **dets}
            self._record_reference_scores(dets, x)
            self._record_calibration(dets, x, cv)
        extraction = self.extraction
        if extraction is not None and is_text(champion):
            extraction = None
            self.skipped_detectors["extraction"] = (
                "PRADA tests the distances between a client's numeric queries; not applied "
                "to a text model")
        return GuardedModel(champion, detectors=dets, policy=c.policy, fallback=fallback,
                            extraction_detector=extraction, store=self.store,
                            model_version=cv, fallback_version=fv, max_batch=c.max_batch,
                            max_text_chars=c.max_text_chars)

    def _text_reference_index(self) -> np.ndarray:
        """The training rows of :meth:`_text_reference`, in order."""
        c = self.config
        n = len(self.data.x_train)
        return np.sort(np.random.default_rng(c.seed).permutation(n)[: c.reference_limit])

    def _text_reference(self) -> np.ndarray:
        """Up to ``reference_limit`` training texts, a seeded random sample (a text file is
        often sorted by label, so its first rows would cover few labels)."""
        return np.asarray(self.data.x_train, dtype=object)[self._text_reference_index()]

    def _text_detectors(self, model: Any, x: np.ndarray
                        ) -> tuple[dict[str, Any], dict[str, str]]:
        """The guard's detectors for a text model and the ones skipped, with why: the
        outlier detector on sentence embeddings (:mod:`bastion.detect.text`) and the
        confidence check, fitted on 60% of the reference texts and calibrated on the
        rest, as for other models."""
        from bastion.detect.adversarial import ConfidenceDetector
        from bastion.detect.outlier import OutlierDetector
        from bastion.detect.text import TextEmbeddingDetector, text_embedder
        from bastion.runtime.detectors import DETECTOR_NAMES

        c = self.config
        bad = set(c.detectors) - set(DETECTOR_NAMES)
        if bad:
            raise BastionError(f"unknown detectors {sorted(bad)}",
                               hint=f"choose from {', '.join(DETECTOR_NAMES)}")
        if len(x) < 50:
            raise DataError(f"detectors need at least 50 clean reference texts, got {len(x)}")
        idx = np.random.default_rng(c.seed).permutation(len(x))
        cut = int(0.6 * len(x))
        x_fit, x_cal = x[idx[:cut]], x[idx[cut:]]
        dets: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        for name in c.detectors:
            if name == "outlier":
                inner: Any = (KnnOutlierDetector(seed=c.seed) if c.outlier_method == "knn"
                              else OutlierDetector(method=c.outlier_method, seed=c.seed))
                dets[name] = TextEmbeddingDetector(
                    inner, text_embedder(c.text_embedder, model), embedder=c.text_embedder
                ).fit(x_fit).calibrate(x_cal, fpr=c.fpr)
            elif name == "confidence":
                det = ConfidenceDetector(model)
                det.calibrate(x_cal, fpr=c.fpr)
                dets[name] = det
            elif name == "squeeze":
                skipped[name] = ("feature squeezing lowers pixel bit depth and smooths "
                                 "images; a text has neither (not applied to text models)")
            else:
                skipped[name] = ("the learned detector trains on PGD examples, which need "
                                 "continuous inputs (not applied to text models)")
        return dets, skipped

    def _record_reference_scores(self, dets: dict[str, Any], x: np.ndarray,
                                 n_max: int = 500) -> None:
        """Store each detector's scores on the clean held-out part of the reference (the
        40% every detector is calibrated on, never fitted on), so the per-client monitors
        can test a client's scores against clean data as well as against the other
        clients (:func:`bastion.runtime.monitors.client_score_shift`)."""
        from bastion.runtime.monitors import REFERENCE_SCORES_KEY

        idx = np.random.default_rng(self.config.seed).permutation(len(x))
        x_cal = x[idx[int(0.6 * len(x)):]][:n_max]
        ref: dict[str, list[float]] = {}
        for name, det in dets.items():
            try:
                s = np.asarray(det.score(x_cal), dtype=np.float64).ravel()
            except Exception:  # a detector that cannot score a plain batch: no reference
                continue
            if len(s) == len(x_cal) and np.all(np.isfinite(s)):
                ref[name] = [round(float(v), 6) for v in s]
        self.store.set_state(REFERENCE_SCORES_KEY, ref)

    def _record_calibration(self, dets: dict[str, Any], x: np.ndarray, cv: int) -> None:
        """Record each detector's threshold, the target false-positive rate and the rate
        observed on the clean calibration split (the 40% it was calibrated on: in-sample,
        so close to the target by construction), for this version's factsheet."""
        from bastion.runtime.factsheet import calibration_key

        idx = np.random.default_rng(self.config.seed).permutation(len(x))
        x_cal = x[idx[int(0.6 * len(x)):]]
        out: dict[str, Any] = {}
        for name, det in dets.items():
            thr = getattr(det, "threshold_", None)
            try:
                s = np.asarray(det.score(x_cal), dtype=np.float64).ravel()
            except Exception:
                s = np.asarray([])
            k = int((s > thr).sum()) if thr is not None and len(s) else 0
            out[name] = {"threshold": thr, "n": int(len(s)), "flagged": k,
                         "observed_fpr": round(k / len(s), 4) if len(s) else None,
                         "split": "calibration (in-sample)"}
        self.store.set_state(calibration_key(self.model_name, cv), {
            "target_fpr": self.config.fpr, "detectors": out, "at": time.time()})

    def sync_models(self, *, force: bool = False) -> bool:
        """Load the registry's champion and fallback when they changed; return whether
        the guard was replaced."""
        with self._lock:
            aliases = self.registry.aliases()
            cv, fv = aliases.get("champion"), aliases.get("fallback")
            if cv is None:
                raise ModelError(f"registered model {self.model_name!r} has no champion")
            if not force and cv == self.champion_version and fv == self.fallback_version:
                return False
            champion = self._champion if cv == self.champion_version else self._load(cv)
            if fv is None:
                fallback = None
            elif fv == cv:
                fallback = champion
            elif fv == self.fallback_version:
                fallback = self._fallback
            else:
                fallback = self._load(fv)
            guard = self._build_guard(champion, cv, fallback, fv)
            guard.refresh_state()
            self._champion, self._fallback = champion, fallback
            self.champion_version, self.fallback_version = cv, fv
            self.guard = guard
            self.metrics.champion.set(cv)
            return True

    # -- requests -------------------------------------------------------------------
    def prepare_inputs(self, inputs: Any, *, scan_bools: bool = True) -> CheckedInputs:
        """The one check of a batch against the serving model (the fast path and the
        route both call it; the guard trusts what it returns): see
        :func:`~bastion.runtime.guard.check_inputs`. Raises ``InputError``."""
        model = self.guard.model
        if is_text(model):
            return check_texts(inputs, max_batch=self.config.max_batch,  # type: ignore[return-value]
                               max_chars=self.config.max_text_chars)
        return check_inputs(inputs, input_shape=model.input_shape,
                            bounds=tuple(getattr(model, "bounds", (-np.inf, np.inf))),
                            max_batch=self.config.max_batch, scan_bools=scan_bools)

    def predict(self, inputs: Any, *, client_id: str) -> list[GuardDecision]:
        x = inputs if isinstance(inputs, CheckedInputs | CheckedTexts) else \
            self.prepare_inputs(inputs)
        out = self._coalescer.predict(self.guard, x, client_id)
        self._count(out)
        return out

    def explain_budget(self, client_id: str) -> float:
        """Take one explanation from ``client_id``'s budget: 0.0 when granted, else the
        seconds until one is (``inf``: explanations are off)."""
        if self.config.explain_rate_per_s <= 0:
            return float("inf")
        with self._explain_lock:
            return self._explain_buckets.take(client_id)

    def explain(self, x: np.ndarray, decisions: list[GuardDecision], *,
                client_id: str) -> list[dict[str, Any]]:
        """An attribution per input, by the model that answered it (the champion for a
        blocked input). A flagged or blocked input's explanation also gets its nearest
        clean reference input's attribution for the same class, and both are recorded
        as an ``explanation`` event (the dashboard shows them side by side). A text
        model's inputs get word attributions (:meth:`_explain_texts`)."""
        from bastion.evaluate.explain import explain

        if self.is_text():
            return self._explain_texts(x, decisions, client_id=client_id)
        x = np.asarray(getattr(x, "array", x), dtype=np.float32)
        with self._lock:
            models = {"champion": self._champion, "fallback": self._fallback}
        out: list[dict[str, Any] | None] = [None] * len(decisions)
        ref = np.asarray(self.data.x_train[: self.config.reference_limit], dtype=np.float32)
        for name in ("champion", "fallback"):
            idx = [i for i, d in enumerate(decisions)
                   if (d.answered_by if d.answered_by != "none" else "champion") == name]
            if not idx or models[name] is None:
                continue
            exps = explain(models[name], x[idx], seed=self.config.seed)
            for i, e in zip(idx, exps, strict=True):
                out[i] = {**e.as_dict(), "explained_model": name, "reference": None}
            flagged = [i for i in idx if decisions[i].verdict != "allow"]
            if not flagged:
                continue
            flat = ref.reshape(len(ref), -1)
            near = []
            for i in flagged:
                dist = np.linalg.norm(flat - x[i].reshape(1, -1), axis=1)
                near.append((int(dist.argmin()), float(dist.min())))
            ref_exps = explain(models[name], ref[[j for j, _ in near]],
                               targets=[out[i]["target"] for i in flagged],  # type: ignore[index]
                               seed=self.config.seed)
            events = []
            for i, (j, dist), re_ in zip(flagged, near, ref_exps, strict=True):
                r = {"index": j, "label": int(self.data.y_train[j]), "distance": round(dist, 5),
                     "attribution": re_.as_dict()["attribution"]}
                out[i]["reference"] = r  # type: ignore[index]
                events.append({"kind": ev.EXPLANATION, "client_id": client_id,
                               "request_id": decisions[i].request_id,
                               "model_version": decisions[i].model_version,
                               "payload": {**out[i], "verdict": decisions[i].verdict,  # type: ignore[dict-item]
                                           "shape": list(x.shape[1:]),
                                           "reference": {**r, "reference_input": np.round(
                                               ref[j], 5).tolist()}}})
            self.store.append_many(events)
        return [o for o in out if o is not None]

    def _explain_texts(self, x: Any, decisions: list[GuardDecision], *,
                       client_id: str) -> list[dict[str, Any]]:
        """:meth:`explain` for a text model: word attributions
        (:func:`~bastion.evaluate.explain.explain_text`). A flagged or blocked text's
        nearest clean reference is the reference text (the detectors' sample of the
        training texts) whose ``features`` under the model that answered have the highest
        cosine similarity; the reference features are computed once per model (the first
        time it has a flagged text to explain) and kept while the model is.
        The answer carries the reference's index, label, similarity and word attributions;
        the ``explanation`` event also has the reference text and its words, and the
        client's text and words under ``text``/``words``, which a reader does not see
        (:mod:`bastion.web.redact`)."""
        from bastion.detect.text import text_embedder
        from bastion.evaluate.explain import explain_text

        texts = [str(t) for t in np.asarray(getattr(x, "array", x), dtype=object).tolist()]
        with self._lock:
            models = {"champion": self._champion, "fallback": self._fallback}
        out: list[dict[str, Any] | None] = [None] * len(decisions)
        ref_rows: np.ndarray | None = None
        for name in ("champion", "fallback"):
            idx = [i for i, d in enumerate(decisions)
                   if (d.answered_by if d.answered_by != "none" else "champion") == name]
            model = models[name]
            if not idx or model is None:
                continue
            exps = explain_text(model, [texts[i] for i in idx], seed=self.config.seed)
            for i, e in zip(idx, exps, strict=True):
                out[i] = {**e.as_dict(), "explained_model": name, "reference": None}
            flagged = [i for i in idx if decisions[i].verdict != "allow"]
            if not flagged:
                continue
            if ref_rows is None:
                ref_rows = self._text_reference_index()
            ref_texts = [str(self.data.x_train[j]) for j in ref_rows]
            embed = text_embedder("model" if callable(getattr(model, "features", None))
                                  else "minilm", model)

            def unit(v: np.ndarray) -> np.ndarray:
                v = np.asarray(v, dtype=np.float64)
                return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

            ref_feats = self._ref_text_feats.get(model)
            if ref_feats is None or len(ref_feats) != len(ref_texts):
                ref_feats = unit(embed(ref_texts))
                try:
                    self._ref_text_feats[model] = ref_feats
                except TypeError:  # a model that takes no weak reference: not kept
                    pass
            sim = unit(embed([texts[i] for i in flagged])) @ ref_feats.T
            near = [(int(k), float(sim[r, k])) for r, k in enumerate(sim.argmax(1))]
            ref_exps = explain_text(model, [ref_texts[k] for k, _ in near],
                                    targets=[out[i]["target"] for i in flagged],  # type: ignore[index]
                                    seed=self.config.seed)
            events = []
            for i, (k, similarity), re_ in zip(flagged, near, ref_exps, strict=True):
                j = int(ref_rows[k])
                r = {"index": j, "label": int(self.data.y_train[j]),
                     "similarity": round(similarity, 5), "attribution": re_.as_dict()[
                         "attribution"]}
                out[i]["reference"] = r  # type: ignore[index]
                mine = {k_: v for k_, v in out[i].items()  # type: ignore[union-attr]
                        if k_ not in ("spans", "reference")}
                events.append({"kind": ev.EXPLANATION, "client_id": client_id,
                               "request_id": decisions[i].request_id,
                               "model_version": decisions[i].model_version,
                               "payload": {**mine, "verdict": decisions[i].verdict,
                                           "unit": "word", "text": texts[i],
                                           "reference": {**r, "reference_text": ref_texts[k],
                                                         "reference_words": re_.words}}})
            self.store.append_many(events)
        return [o for o in out if o is not None]

    def _count(self, out: list[GuardDecision]) -> None:
        """The prediction metrics of one answered batch."""
        m = self.metrics
        m.batch_size.observe(len(out))
        for d in out:
            m.prediction(d.verdict, d.answered_by).inc()
            for r in d.reasons:  # the checks that fired
                m.fired(r.detector).inc()

    def feedback(self, labels: dict[str, int], *, client_id: str | None,
                 owner: str | None = None) -> tuple[list[int], int]:
        """Store true labels; return the event ids and how many agree with the answers.

        With ``owner``, only requests that client was answered count: another client's
        request id is unknown (its existence is not told).

        Raises:
            KeyError: some request ids are unknown (their list is the exception's arg).
            DataError: a label out of range.
        """
        from bastion.runtime.guard import record_feedback

        n_classes = int(self.guard.model.n_classes)
        bad = {r: y for r, y in labels.items() if not 0 <= int(y) < n_classes}
        if bad:
            raise DataError(f"labels out of range [0, {n_classes}): "
                            f"{dict(list(bad.items())[:10])}")
        preds = {e.request_id: e for e in self.store.query(
            kinds=ev.PREDICTION, request_id=list(labels), limit=None)}
        if owner is not None:
            preds = {r: e for r, e in preds.items() if e.client_id == owner}
        unknown = [r for r in labels if r not in preds]
        if unknown:
            raise KeyError(unknown)
        ids = record_feedback(self.store, labels, client_id=client_id, n_classes=n_classes)
        correct = sum(1 for r, y in labels.items()
                      if preds[r].payload.get("label") == int(y))
        self.metrics.feedback.labels("true").inc(correct)
        self.metrics.feedback.labels("false").inc(len(labels) - correct)
        self._update_accuracy()
        return ids, correct

    def _update_accuracy(self) -> None:
        from bastion.runtime.monitors import labelled_feedback

        pairs = labelled_feedback(self.store, after_id=0, upto_id=self.store.last_id(),
                                  limit=200)
        if pairs:
            ok = [p.payload.get("label") == f.payload.get("label") for p, f in pairs]
            self.metrics.accuracy.set(float(np.mean(ok)))

    # -- admin ----------------------------------------------------------------------
    def promote(self, version: int, *, reason: str) -> int:
        v = self.registry.promote(version, reason=reason, actor="api")
        self.sync_models()
        self.tail_events()
        return v

    def rollback(self, version: int | None, *, reason: str) -> int:
        v = self.registry.rollback(version, reason=reason, actor="api")
        self.sync_models()
        self.tail_events()
        return v

    # -- healing --------------------------------------------------------------------
    def controller(self) -> Any:
        """The healing controller (built on first use)."""
        from bastion.runtime.healing import HealingController
        from bastion.runtime.retrain import RetrainPipeline

        if self._controller is None:
            from bastion.runtime.monitors import ClientAlertMonitor
            from bastion.service.monitors import RelativeClientAlertMonitor

            pol = self.config.healing
            pipe = RetrainPipeline((self.data.x_train, self.data.y_train),
                                   (self.data.x_test, self.data.y_test), config=pol.retrain)
            relative = self.config.relative_client_monitor
            ms = pol.monitors

            def monitors(ctl: Any) -> list[Any]:
                # the defaults, rebuilt by the controller after each promotion, with the
                # per-client monitor judged against the other clients
                mons = ctl.default_monitors() + self._fairness_monitors()
                if not relative:
                    return list(mons)
                return [RelativeClientAlertMonitor(
                    expected_rate=ms.expected_alert_rate, window=5 * ms.window,
                    min_requests=ms.client_min_requests, alpha=ms.alpha,
                    min_rate=ms.client_min_rate) if isinstance(m, ClientAlertMonitor) else m
                    for m in mons]

            self._controller = HealingController(pol, self.store, self.registry, pipe,
                                                 monitor_factory=monitors)
        return self._controller

    def _fairness_monitors(self) -> list[Any]:
        """The group-fairness monitor for the champion, when ``fairness`` is set."""
        if self.config.fairness is None:
            return []
        from bastion.runtime.fairness import build_fairness_monitor

        with self._lock:
            champion = self._champion
        return [build_fairness_monitor(self.config.fairness,
                                       feature_names=self.data.feature_names,
                                       champion=champion, x_hold=self.data.x_test,
                                       y_hold=self.data.y_test)]

    def heal_once(self) -> Any:
        """One controller step (serialised), then pick up any new champion."""
        if self.is_text():
            raise BastionError(TEXT_HEALING)
        with self._heal_lock:
            rep = self.controller().step()
        self.sync_models()
        self.guard.refresh_state()
        self.tail_events()
        return rep

    # -- background -----------------------------------------------------------------
    def tail_events(self) -> None:
        """Feed new alert/audit/model-change/healing/delivery events into the metrics
        and hand new alerts to the receivers (queued: never waits for one)."""
        if self.alerts is not None:
            self.alerts.poll()
        kinds = [ev.ALERT, ev.AUDIT, ev.MODEL_CHANGE, ev.HEALING_STEP, ev.DELIVERY]
        while True:
            batch = self.store.query(kinds=kinds, after_id=self._cursor, limit=500)
            if not batch:
                break
            for e in batch:
                self.metrics.observe_event(e.kind, e.payload)
            self._cursor = batch[-1].id
        q = self.store.get_state(STATE_QUARANTINE, []) or []
        self.metrics.quarantined.set(len(q))
        self.metrics.fallback_active.set(1.0 if self.traffic() == "fallback" else 0.0)
        tuning = GuardTuning.read(self.store)
        self.metrics.fpr_scale.set(tuning.fpr_scale)
        self.metrics.squeeze_bits.set(tuning.squeeze_bits or 0)

    def _loop(self) -> None:
        c = self.config
        last_heal = time.monotonic()
        tick = min([t for t in (c.reload_interval_s, c.heal_interval_s) if t > 0] or [1.0])
        while not self._stop.wait(tick):
            try:
                if c.reload_interval_s > 0:
                    self.sync_models()
                if c.heal_interval_s > 0 and time.monotonic() - last_heal >= c.heal_interval_s:
                    last_heal = time.monotonic()
                    self.heal_once()
                self.tail_events()
                self.last_error = None
            except Exception as exc:  # keep serving; show it in /v1/health
                self.last_error = f"{type(exc).__name__}: {exc}"

    def start(self) -> None:
        """Start the background loop (alias polling, healing, metrics from events)."""
        if self._thread is None and (self.config.reload_interval_s > 0
                                     or self.config.heal_interval_s > 0
                                     or self.alerts is not None):
            self._thread = threading.Thread(target=self._loop, name="bastion-service",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        self.worker.close()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.alerts is not None:
            self.alerts.close()
        self.store.close()

    # -- views ----------------------------------------------------------------------
    def traffic(self) -> str:
        return str(self.store.get_state(STATE_TRAFFIC, "champion"))

    def tuning(self) -> dict[str, Any]:
        """The guard's run-time tuning set by the healing controller."""
        return GuardTuning.read(self.store).model_dump(mode="json")

    def quarantined(self) -> list[str]:
        return sorted(str(c) for c in (self.store.get_state(STATE_QUARANTINE, []) or []))

    def lift_quarantine(self, client_id: str, *, actor: str, reason: str) -> dict[str, Any]:
        """Lift a quarantine (audited) and make the guard see it at once."""
        from bastion.runtime.quarantine import lift_quarantine

        rec = lift_quarantine(self.store, client_id, actor=actor, reason=reason)
        self.guard.refresh_state()
        self.tail_events()
        return rec

    def models_view(self) -> dict[str, Any]:
        reg = self.registry
        return {
            "model_name": self.model_name, "aliases": reg.aliases(),
            "versions": [v.as_dict() for v in reg.versions()],
            "history": [h.as_dict() for h in reg.alias_history()],
            "serving": {"champion": self.champion_version, "fallback": self.fallback_version,
                        "traffic": self.traffic()},
        }

    def detector_names(self) -> list[str]:
        names = list(self.guard.detectors)
        if self.guard.extraction_detector is not None:
            names.append("extraction")
        return names

    def is_text(self) -> bool:
        """Whether the serving model classifies text."""
        return is_text(self.guard.model)

    def label_names(self) -> list[str] | None:
        """The serving model's class names (a text model's ``id2label``), else None."""
        m = self.guard.model
        names = getattr(m, "class_names", None) if is_text(m) else None
        return [str(n) for n in names] if names else None


__all__ = ["BastionService", "ExtractionWatch", "GuardWorker", "RequestCoalescer",
           "ensure_champion", "folder_digest", "model_folder"]
