"""``bastion demo``: the whole loop on built-in digits, as one library function.

:func:`run_demo` (no network, nothing outside ``out``):

1. **train** a baseline CNN on the trusted reference split and register it (v1);
2. **scan** it (PGD, a small epsilon ladder);
3. **harden** it (PGD adversarial training, small budget), scan again, register the
   hardened model (v2) and promote it to ``champion``; a second, more robust model (v3,
   trained at twice the budget) becomes the ``fallback`` that answers flagged inputs;
4. **serve** the champion in-process: the real service app on uvicorn on 127.0.0.1, spoken
   to over real HTTP;
5. **replay** a scripted scenario, one healing-controller step after each phase:
   clean traffic (with true feedback labels); a natural drift (shifted, noisier digits);
   an evasion campaign from one client (PGD examples against the champion); poisoned
   feedback (a share of flipped labels from one client); an extraction attempt (a client
   probing around a few seed images);
6. **report**: the detections and healing (alerts, fallback switches, quarantines,
   retrains with their gates, promotions or refusals) as ``report.json`` and a
   self-contained ``report.html`` (timeline and plots), and an MLflow run with the
   outcome metrics (the registry's versions are MLflow records too).

The MLflow store, the event store and every model live under ``out``.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

MODEL_NAME = "demo-digits"


class PhaseResult(BaseModel):
    """One phase of the scenario: what was sent, what the guard said, what healing did."""

    name: str
    description: str
    requests: int
    inputs: int
    verdicts: dict[str, int]
    answered_by: dict[str, int]
    by_client: dict[str, dict[str, int]]
    accuracy: float | None = None
    first_flag_at: int | None = None
    signals_fired: list[str] = Field(default_factory=list)
    actions: list[dict[str, Any]] = Field(default_factory=list)
    champion_after: int | None = None
    traffic_after: str = "champion"
    quarantined_after: list[str] = Field(default_factory=list)
    time_s: float = 0.0


class DemoReport(BaseModel):
    """The demo's outcome (``report.json``)."""

    seed: int
    fast: bool
    model_name: str
    versions: dict[str, int]
    scans: dict[str, dict[str, Any]]
    phases: list[PhaseResult]
    alias_history: list[dict[str, Any]]
    timeline: list[dict[str, Any]]
    outcomes: dict[str, Any]
    files: dict[str, str]
    time_s: float


@dataclass
class DemoResult:
    report: DemoReport
    out: Path
    html_path: Path
    json_path: Path
    notes: list[str] = field(default_factory=list)

    def headline(self) -> list[str]:
        o = self.report.outcomes
        return [
            f"evasion client quarantined: {o.get('evasion_client_quarantined')}",
            f"extraction client quarantined: {o.get('extraction_client_quarantined')}",
            f"retrains: {o.get('retrains_promoted')} promoted, {o.get('retrains_refused')} "
            "refused",
            f"poisoned labels the champion adopted: before {o.get('poison_agreement_before')}"
            f", after {o.get('poison_agreement_after')}",
            f"champion at the end: v{o.get('final_champion')}",
        ]


@dataclass
class _Settings:
    epochs: int
    harden_epochs: int
    clean: int
    drift: int
    evasion: int
    poison: int
    extraction: int
    scan_points: int
    retrain_epochs: int
    backdoor_gate: bool


def _settings(fast: bool) -> _Settings:
    if fast:
        return _Settings(epochs=5, harden_epochs=2, clean=120, drift=140, evasion=40,
                         poison=120, extraction=90, scan_points=60, retrain_epochs=1,
                         backdoor_gate=False)
    return _Settings(epochs=10, harden_epochs=4, clean=300, drift=300, evasion=80, poison=240,
                     extraction=160, scan_points=150, retrain_epochs=2, backdoor_gate=True)


