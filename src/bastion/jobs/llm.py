"""The LLM jobs: ``bastion redteam`` and ``bastion llm train-detector | evaluate-detector |
harden-detector``. Each tracks its MLflow run and writes its report files.

(``bastion guard-llm`` is a server, not a job: it stays in the CLI.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from bastion.errors import BastionError
from bastion.jobs.deadline import run_with_deadline
from bastion.jobs.spec import DeadlineSpec, JobResult, Names, TrackedSpec, engine_of, ray_engine

Log = Callable[[str], None] | None


def _out_dir(out: Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BastionError(f"--out {out} is a file", hint="give a folder path")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ------------------------------------------------------------------ red team


class RedteamSpec(TrackedSpec):
    """What ``bastion redteam`` runs against an OpenAI-compatible chat agent."""

    target: str
    """Base URL of the chat API, e.g. ``http://host:8000/v1`` (``--target``)."""
    model: str
    """Model name sent to the target (``--model``)."""
    out: Path
    """Output folder: ``report.json``, ``report.html``, ``attempts.jsonl`` (``--out``)."""
    system_prompt: Path | None = None
    """File with the agent's system prompt, for the non-canary probes
    (``--system-prompt``)."""
    secret: str | None = None
    """Secret the agent must not leak (default: a planted canary; ``--secret``)."""
    probes: Names | None = None
    """Probe families: canary, jailbreak, indirect, refusal, transformed (default: all;
    ``--probes``)."""
    transforms: Names | None = None
    """Transforms of the transformed family (default: all; ``--transforms``)."""
    per_transform: int = Field(default=20, ge=1)
    """Probes per transform (``--per-transform``)."""
    limit: int | None = Field(default=None, ge=1)
    """At most N probes per family (``--limit``)."""
    concurrency: int = Field(default=4, ge=1)
    """Requests in flight (``--concurrency``)."""
    request_timeout: float = Field(default=30.0, ge=0.1)
    """Seconds per request (``--timeout`` of ``bastion redteam``)."""
    retries: int = Field(default=3, ge=0)
    """Retries of a failed request (``--retries``)."""
    rate_limit: float | None = Field(default=None, ge=0.01)
    """Requests per second at most (``--rate-limit``)."""
    stream: bool = False
    """Ask for streamed (SSE) answers (``--stream``)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the target's API key (``--api-key-env``)."""
    resume: bool = True
    """Skip probes already judged in ``out/attempts.jsonl`` (``--resume/--no-resume``)."""
    judge_model: str | None = None
    """LLM judge model for probes without a deterministic judge (``--judge-model``)."""
    judge_target: str | None = None
    """Base URL of the judge's API (default: :attr:`target`; ``--judge-target``)."""


