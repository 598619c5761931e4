"""LLM commands: ``bastion redteam``, ``bastion guard-llm`` and ``bastion llm ...``.

Heavy imports (sentence-transformers, FastAPI) happen inside the commands, so the CLI
starts fast and works without the ``llm`` extra for everything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from bastion.cli import _common as c
from bastion.cli import _limits as lim
from bastion.errors import BastionError

llm_app = typer.Typer(
    name="llm",
    help="Prompt-injection detector: train, evaluate, harden.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def redteam(
    target: str = typer.Option(
        ..., "--target", help="Base URL of the chat API, e.g. http://host:8000/v1."
    ),
    model: str = typer.Option(..., "--model", help="Model name sent to the target."),
    out: Path = c.OutOpt,
    system_prompt: Path | None = typer.Option(
        None, "--system-prompt", help="File with the agent's system prompt (for non-canary probes)."
    ),
    secret: str | None = typer.Option(
        None, "--secret", help="Secret the agent must not leak (default: a planted canary)."
    ),
    probes: str | None = typer.Option(
        None,
        "--probes",
        help="Comma-separated families: canary,jailbreak,indirect,refusal,transformed.",
    ),
    transforms: str | None = typer.Option(
        None, "--transforms", help="Comma-separated transforms (default: all)."
    ),
    per_transform: int = typer.Option(20, "--per-transform", min=1, help="Probes per transform."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most N probes per family."),
    concurrency: int = typer.Option(4, "--concurrency", min=1),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="Seconds per request."),
    retries: int = typer.Option(3, "--retries", min=0),
    rate_limit: float | None = typer.Option(
        None, "--rate-limit", min=0.01, help="Requests per second at most."
    ),
    stream: bool = typer.Option(False, "--stream", help="Ask for streamed (SSE) answers."),
    api_key_env: str = typer.Option(
        "OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the API key."
    ),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Skip probes already judged in DIR/attempts.jsonl."
    ),
    judge_model: str | None = typer.Option(
        None, "--judge-model", help="LLM judge model for probes without a deterministic judge."
    ),
    judge_target: str | None = typer.Option(
        None, "--judge-target", help="Base URL of the judge's API (default: --target)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Also print report.json to stdout."),
    seed: int = c.SeedOpt,
    tracking_uri: str | None = c.TrackingOpt,
    no_track: bool = c.NoTrackOpt,
    engine: str | None = c.EngineOpt,
    ray_address: str | None = c.RayAddressOpt,
    quiet: bool = c.QuietOpt,
    debug: bool = c.DebugOpt,
) -> None:
    """Red-team an OpenAI-compatible chat agent: report.json, report.html, attempts.jsonl.
    With --engine ray the probes go out from actors under one global --rate-limit."""
    from bastion.jobs import RedteamSpec
    from bastion.jobs import redteam as redteam_job

    report, _, warnings = redteam_job(RedteamSpec(
        target=target, model=model, out=out, system_prompt=system_prompt, secret=secret,
        probes=c.parse_list(probes), transforms=c.parse_list(transforms),
        per_transform=per_transform, limit=limit, concurrency=concurrency,
        request_timeout=timeout, retries=retries, rate_limit=rate_limit, stream=stream,
        api_key_env=api_key_env, resume=resume, judge_model=judge_model,
        judge_target=judge_target, seed=seed, tracking_uri=tracking_uri, track=not no_track,
        **c.engine_fields(engine, ray_address)))
    ov = report.overall
    for w in warnings:
        c.info(f"[yellow]warning:[/] {w}", quiet=quiet)
    if as_json:
        typer.echo(report.to_json())
    esr = ov.exploit_success_rate
    c.info(
        f"exploit success rate {'n/a' if esr is None else f'{100 * esr:.1f}%'} "
        f"({ov.successes}/{ov.judged} judged; {ov.errors} errors, "
        f"{ov.unjudged} unjudged); "
        f"report: {out / 'report.json'}",
        quiet=quiet,
    )


def guard_llm(
    upstream: str = typer.Option(..., "--upstream", help="Base URL of the chat API to protect."),
    listen: str = typer.Option("127.0.0.1:8080", "--listen", help="HOST:PORT to serve on."),
    detector: Path | None = typer.Option(
        None, "--detector", help="Detector folder (default: the shipped one)."
    ),
    policy: str = typer.Option("block", "--policy", help="block, strip or wrap flagged content."),
    tool_policy: str | None = typer.Option(
        None, "--tool-policy", help="Policy for tool/document content."
    ),
    secret: list[str] | None = typer.Option(
        None, "--secret", help="Secret never to return (repeatable)."
    ),
    forbid_tool: list[str] | None = typer.Option(
        None, "--forbid-tool", help="Tool the model may not call (repeatable)."
    ),
    allow_url_host: list[str] | None = typer.Option(
        None, "--allow-url-host",
        help="Host a tool call's arguments may point at (repeatable; *.example.com for "
        "subdomains, * for any). Default none: tool calls carrying a URL are withheld.",
    ),
    trust_role: list[str] | None = typer.Option(
        None, "--trust-role",
        help="Role not screened (repeatable), e.g. system when only your app writes it. "
        "Default: every role is screened.",
    ),
    max_screen_chars: int = typer.Option(
        200_000, "--max-screen-chars", min=1,
        help="Text per request screened at most; more is refused with 413.",
    ),
    overlap: float = typer.Option(0.5, "--system-prompt-overlap", min=0.0, max=1.0),
    threshold: float | None = typer.Option(
        None, "--threshold", help="Override the detector threshold."
    ),
    events: str = typer.Option(
        "sqlite:///bastion-events.db",
        "--events-url",
        "--events",
        help="Event store URL shared with `bastion serve` (a bare path means a SQLite file).",
    ),
    api_key_env: str | None = typer.Option(
        None, "--api-key-env", help="Env var with the upstream key (the client's own "
        "Authorization is its Bastion key and is never forwarded)."
    ),
    timeout: float = typer.Option(
        60.0, "--timeout", min=0.1, help="Seconds per upstream read (see --deadline)."),
    header_timeout: float | None = lim.HeaderTimeoutOpt,
    body_timeout: float | None = lim.BodyTimeoutOpt,
    keepalive_timeout: float | None = lim.KeepaliveTimeoutOpt,
    max_connections: int | None = lim.MaxConnectionsOpt,
    max_inflight: int | None = lim.MaxInflightOpt,
    rate_limit: float | None = lim.RateLimitOpt,
    rate_burst: int | None = lim.RateBurstOpt,
    rate_delay: float | None = lim.RateDelayOpt,
    deadline: float | None = typer.Option(
        None, "--deadline", help="Seconds a whole chat request may take, upstream and "
        "streamed answer included (default 300; 504 or an SSE error frame after)."),
    open_: bool = typer.Option(
        False, "--open", help="No API keys needed (local demos only): anyone who can reach "
        "the port chats through the proxy and reads the events as admin."),
    torch_threads: int = typer.Option(
        0, "--torch-threads", min=0, help="Torch threads for the detector (0: torch's default)."
    ),
    seed: int = c.SeedOpt,
    tracking_uri: str | None = c.TrackingOpt,
    no_track: bool = c.NoTrackOpt,
    quiet: bool = c.QuietOpt,
    debug: bool = c.DebugOpt,
) -> None:
    """Run the guard proxy in front of an OpenAI-compatible chat API (blocks until stopped)."""
    host, _, port_s = listen.rpartition(":")
    if not host or not port_s.isdigit():
        raise BastionError(f"--listen {listen!r} is not HOST:PORT", hint="e.g. 127.0.0.1:8080")
    from bastion.web.limits import HttpLimits, server_options

    limits = HttpLimits(deadline_s=300.0).with_overrides(**lim.limit_fields(
        header_timeout=header_timeout, body_timeout=body_timeout,
        keepalive_timeout=keepalive_timeout, max_connections=max_connections,
        max_inflight=max_inflight, rate_limit=rate_limit, rate_burst=rate_burst,
        rate_delay=rate_delay,
        deadline=deadline))
    try:
        import uvicorn

        from bastion.llm.detector import PromptInjectionDetector
        from bastion.llm.events import LlmEventLog
        from bastion.llm.guard import LlmGuard
        from bastion.llm.proxy import create_guard_app
    except ImportError as exc:
        raise BastionError(
            f"missing dependency {exc.name}", hint="pip install 'bastion[llm]'"
        ) from exc
    from bastion.llm.client import redact_url
    from bastion.llm.guard import canonical_role
    from bastion.llm.outscan import HostAllowlist
    from bastion.registry.tracking import track_run

    HostAllowlist(allow_url_host or [])  # bad options fail before the detector loads
    import os

    from bastion.web.auth import check_admin_token

    check_admin_token(os.environ.get("BASTION_ADMIN_TOKEN"))  # under 32 characters: refused
    for r in trust_role or []:
        if canonical_role(r) is None:
            raise BastionError(f"--trust-role {r!r} is not a role",
                               hint="use system, developer, user, assistant, tool or function")

    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    det = (
        PromptInjectionDetector.load(detector)
        if detector
        else PromptInjectionDetector.load_default()
    )
    if threshold is not None:
        det.threshold_ = threshold
    guard = LlmGuard(
        det,
        policy=policy,  # type: ignore[arg-type]
        tool_policy=tool_policy,  # type: ignore[arg-type]
        secrets=list(secret or []),
        overlap_threshold=overlap,
        forbidden_tools=list(forbid_tool or []),
        trusted_roles=list(trust_role or []),
        allow_url_hosts=list(allow_url_host or []),
    )
    url = events if "://" in events else f"sqlite:///{Path(events).expanduser().resolve()}"
    store = LlmEventLog(url, mask=list(secret or []))
    app = create_guard_app(
        upstream, guard=guard, events=store, api_key_env=api_key_env, timeout=timeout,
        limits=limits,
        max_scan_chars=max_screen_chars, open_mode=open_,
    )
    det.score(["warm-up"])  # load the encoder before the first request
    params = {"upstream": redact_url(upstream), "listen": listen, "policy": policy, "seed": seed}
    with track_run(
        "guard-llm", params=params, tracking_uri=tracking_uri, enabled=not no_track
    ) as run:
        c.info(
            f"guarding {redact_url(upstream)} on http://{host}:{port_s}/v1 (policy {policy}); "
            f"events: {redact_url(url)}; {app.state.auth.key_count()} API keys"
            f"{', admin token set' if app.state.auth.admin_token_set else ''}",
            quiet=quiet,
        )
        if open_:
            c.info("[bold red]WARNING: OPEN MODE[/]: no API key is needed; anyone who can "
                   "reach this port can chat through the proxy and read every client's "
                   "prompt excerpts as admin")
        uvicorn.run(app, host=host, port=int(port_s), log_level="warning" if quiet else "info",
                    **server_options(limits, on_reject=app.state.on_limit,
                                     error_style="openai"))
        run.log_metrics(
            {
                "requests": store.written["verdict"],
                "decisions": store.written["audit"],
                "leaks": store.written["alert"],
            }
        )
    store.close()


@llm_app.command("train-detector")
def train_detector_cmd(
    data: Path = typer.Option(..., "--data", help="Labelled JSONL (text, label[, split])."),
    out: Path = c.OutOpt,
    fpr: float = typer.Option(
        0.01, "--fpr", min=0.0001, max=0.5, help="Target false-positive rate."
    ),
    C: float = typer.Option(16.0, "--C", min=1e-6, help="Inverse regularisation of the head."),
    harmful: Path | None = typer.Option(
        None, "--harmful", help="JSONL of plain harmful requests (FP check)."
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="Embedding cache file (.npz) to reuse."
    ),
    embedder_layers: int = typer.Option(
        3, "--embedder-layers", min=0, max=6,
        help="MiniLM layers the embeddings come from (0: all 6; the shipped detector: 3).",
    ),
    seed: int = c.SeedOpt,
    tracking_uri: str | None = c.TrackingOpt,
    no_track: bool = c.NoTrackOpt,
    timeout: float | None = c.TimeoutOpt,
    quiet: bool = c.QuietOpt,
    debug: bool = c.DebugOpt,
) -> None:
    """Train the prompt-injection detector on a JSONL file and save it to --out."""
    from bastion.jobs import LlmTrainDetectorSpec, llm_train_detector

    metrics, _, warnings = llm_train_detector(
        LlmTrainDetectorSpec(data=data, out=out, fpr=fpr, C=C, harmful=harmful, cache=cache,
                             embedder_layers=embedder_layers, seed=seed,
                             tracking_uri=tracking_uri, track=not no_track, timeout=timeout),
        log=lambda m: c.info(m, quiet=quiet))
    for w in warnings:
        c.info(f"[yellow]warning:[/] {w}", quiet=quiet)
    if "test" in metrics:
        o = metrics["test"]["overall"]
        c.info(
            f"held-out AUROC {o['auroc']:.4f}, TPR@1%FPR {o['tpr_at_1pct_fpr']:.3f}, "
            f"F1 {o['f1']:.3f}",
            quiet=quiet,
        )
    c.info(f"saved the detector to {out}", quiet=quiet)


@llm_app.command("evaluate-detector")
def evaluate_detector_cmd(
    data: Path = typer.Option(
        ..., "--data", help="Labelled JSONL; rows with split=test (or all rows)."
    ),
    out: Path = c.OutOpt,
    detector: Path | None = typer.Option(
        None, "--detector", help="Detector folder (default: the shipped one)."
    ),
    harmful: Path | None = typer.Option(
        None, "--harmful", help="JSONL of plain harmful requests (FP check)."
    ),
    split: str | None = typer.Option(
        "test", "--split", help="Split to evaluate ('' for all rows)."
    ),
    languages: Path | None = typer.Option(
        None, "--languages", help="JSONL of benign rows with 'lang' (per-language FPR table)."
    ),
    loso: bool = typer.Option(
        False, "--loso", help="Also leave-one-source-out: retrain per held-out 'source' repo."
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="Embedding cache file (.npz) to reuse (for --loso)."
    ),
    seed: int = c.SeedOpt,
    tracking_uri: str | None = c.TrackingOpt,
    no_track: bool = c.NoTrackOpt,
    timeout: float | None = c.TimeoutOpt,
    quiet: bool = c.QuietOpt,
    debug: bool = c.DebugOpt,
) -> None:
    """Evaluate a detector: the split (AUROC, F1, TPR@1%FPR, slices, hard negatives), the
    benign flagged rate per language/script and, with --loso, leave-one-source-out."""
    from bastion.jobs import LlmEvaluateDetectorSpec, llm_evaluate_detector

    report, _, warnings = llm_evaluate_detector(
        LlmEvaluateDetectorSpec(data=data, out=out, detector=detector, harmful=harmful,
                                split=split, languages=languages, loso=loso, cache=cache,
                                seed=seed, tracking_uri=tracking_uri, track=not no_track,
                                timeout=timeout),
        log=lambda m: c.info(m, quiet=quiet))
    for w in warnings:
        c.info(f"[yellow]warning:[/] {w}", quiet=quiet)
    o = report.overall

    def fmt(v: float | None, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    c.info(
        f"AUROC {fmt(o.auroc, '.4f')}, TPR@1%FPR {fmt(o.tpr_at_1pct_fpr, '.3f')}, "
        f"F1 {o.f1:.3f}; report: {out / 'report.json'}",
        quiet=quiet,
    )
    worst = max(report.languages["by_lang"].items(), key=lambda kv: kv[1]["rate"],
                default=None) if report.languages else None
    if worst:
        c.info(f"benign flagged by language: worst {worst[0]} {worst[1]['rate']:.1%} "
               f"({worst[1]['flagged']}/{worst[1]['n']})", quiet=quiet)
    if report.loso:
        m = report.loso["macro"]
        c.info(f"leave-one-source-out over {m['n_sources']} sources: macro AUROC "
               f"{fmt(m['auroc'], '.4f')}, TPR {fmt(m['tpr'], '.3f')}, worst benign flagged "
               f"{fmt(m['worst_benign_flagged'], '.3f')}", quiet=quiet)


@llm_app.command("harden-detector")
def harden_detector_cmd(
    data: Path = typer.Option(..., "--data", help="Labelled JSONL with split=train/test rows."),
    out: Path = c.OutOpt,
    rounds: int = typer.Option(3, "--rounds", min=1, max=20),
    variants: int = typer.Option(
        300, "--variants", min=1, help="Training variants generated per round."
    ),
    eval_variants: int = typer.Option(
        300, "--eval-variants", min=1, help="Fresh held-out variants per round."
    ),
    transforms: str | None = typer.Option(
        None, "--transforms", help="Comma-separated transforms (default: all)."
    ),
    fpr: float = typer.Option(0.01, "--fpr", min=0.0001, max=0.5),
    limit: int | None = typer.Option(
        None, "--limit", min=10, help="Use at most N training rows (quick runs)."
    ),
    cache: Path | None = typer.Option(None, "--cache", help="Embedding cache file (.npz)."),
    benign_counterparts: bool = typer.Option(
        False,
        "--benign-counterparts",
        help="Add, per evading attack variant, benign training text put through the same "
        "operations as a negative (for data whose false alarms are obfuscated benign text).",
    ),
    registered_name: str | None = typer.Option(
        "bastion-prompt-injection-detector",
        "--registered-name",
        help="MLflow registered model name ('' to skip).",
    ),
    seed: int = c.SeedOpt,
    tracking_uri: str | None = c.TrackingOpt,
    no_track: bool = c.NoTrackOpt,
    timeout: float | None = c.TimeoutOpt,
    quiet: bool = c.QuietOpt,
    debug: bool = c.DebugOpt,
) -> None:
    """Adversarial training rounds: evasion rate, TPR and hard-negative FPR per round."""
    from bastion.jobs import LlmHardenDetectorSpec, llm_harden_detector

    def on_round(rec: Any) -> None:
        c.info(
            f"round {rec.round}: evasion {rec.evasion_rate:.3f} (all variants missed "
            f"{rec.variant_miss_rate:.3f}), TPR {rec.tpr_heldout:.3f}, "
            f"hard-negative FPR {rec.fpr_hard_negatives:.3f} (+{rec.n_added} variants"
            + (f", +{rec.n_added_benign} benign" if rec.n_added_benign else "") + ")",
            quiet=quiet,
        )

    report, _, warnings = llm_harden_detector(
        LlmHardenDetectorSpec(
            data=data, out=out, rounds=rounds, variants=variants, eval_variants=eval_variants,
            transforms=c.parse_list(transforms), fpr=fpr, limit=limit, cache=cache,
            benign_counterparts=benign_counterparts, registered_name=registered_name,
            seed=seed, tracking_uri=tracking_uri, track=not no_track, timeout=timeout),
        on_round=on_round)
    rounds_done = report.rounds
    for w in warnings:
        c.info(f"[yellow]warning:[/] {w}", quiet=quiet)
    first, last = rounds_done[0], rounds_done[-1]
    c.info(
        f"evasion {first.evasion_rate:.3f} -> {last.evasion_rate:.3f}; "
        f"hard-negative FPR {first.fpr_hard_negatives:.3f} -> {last.fpr_hard_negatives:.3f}; "
        f"final detector: {out / f'round_{last.round}'}",
        quiet=quiet,
    )


def register(app: typer.Typer) -> None:
    """Add ``redteam``, ``guard-llm`` and the ``llm`` group to the main CLI."""
    app.command("redteam")(redteam)
    app.command("guard-llm")(guard_llm)
    app.add_typer(llm_app, name="llm")