# ---------------------------------------------------------------------------- scenario data
def _drift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A natural drift: digits shifted one pixel right, fainter, with sensor noise (still
    inside [0, 1])."""
    s = np.roll(x, 1, axis=-1)
    s[..., :, 0] = 0.0
    s = 0.85 * s + rng.normal(0.0, 0.05, size=s.shape)
    return np.clip(s, 0.0, 1.0).astype(np.float32)


def _extraction_queries(seeds: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Synthetic queries around a few seed images (Papernot-style augmentation): the
    tiny steps between them are what PRADA notices."""
    idx = rng.integers(0, len(seeds), size=n)
    noise = rng.normal(0.0, 0.02, size=(n, *seeds.shape[1:]))
    return np.clip(seeds[idx] + noise, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------- the job
def run_demo(
    out: str | os.PathLike[str] = "bastion-demo",
    *,
    seed: int = 0,
    fast: bool = False,
    tracking_uri: str | None = None,
    progress: bool = False,
    quiet: bool = True,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo into ``out``; see the module docs.

    Args:
        out: output folder (created; reused runs start from a clean store).
        seed: one seed, one scenario.
        fast: small traffic and training (a quick check, e.g. in tests).
        tracking_uri: MLflow store (default: ``out/mlflow.db``).
        progress: a Rich progress bar (the CLI passes ``True`` in a terminal).
        quiet: no status lines.
        log: receives status lines (default: Rich console on stderr unless ``quiet``).
    """
    import shutil

    import httpx
    import torch

    from bastion.data import Dataset, load_data
    from bastion.defend.training import AdversarialTrainer
    from bastion.evaluate.report import write_scan_report
    from bastion.evaluate.scan import scan
    from bastion.models.persist import save_model
    from bastion.models.torch_model import TorchModel
    from bastion.models.train import train_classifier
    from bastion.models.zoo import build_module
    from bastion.registry.models import ModelRegistry
    from bastion.registry.tracking import track_run
    from bastion.runtime.detectors import pgd_attack
    from bastion.runtime.healing import HealingPolicy, MonitorSettings
    from bastion.runtime.retrain import RetrainConfig
    from bastion.service.app import create_app
    from bastion.service.config import ServiceConfig
    from bastion.service.core import BastionService
    from bastion.service.server import ServiceThread

    t_start = time.perf_counter()
    st = _settings(fast)
    out_dir = Path(out).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("events.db", "events.db-wal", "events.db-shm", "mlflow.db",
                  "bastion-registry.db", "bastion-registry.db-wal", "bastion-registry.db-shm"):
        (out_dir / stale).unlink(missing_ok=True)
    for stale_dir in ("mlartifacts", "models", "scans"):
        shutil.rmtree(out_dir / stale_dir, ignore_errors=True)
    uri = tracking_uri or f"sqlite:///{out_dir / 'mlflow.db'}"
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    if log is None:
        from rich.console import Console

        console = Console(stderr=True, highlight=False)

        def log(msg: str) -> None:
            if not quiet:
                console.print(msg, soft_wrap=True)

    bar: Any = None
    task: Any = None
    n_steps = 11
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                       transient=False)
        bar.start()
        task = bar.add_task("demo", total=n_steps)

    def step(msg: str) -> None:
        if bar is not None:
            bar.update(task, advance=1, description=msg)
        else:
            log(f"[bold]demo[/]: {msg}")

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    try:
        # -- data: trusted reference, trusted holdout, and a traffic pool apart from both
        full = load_data("builtin:digits", seed=seed)
        x_hold, y_hold = full.x_test[:150], full.y_test[:150]
        pool_x, pool_y = full.x_test[150:], full.y_test[150:]
        trusted = Dataset(name="digits-trusted", x_train=full.x_train, y_train=full.y_train,
                          x_test=x_hold, y_test=y_hold, n_classes=10, bounds=(0.0, 1.0))
        models_dir = out_dir / "models"
        registry = ModelRegistry(MODEL_NAME, tracking_uri=uri)

        def new_model(name: str) -> Any:
            return TorchModel(build_module("cnn", input_shape=(1, 8, 8), n_classes=10),
                              n_classes=10, input_shape=(1, 8, 8), name=name)

        # 1. baseline
        step("training the baseline")
        base = new_model("digits-baseline")
        train_classifier(base, trusted.x_train, trusted.y_train, epochs=st.epochs, lr=3e-3,
                         batch_size=64, seed=seed)
        save_model(base, models_dir / "baseline", arch="cnn")
        v_base = registry.register(models_dir / "baseline",
                                   tags={"bastion.source": "demo baseline"})

        # 2. scan
        step("scanning the baseline")
        eps_list = [0.05, 0.1, 0.2]

        def do_scan(m: Any, name: str) -> dict[str, Any]:
            rep = scan(m, x_hold[: st.scan_points], y_hold[: st.scan_points],
                       epsilons=eps_list, attacks=["pgd"], seed=seed, n_examples=4,
                       sanity_checks=False, attack_options={"pgd": {"steps": 10}})
            write_scan_report(rep, out_dir / "scans" / name)
            return {"clean_accuracy": rep.clean_accuracy,
                    "robust_accuracy": dict(rep.robust_accuracy)}

        scans = {"baseline": do_scan(base, "baseline")}

        # 3. harden
        step("hardening (PGD adversarial training)")

        def harden(eps: float, name: str) -> Any:
            tr = AdversarialTrainer(method="pgd-at", eps=eps, steps=5,
                                    epochs=st.harden_epochs, lr=2e-3, batch_size=64,
                                    adv_fraction=0.5, init="finetune", guard=False, seed=seed)
            m = tr.fit(base, (trusted.x_train, trusted.y_train))
            m.name = name
            return m

        hard = harden(0.1, "digits-hardened")
        save_model(hard, models_dir / "hardened", arch="cnn")
        scans["hardened"] = do_scan(hard, "hardened")
        v_hard = registry.register(models_dir / "hardened",
                                   tags={"bastion.source": "demo hardened (pgd-at eps 0.1)"},
                                   metrics={"scan.clean": scans["hardened"]["clean_accuracy"]})
        registry.promote(v_base, reason="baseline", actor="demo")
        registry.promote(v_hard, reason="hardened: higher robust accuracy at equal clean "
                         "accuracy", actor="demo")
        robust = harden(0.2, "digits-robust-fallback")
        save_model(robust, models_dir / "fallback", arch="cnn")
        v_fb = registry.register(models_dir / "fallback",
                                 tags={"bastion.source": "demo fallback (pgd-at eps 0.2)"})
        registry.set_alias("fallback", v_fb, reason="the more robust model answers flagged "
                           "inputs", actor="demo")

        # 4. serve
        step("serving the champion on 127.0.0.1")
        policy = HealingPolicy(
            monitors=MonitorSettings(window=200, min_window=60, client_min_requests=20),
            retrain=RetrainConfig(epochs=st.retrain_epochs, at_steps=3, robust_points=60,
                                  robust_steps=5, backdoor_gate=st.backdoor_gate,
                                  backdoor_steps=20, max_reference=800, seed=seed),
            min_feedback_for_retrain=50, retrain_cooldown=60)
        cfg = ServiceConfig.build(
            model=f"registry:{MODEL_NAME}", reference="builtin:digits", model_name=MODEL_NAME,
            events_url=f"sqlite:///{out_dir / 'events.db'}", tracking_uri=uri,
            reference_limit=800, healing=policy,
            reload_interval_s=0.0, fpr=0.01, seed=seed,
            # every simulated client sends from this one address: no per-address limit
            limits={"rate_limit_per_s": 0})
        svc = BastionService(cfg, data=trusted)
        # one API key per scripted client (the key names the client: quarantine follows
        # it) and an admin key for the operator's reads; only digests are stored
        from bastion.web.keys import KeyStore

        keystore = KeyStore(svc.store)
        keys = {name: keystore.create(name, "client", note="bastion demo")[0]
                for name in ("alice", "bob", "carol", "mallory", "trudy", "eve")}
        operator = keystore.create("demo-operator", "admin", note="bastion demo")[0]
        app = create_app(service=svc)
        phases: list[PhaseResult] = []
        with ServiceThread(app) as server, httpx.Client(
                base_url=server.url, timeout=120,
                headers={"Authorization": f"Bearer {operator}"}) as c:
            log(f"  service on {server.url} (dashboard {server.url}/dashboard)")

            def send(xs: np.ndarray, client: str, batch: int) -> list[dict[str, Any]]:
                answers = []
                for i in range(0, len(xs), batch):
                    r = c.post("/v1/predict", json={"inputs": xs[i:i + batch].tolist()},
                               headers={"Authorization": f"Bearer {keys[client]}"})
                    r.raise_for_status()
                    answers += r.json()["predictions"]
                return answers

            def feedback(answers: list[dict[str, Any]], labels: np.ndarray,
                         client: str) -> None:
                items = [{"request_id": a["request_id"], "label": int(y)}
                         for a, y in zip(answers, labels, strict=True)]
                for i in range(0, len(items), 200):
                    c.post("/v1/feedback", json={"feedback": items[i:i + 200]},
                           headers={"Authorization": f"Bearer {keys[client]}"}
                           ).raise_for_status()

            def phase(name: str, description: str,
                      sent: Sequence[tuple[str, list[dict[str, Any]], np.ndarray | None]],
                      t0: float, requests: int) -> PhaseResult:
                rep = svc.heal_once()
                allans = [a for _, ans, _ in sent for a in ans]
                by_client: dict[str, Counter[str]] = {}
                for cl, ans, _ in sent:
                    by_client.setdefault(cl, Counter()).update(a["verdict"] for a in ans)
                labelled = [(a, y) for _, ans, ys in sent if ys is not None
                            for a, y in zip(ans, ys, strict=True)]
                acc = None
                if labelled:
                    acc = float(np.mean([a["label"] == int(y) for a, y in labelled]))
                first = next((i for i, a in enumerate(allans) if a["verdict"] != "allow"), None)
                res = PhaseResult(
                    name=name, description=description, requests=requests, inputs=len(allans),
                    verdicts=dict(Counter(a["verdict"] for a in allans)),
                    answered_by=dict(Counter(a["answered_by"] for a in allans)),
                    by_client={k: dict(v) for k, v in by_client.items()}, accuracy=acc,
                    first_flag_at=first,
                    signals_fired=[s.monitor + (f":{s.client_id}" if s.client_id else "")
                                   for s in rep.fired],
                    actions=[{"action": a.action, "monitor": a.monitor, "done": a.done,
                              "detail": a.detail} for a in rep.actions],
                    champion_after=svc.champion_version, traffic_after=svc.traffic(),
                    quarantined_after=svc.quarantined(), time_s=time.perf_counter() - t0)
                phases.append(res)
                log(f"  {name}: {res.verdicts}; fired {res.signals_fired or 'nothing'}")
                for a in res.actions:
                    log(f"    {'done' if a['done'] else 'not done'} {a['action']}: "
                        f"{a['detail'][:160]}")
                return res

            order = rng.permutation(len(pool_x))
            px, py = pool_x[order], pool_y[order]

            def pick(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
                idx = (np.arange(n) + offset) % len(px)
                return px[idx], py[idx]

            # a. clean traffic
            step("phase 1/5: clean traffic")
            t0 = time.perf_counter()
            xa, ya = pick(st.clean, 0)
            sent_c = _round_robin(xa, ya, ("alice", "bob", "carol"), 10, send, feedback)
            phase("clean", "clean traffic from three clients, true feedback labels", sent_c,
                  t0, requests=-(-len(xa) // 10))

            # b. natural drift
            step("phase 2/5: natural drift")
            t0 = time.perf_counter()
            xd, yd = pick(st.drift, st.clean)
            xd = _drift(xd, rng)
            sent_d = _round_robin(xd, yd, ("alice", "bob", "carol"), 10, send, feedback)
            phase("drift", "shifted, fainter, noisier digits (a natural drift) from three "
                  "clients, true labels", sent_d, t0, requests=-(-len(xd) // 10))

            # c. evasion campaign from one client, with clean background traffic
            step("phase 3/5: evasion campaign")
            t0 = time.perf_counter()
            champ = svc.guard.model
            hold_acc_before = float(np.mean(champ.predict_proba(x_hold).argmax(1) == y_hold))
            xe, ye = pick(st.evasion, st.clean + st.drift)
            x_adv = pgd_attack(champ, eps=0.2, steps=10, seed=seed)(xe)
            xb, yb = pick(st.evasion, 2 * st.clean + st.drift)
            e_bg = send(xb, "bob", 5)
            e_adv = send(x_adv, "mallory", 1)
            fooled = float(np.mean([a["label"] != int(y) for a, y in zip(e_adv, ye, strict=True)
                                    if a["label"] is not None])) if e_adv else 0.0
            more = send(x_adv[:10], "mallory", 1)
            phase("evasion", "PGD (eps 0.2) examples against the champion from client "
                  "mallory, clean background traffic from bob",
                  [("bob", e_bg, yb), ("mallory", e_adv + more, None)], t0,
                  requests=-(-len(xb) // 5) + len(e_adv) + len(more))

            # d. poisoned feedback
            step("phase 4/5: poisoned feedback")
            t0 = time.perf_counter()
            xp, yp = pick(st.poison, 3 * st.clean + st.drift)
            pans = send(xp, "trudy", 10)
            flip = rng.random(len(yp)) < 0.3
            y_bad = np.where(flip, (yp + 1 + rng.integers(0, 9, size=len(yp))) % 10, yp)
            feedback(pans, y_bad, "trudy")
            champ_before = svc.guard.model
            agree_before = float(np.mean(champ_before.predict_proba(xp[flip]).argmax(1)
                                         == y_bad[flip]))
            phase("poisoned_feedback", "client trudy sends traffic and feedback with 30% of "
                  "the labels flipped", [("trudy", pans, yp)], t0,
                  requests=-(-len(xp) // 10))
            champ_after = svc.guard.model
            agree_after = float(np.mean(champ_after.predict_proba(xp[flip]).argmax(1)
                                        == y_bad[flip]))

            # e. extraction attempt
            step("phase 5/5: extraction attempt")
            t0 = time.perf_counter()
            xs, _ = pick(5, 7 * st.clean)
            xq = _extraction_queries(xs, st.extraction, rng)
            xbg, ybg = pick(st.extraction // 2, 5 * st.clean)
            x_bg = send(xbg, "bob", 1)
            x_q = send(xq, "eve", 1)
            phase("extraction", "client eve probes around five seed images (a synthetic "
                  "query stream, as in model extraction); clean background from bob",
                  [("bob", x_bg, ybg), ("eve", x_q, None)], t0,
                  requests=len(xbg) + len(xq))
            data_now = c.get("/v1/dashboard/data").json()
            models_now = c.get("/v1/models").json()
            metrics_text = c.get("/metrics").text
            from bastion.store import events as ev

            timeline = [e.as_dict() for e in svc.store.query(
                kinds=[ev.ALERT, ev.AUDIT, ev.MODEL_CHANGE], limit=None)]
            quarantined = svc.quarantined()
            n_events = svc.store.last_id()
            heal_steps = [e.payload for e in svc.store.query(kinds=ev.HEALING_STEP,
                                                             limit=None)]
            hold_acc_final = float(np.mean(svc.guard.model.predict_proba(x_hold).argmax(1)
                                           == y_hold))
            final_champion = svc.champion_version

        # 6. report
        step("writing the report")
        for e in timeline:
            ev_ = e["payload"].get("evidence")
            if isinstance(ev_, dict):
                ev_.pop("traceback", None)
        retrains = [e for e in timeline if e["kind"] == ev.AUDIT
                    and e["payload"].get("action") == "retrain"]
        promoted = [e for e in retrains if e["payload"].get("done")]
        refused = [e for e in retrains if not e["payload"].get("done")
                   and "gates" in (e["payload"].get("evidence") or {})]
        ex_phase = next(p for p in phases if p.name == "extraction")
        clean_phase = phases[0]
        outcomes = {
            "evasion_client_quarantined": "mallory" in quarantined,
            "extraction_client_quarantined": "eve" in quarantined,
            "benign_clients_quarantined": sorted({"alice", "bob", "carol", "trudy"}
                                                 & set(quarantined)),
            "evasion_success_rate_on_champion": fooled,
            "evasion_flagged_share": _share(phases[2].by_client.get("mallory", {})),
            "extraction_flagged_share": _share(ex_phase.by_client.get("eve", {})),
            "clean_flagged_share": _share({k: v for cl in clean_phase.by_client.values()
                                           for k, v in cl.items()}),
            "drift_alerted": any(s.startswith("input_drift") for p in phases
                                 for s in p.signals_fired),
            "fallback_switches": sum(1 for e in timeline if e["kind"] == ev.MODEL_CHANGE
                                     and e["payload"].get("type") == "traffic"
                                     and e["payload"].get("to") == "fallback"),
            "retrains_attempted": len([e for e in retrains if "retrain" in (
                e["payload"].get("evidence") or {})]),
            "retrains_promoted": len(promoted),
            "retrains_refused": len(refused),
            "retrains_deferred_or_crashed": len(retrains) - len(promoted) - len(refused),
            "poisoned_labels": int(flip.sum()),
            "poison_agreement_before": round(agree_before, 4),
            "poison_agreement_after": round(agree_after, 4),
            "final_champion": final_champion,
            "final_aliases": models_now["aliases"],
            "events": n_events,
        }
        promote_steps = [h for h in heal_steps if any(
            a.get("action") == "retrain" and a.get("done") for a in h.get("actions") or [])]
        outcomes["healing_step_time_s_promoted"] = [round(float(h["time_s"]), 2)
                                                    for h in promote_steps]
        outcomes["retrain_time_s"] = [round(float(((e["payload"].get("evidence") or {}).get(
            "retrain") or {}).get("time_s", 0.0)), 2) for e in retrains
            if "retrain" in (e["payload"].get("evidence") or {})]
        outcomes["holdout_accuracy_initial_champion"] = round(float(np.mean(
            hard.predict_proba(x_hold).argmax(1) == y_hold)), 4)
        outcomes["holdout_accuracy_before_evasion"] = round(hold_acc_before, 4)
        outcomes["holdout_accuracy_final_champion"] = round(hold_acc_final, 4)
        versions = {"baseline": v_base, "hardened": v_hard, "fallback": v_fb}
        files = {"json": str(out_dir / "report.json"), "html": str(out_dir / "report.html"),
                 "events": str(out_dir / "events.db"), "mlflow": uri,
                 "scans": str(out_dir / "scans")}
        report = DemoReport(
            seed=seed, fast=fast, model_name=MODEL_NAME, versions=versions, scans=scans,
            phases=phases, alias_history=models_now["history"], timeline=timeline,
            outcomes=outcomes, files=files, time_s=time.perf_counter() - t_start)
        json_path, html_path = out_dir / "report.json", out_dir / "report.html"
        _atomic_write(json_path, report.model_dump_json(indent=2))
        _atomic_write(html_path, _render_html(report, data_now))
        (out_dir / "metrics.prom").write_text(metrics_text, encoding="utf-8")
        step("recording the MLflow run")
        with track_run("demo", params={"seed": seed, "fast": fast, "model": MODEL_NAME},
                       tracking_uri=uri) as run:
            run.log_metrics({k: float(v) for k, v in outcomes.items()
                             if isinstance(v, int | float) and not isinstance(v, bool)})
            run.log_metrics({f"scan.{n}.clean": s["clean_accuracy"] for n, s in scans.items()})
            run.log_artifact(json_path)
            run.log_artifact(html_path)
        return DemoResult(report=report, out=out_dir, html_path=html_path,
                          json_path=json_path)
    finally:
        if bar is not None:
            bar.stop()


def _round_robin(x: np.ndarray, y: np.ndarray, clients: Sequence[str], batch: int,
                 send: Callable[..., list[dict[str, Any]]],
                 feedback: Callable[..., None]) -> list[tuple[str, list[dict[str, Any]],
                                                           np.ndarray]]:
    """Send ``x`` in batches, the clients taking turns; true feedback for every answer."""
    got: dict[str, tuple[list[dict[str, Any]], list[int]]] = {c: ([], []) for c in clients}
    for k, i in enumerate(range(0, len(x), batch)):
        c = clients[k % len(clients)]
        ans = send(x[i:i + batch], c, batch)
        feedback(ans, y[i:i + batch], c)
        got[c][0].extend(ans)
        got[c][1].extend(int(v) for v in y[i:i + batch])
    return [(c, a, np.asarray(ys)) for c, (a, ys) in got.items() if a]


def _share(counts: dict[str, int]) -> float:
    n = sum(counts.values())
    return 0.0 if n == 0 else round((counts.get("flag", 0) + counts.get("block", 0)) / n, 4)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _render_html(report: DemoReport, dash: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bastion.reporting.html import HtmlPage

    o = report.outcomes
    page = HtmlPage("Bastion demo: attack, detect, heal",
                    subtitle=f"model {report.model_name}, seed {report.seed}"
                    f"{' (fast)' if report.fast else ''}, {report.time_s:.0f} s")
    page.heading("What happened")
    for ok, text in _story(report):
        if ok is None:
            page.paragraph(text)
        else:
            (page.good if ok else page.bad)(text)

    page.heading("Traffic, verdicts and drift")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    names = [p.name for p in report.phases]
    bottom = np.zeros(len(names))
    for v, color in [("allow", "#2e9d57"), ("flag", "#f0a020"), ("block", "#c0262d")]:
        vals = np.array([p.verdicts.get(v, 0) for p in report.phases], dtype=float)
        axes[0].bar(names, vals, bottom=bottom, color=color, label=v)
        bottom += vals
    axes[0].set_title("verdicts per phase")
    axes[0].legend()
    axes[0].tick_params(axis="x", rotation=20)
    clients = sorted({c for p in report.phases for c in p.by_client})
    shares = [_share({k: v for p in report.phases for k, v in p.by_client.get(c, {}).items()})
              for c in clients]
    axes[1].bar(clients, shares, color="#3b6fd8")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("share of a client's inputs flagged or blocked")
    page.figure(fig, alt="verdicts per phase and flag share per client")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    for srs in dash.get("traffic", []):
        pts = srs["points"]
        axes[0].plot([p["t"] - pts[0]["t"] for p in pts], [p["v"] for p in pts],
                     label=srs["name"])
    axes[0].set_title("inputs per time bucket by verdict")
    axes[0].set_xlabel("seconds")
    axes[0].legend()
    for srs in dash.get("drift", []):
        pts = srs["points"]
        if pts:
            axes[1].plot(range(1, len(pts) + 1), [p["v"] for p in pts], marker="o",
                         label=srs["name"])
    axes[1].axhline(3, color="#c0262d", ls="--", lw=1)
    axes[1].set_title("drift evidence (-log10 p) at each healing step")
    axes[1].set_xlabel("healing step")
    axes[1].legend()
    page.figure(fig, alt="traffic and drift over time")

    page.heading("Red team and hardening (PGD scan of the trusted holdout)")
    rows = []
    for name, sres in report.scans.items():
        rows.append([name, sres["clean_accuracy"]] + list(sres["robust_accuracy"].values()))
    eps_keys = list(next(iter(report.scans.values()))["robust_accuracy"]) if report.scans \
        else []
    page.table(rows, ["model", "clean"] + [f"robust eps={k}" for k in eps_keys])
    if report.scans:
        links = ", ".join(f'<a href="scans/{_esc(n)}/report.html">{_esc(n)}</a>'
                          for n in report.scans)
        page.raw(f"<p>Full scan reports: {links}.</p>")

    page.heading("Scenario")
    page.table([[p.name, p.description, p.inputs, p.verdicts.get("allow", 0),
                 p.verdicts.get("flag", 0), p.verdicts.get("block", 0),
                 "-" if p.accuracy is None else p.accuracy, ", ".join(p.signals_fired) or "-",
                 f"v{p.champion_after}", p.traffic_after, ", ".join(p.quarantined_after) or "-"]
                for p in report.phases],
               ["phase", "what", "inputs", "allow", "flag", "block", "accuracy", "signals",
                "champion", "traffic", "quarantined"])
    page.heading("Healing timeline (alerts, decisions with evidence, model changes)")
    rows = []
    for e in report.timeline:
        p = e["payload"]
        if e["kind"] == "model_change":
            what = {"alias": f"{p.get('alias')}: v{p.get('from_version')} -> v{p.get('version')}",
                    "traffic": f"traffic -> {p.get('to')}",
                    "quarantine": f"quarantine {p.get('client_id')}"}.get(p.get("type"), "change")
            detail = f"{p.get('actor', '')}: {p.get('reason', '')}"
        elif e["kind"] == "alert":
            what, detail = f"alert {p.get('monitor')}", str(p.get("message", ""))
        else:
            what = f"{'' if p.get('done') else 'not done: '}{p.get('action')} ({p.get('monitor')})"
            detail = str(p.get("decision", ""))
            gates = (p.get("evidence") or {}).get("gates")
            if gates:
                detail += " | gates: " + "; ".join(
                    f"{g['name']} {'pass' if g['passed'] else 'FAIL'} "
                    f"(candidate {_fmt(g.get('candidate'))}, champion {_fmt(g.get('champion'))})"
                    for g in gates)
        rows.append([e["at"][11:23], e["kind"], what, detail[:600]])
    page.table(rows, ["time", "kind", "what", "detail"])
    page.heading("All numbers (as in report.json)")
    page.table([[k, json.dumps(v) if isinstance(v, dict | list) else v]
                for k, v in o.items()], ["outcome", "value"])
    page.paragraph(f"Files: {json.dumps(report.files)}")
    return page.render()


def _esc(x: Any) -> str:
    import html

    return html.escape(str(x), quote=True)


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.0%}"


def _story(report: DemoReport) -> list[tuple[bool | None, str]]:
    """The demo's outcome in plain words: ``(True good / False bad / None neutral, text)``."""
    o = report.outcomes
    v = report.versions
    out: list[tuple[bool | None, str]] = []
    scans = report.scans
    if "baseline" in scans and "hardened" in scans:
        eps = "0.1" if "0.1" in scans["baseline"]["robust_accuracy"] else next(
            iter(scans["baseline"]["robust_accuracy"]), None)
        if eps is not None:
            b, h = scans["baseline"], scans["hardened"]
            out.append((None, f"A digits classifier was trained (v{v.get('baseline')}) and "
                        f"attacked with PGD: at eps={eps} it classified "
                        f"{_pct(b['robust_accuracy'][eps])} of the attacked inputs correctly "
                        f"(clean inputs: {_pct(b['clean_accuracy'])}). Adversarial training "
                        f"made v{v.get('hardened')}: {_pct(h['robust_accuracy'][eps])} under "
                        f"the same attack (clean {_pct(h['clean_accuracy'])}). It was promoted "
                        "to champion and served behind the guard."))
    out.append((None, f"Traffic was replayed in {len(report.phases)} phases: "
                + ", ".join(p.name.replace("_", " ") for p in report.phases) + "."))
    q_ev, q_ex = o.get("evasion_client_quarantined"), o.get("extraction_client_quarantined")
    out.append((bool(q_ev), "The client sending adversarial examples (mallory) was "
                + ("quarantined" if q_ev else "NOT quarantined")
                + f"; {_pct(o.get('evasion_flagged_share'))} of its inputs were flagged or "
                f"blocked, against {_pct(o.get('clean_flagged_share'))} of clean traffic."))
    out.append((bool(q_ex), "The client probing to steal the model (eve) was "
                + ("quarantined" if q_ex else "NOT quarantined")
                + f"; {_pct(o.get('extraction_flagged_share'))} of its queries were flagged."))
    benign = o.get("benign_clients_quarantined") or []
    out.append((not benign, "No honest client was quarantined." if not benign else
                f"Honest clients were quarantined by mistake: {', '.join(benign)}."))
    drift = ("Drifted inputs raised a drift alert" if o.get("drift_alerted") else
             "Drifted inputs raised NO drift alert")
    drift += (f"; traffic went to the fallback model {o.get('fallback_switches')} time(s)."
              if o.get("fallback_switches") else ".")
    out.append((bool(o.get("drift_alerted")), drift))
    before, after = o.get("poison_agreement_before"), o.get("poison_agreement_after")
    if before is not None and after is not None:
        held = after <= before + 0.05
        out.append((held, f"Feedback with {o.get('poisoned_labels')} flipped labels was sent; "
                    f"healing retrained {o.get('retrains_attempted', 0)} time(s) "
                    f"({o.get('retrains_promoted', 0)} promoted, "
                    f"{o.get('retrains_refused', 0)} refused by the gates). The champion "
                    f"agrees with {_pct(after)} of the flipped labels (before: "
                    f"{_pct(before)}): " + ("the poison did not get in." if held else
                                            "the champion adopted poisoned labels.")))
    out.append((None, f"At the end v{o.get('final_champion')} is champion; holdout accuracy "
                f"{_pct(o.get('holdout_accuracy_initial_champion'))} at the start, "
                f"{_pct(o.get('holdout_accuracy_final_champion'))} at the end."))
    return out


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{float(v):.3f}"