def _read_text(path: Path | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise BastionError(f"cannot read {what} {path}: {exc.strerror}") from exc


def redteam(spec: RedteamSpec) -> JobResult[Any]:
    """Red-team ``spec.target``; returns ``JobResult(RedteamReport, paths, warnings)``
    (``paths``: ``json``, ``html``, ``attempts``). A target that answered no probe raises
    :class:`~bastion.errors.BastionError` after the report is written."""
    from bastion.llm.client import endpoint_llm_judge, redact_url
    from bastion.llm.probes import load_probes
    from bastion.llm.redteam import run_redteam
    from bastion.registry.tracking import track_run

    connect = ray_engine(spec)  # None: the probes run on this process's event loop
    engine = connect() if connect is not None else None  # ray: actors under one rate limit
    out = _out_dir(spec.out)
    plist = load_probes(
        list(spec.probes) if spec.probes else None,
        system_prompt=_read_text(spec.system_prompt, "--system-prompt"),
        secret=spec.secret,
        transforms=list(spec.transforms) if spec.transforms else None,
        per_transform=spec.per_transform,
        limit_per_family=spec.limit,
        seed=spec.seed,
    )
    params = {
        "target": redact_url(spec.target),
        "model": spec.model,
        "probes": ",".join(spec.probes) if spec.probes else "all",
        "n_probes": len(plist),
        "concurrency": spec.concurrency,
        "seed": spec.seed,
    }
    with track_run("redteam", params=params, tracking_uri=spec.tracking_uri,
                   enabled=spec.track) as run:
        report = run_redteam(
            plist,
            target=spec.target,
            model=spec.model,
            out_dir=out,
            api_key_env=spec.api_key_env,
            concurrency=spec.concurrency,
            timeout=spec.request_timeout,
            retries=spec.retries,
            rate_limit=spec.rate_limit,
            stream=spec.stream,
            resume=spec.resume,
            seed=spec.seed,
            engine=engine,
            llm_judge=(
                endpoint_llm_judge(spec.judge_target or spec.target, spec.judge_model,
                                   api_key_env=spec.api_key_env)
                if spec.judge_model
                else None
            ),
        )
        ov = report.overall
        run.log_metrics(
            {
                **(
                    {"exploit_success_rate": ov.exploit_success_rate}
                    if ov.exploit_success_rate is not None
                    else {}
                ),
                "errors": ov.errors,
                "judged": ov.judged,
                **{
                    f"esr.{k}": v.exploit_success_rate
                    for k, v in report.by_family.items()
                    if v.exploit_success_rate is not None
                },
            }
        )
        run.log_artifact(out / "report.json")
        run.log_artifact(out / "report.html")
    paths = {"json": out / "report.json", "html": out / "report.html",
             "attempts": out / "attempts.jsonl"}
    return JobResult(report, paths, list(run.warnings))


# ------------------------------------------------------------------ detector jobs


class LlmTrainDetectorSpec(DeadlineSpec):
    """What ``bastion llm train-detector`` runs."""

    data: Path
    """Labelled JSONL (``text``, ``label``[, ``split``]; ``--data``)."""
    out: Path
    """Folder the detector is saved to (``--out``)."""
    fpr: float = Field(default=0.01, ge=0.0001, le=0.5)
    """Target false-positive rate of the calibrated threshold (``--fpr``)."""
    C: float = Field(default=16.0, ge=1e-6)
    """Inverse regularisation of the logistic head (``--C``)."""
    harmful: Path | None = None
    """JSONL of plain harmful requests, a false-positive check (``--harmful``)."""
    cache: Path | None = None
    """Embedding cache file (``.npz``) to reuse (``--cache``)."""
    embedder_layers: int = Field(default=3, ge=0, le=6)
    """MiniLM layers the embeddings come from (0: all 6; the shipped detector: 3;
    ``--embedder-layers``)."""


def llm_train_detector(spec: LlmTrainDetectorSpec, *, log: Log = None) -> JobResult[Any]:
    """Train the prompt-injection detector; returns ``JobResult(metrics, paths,
    warnings)`` (``metrics``: the training summary dict; ``paths``: ``detector``)."""
    engine_of(spec)
    return run_with_deadline(lambda: _train_detector(spec, log), timeout=spec.timeout,
                             what="llm train-detector", out_dir=spec.out)


def _train_detector(spec: LlmTrainDetectorSpec, log: Log) -> JobResult[Any]:
    from bastion.llm.training import train_detector
    from bastion.registry.tracking import track_run

    params = {"data": str(spec.data), "fpr": spec.fpr, "C": spec.C, "seed": spec.seed,
              "embedder_layers": spec.embedder_layers}
    folder = _out_dir(spec.out)
    with track_run("llm-train-detector", params=params, tracking_uri=spec.tracking_uri,
                   enabled=spec.track) as run:
        _, metrics = train_detector(
            spec.data, folder, fpr=spec.fpr, C=spec.C, cache_path=spec.cache,
            harmful=spec.harmful, seed=spec.seed, log=log,
            embedder_layers=spec.embedder_layers or None,
        )
        if "test" in metrics:
            o = metrics["test"]["overall"]
            run.log_metrics({k: o[k] for k in ("auroc", "f1", "tpr_at_1pct_fpr", "fpr")})
        run.log_artifact(folder, artifact_path="detector")
    return JobResult(metrics, {"detector": folder}, list(run.warnings))


class LlmEvaluateDetectorSpec(DeadlineSpec):
    """What ``bastion llm evaluate-detector`` runs."""

    data: Path
    """Labelled JSONL; the rows of :attr:`split` (or all rows) are scored (``--data``)."""
    out: Path
    """Output folder for ``report.json`` and ``report.html`` (``--out``)."""
    detector: Path | None = None
    """Detector folder (default: the shipped one; ``--detector``)."""
    harmful: Path | None = None
    """JSONL of plain harmful requests, a false-positive check (``--harmful``)."""
    split: str | None = "test"
    """Split to evaluate (``None`` or ``""``: all rows; ``--split``)."""
    languages: Path | None = None
    """JSONL of benign rows with ``lang``, for the per-language FPR table
    (``--languages``)."""
    loso: bool = False
    """Also leave-one-source-out: retrain per held-out ``source`` repository
    (``--loso``)."""
    cache: Path | None = None
    """Embedding cache file (``.npz``) to reuse (``--cache``)."""


def llm_evaluate_detector(spec: LlmEvaluateDetectorSpec, *, log: Log = None
                          ) -> JobResult[Any]:
    """Evaluate a detector; returns ``JobResult(DetectorEvalReport, paths, warnings)``."""
    engine_of(spec)
    return run_with_deadline(lambda: _evaluate_detector(spec, log), timeout=spec.timeout,
                             what="llm evaluate-detector", out_dir=spec.out)


def _evaluate_detector(spec: LlmEvaluateDetectorSpec, log: Log) -> JobResult[Any]:
    from bastion.llm.detector import PromptInjectionDetector
    from bastion.llm.embed import Embedder, EmbeddingCache
    from bastion.llm.reports import DetectorEvalReport, write_llm_report
    from bastion.llm.training import evaluate_all, render_eval_html
    from bastion.registry.tracking import track_run

    detector = str(spec.detector or "shipped")
    params = {"data": str(spec.data), "detector": detector, "split": spec.split,
              "seed": spec.seed, "loso": spec.loso}
    folder = _out_dir(spec.out)
    emb_cache = EmbeddingCache(spec.cache) if spec.cache else None
    emb = Embedder(cache=emb_cache) if emb_cache else None
    det = (
        PromptInjectionDetector.load(spec.detector, embedder=emb)
        if spec.detector
        else PromptInjectionDetector.load_default(embedder=emb)
    )
    with track_run("llm-evaluate-detector", params=params, tracking_uri=spec.tracking_uri,
                   enabled=spec.track) as run:
        ev = evaluate_all(det, spec.data, split=spec.split or None, harmful=spec.harmful,
                          languages=spec.languages, loso=spec.loso, log=log)
        if emb_cache is not None:
            emb_cache.save()
        report = DetectorEvalReport.model_validate(
            {**ev, "data": str(spec.data), "detector": detector, "split": spec.split or None})
        paths = write_llm_report(
            report, render_eval_html(ev, title="Prompt-injection detector evaluation"), folder)
        o = report.overall
        run.log_metrics({k: getattr(o, k) for k in ("auroc", "f1", "tpr_at_1pct_fpr", "fpr")
                         if getattr(o, k) is not None})
        run.log_artifact(folder / "report.json")
    return JobResult(report, paths, list(run.warnings))


class LlmHardenDetectorSpec(DeadlineSpec):
    """What ``bastion llm harden-detector`` runs: adversarial training rounds."""

    data: Path
    """Labelled JSONL with ``split=train`` / ``split=test`` rows (``--data``)."""
    out: Path
    """Output folder: ``round_K/`` detectors and the report (``--out``)."""
    rounds: int = Field(default=3, ge=1, le=20)
    """Hardening rounds (``--rounds``)."""
    variants: int = Field(default=300, ge=1)
    """Training variants generated per round (``--variants``)."""
    eval_variants: int = Field(default=300, ge=1)
    """Fresh held-out variants per round (``--eval-variants``)."""
    transforms: Names | None = None
    """Transforms used (default: all; ``--transforms``)."""
    fpr: float = Field(default=0.01, ge=0.0001, le=0.5)
    """Target false-positive rate (``--fpr``)."""
    limit: int | None = Field(default=None, ge=10)
    """Use at most N training rows (quick runs; ``--limit``)."""
    cache: Path | None = None
    """Embedding cache file (``.npz``; ``--cache``)."""
    benign_counterparts: bool = False
    """Add, per evading attack variant, benign text put through the same operations as a
    negative (``--benign-counterparts``)."""
    registered_name: str | None = "bastion-prompt-injection-detector"
    """MLflow registered model each round's detector becomes a version of (``None`` or
    ``""``: do not register; ``--registered-name``)."""


def register_round(run: Any, det: Any, k: int, out_dir: str | os.PathLike[str],
                   name: str) -> str | None:
    """Log round ``k``'s detector folder to the run and register it as a new version of
    ``name``; return the version (``None`` and a run warning when the registry fails)."""
    folder = Path(out_dir) / f"round_{k}"
    if not folder.exists():
        det.save(folder)
    art = f"detector_round_{k}"
    run.log_artifact(folder, artifact_path=art)
    if not run.active:
        return None
    try:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        c = MlflowClient(tracking_uri=run.tracking_uri, registry_uri=run.tracking_uri)
        try:
            c.get_registered_model(name)
        except MlflowException:
            c.create_registered_model(name, tags={"bastion": "llm-detector"})
        source = f"{c.get_run(str(run.run_id)).info.artifact_uri.rstrip('/')}/{art}"
        mv = c.create_model_version(
            name, source=source, run_id=run.run_id, tags={"bastion.round": str(k)}
        )
        return str(mv.version)
    except Exception as exc:  # tracking is best effort
        run.warnings.append(f"registering round {k} failed: {type(exc).__name__}: {exc}")
        return None


def llm_harden_detector(spec: LlmHardenDetectorSpec, *,
                        on_round: Callable[[Any], None] | None = None) -> JobResult[Any]:
    """Harden the detector round by round; returns ``JobResult(DetectorHardenReport,
    paths, warnings)``. ``on_round`` gets each round's summary (for a display)."""
    engine_of(spec)
    return run_with_deadline(lambda: _harden_detector(spec, on_round), timeout=spec.timeout,
                             what="llm harden-detector", out_dir=spec.out)


def _harden_detector(spec: LlmHardenDetectorSpec,
                     on_round: Callable[[Any], None] | None) -> JobResult[Any]:
    from bastion.llm.embed import Embedder, EmbeddingCache
    from bastion.llm.harden import harden_detector, harden_report_html, prepare_harden_data
    from bastion.llm.reports import DetectorHardenReport, write_llm_report
    from bastion.registry.tracking import track_run

    params = {"data": str(spec.data), "rounds": spec.rounds, "variants": spec.variants,
              "eval_variants": spec.eval_variants, "seed": spec.seed,
              "benign_counterparts": spec.benign_counterparts}
    transforms = ",".join(spec.transforms) if spec.transforms else None
    folder = _out_dir(spec.out)
    d = prepare_harden_data(spec.data, limit=spec.limit, seed=spec.seed)
    emb_cache = EmbeddingCache(spec.cache) if spec.cache else None
    with track_run("llm-harden-detector", params=params, tracking_uri=spec.tracking_uri,
                   enabled=spec.track) as run:

        def round_done(rec: Any, det: Any) -> str | None:
            run.log_metrics(
                {
                    "evasion_rate": rec.evasion_rate,
                    "variant_miss_rate": rec.variant_miss_rate,
                    "tpr_heldout": rec.tpr_heldout,
                    "fpr_hard_negatives": rec.fpr_hard_negatives,
                },
                step=rec.round,
            )
            if on_round is not None:
                on_round(rec)
            if spec.registered_name and run.active:
                return register_round(run, det, rec.round, folder, spec.registered_name)
            return None

        result = harden_detector(
            train_texts=d["train_texts"],
            train_y=d["train_y"],
            heldout_attacks=d["heldout_attacks"],
            hard_negatives=d["hard_negatives"],
            calibration_benign=d["calibration_benign"],
            rounds=spec.rounds,
            variants_per_round=spec.variants,
            eval_variants=spec.eval_variants,
            fpr=spec.fpr,
            transforms=list(spec.transforms) if spec.transforms else None,
            embedder=Embedder(cache=emb_cache),
            seed=spec.seed,
            out_dir=folder,
            on_round=round_done,
            benign_counterparts=spec.benign_counterparts,
        )
        if emb_cache is not None:
            emb_cache.save()
        report = DetectorHardenReport.model_validate(
            {"data": str(spec.data), "settings": {**params, "fpr": spec.fpr,
                                                  "limit": spec.limit,
                                                  "transforms": transforms},
             **result.to_dict()}
        )
        paths = write_llm_report(report, harden_report_html(report), folder)
        run.log_artifact(folder / "report.json")
    paths["detector"] = folder / f"round_{report.rounds[-1].round}"
    return JobResult(report, paths, list(run.warnings))
