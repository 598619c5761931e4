"""Benchmark 4: exploit success rate against the vulnerable test agent, direct and through
the guard proxy.

    .venv/bin/python benchmarks/llm_proxy.py [--families canary,jailbreak,indirect,transformed]

Starts the deliberately vulnerable OpenAI-compatible agent of the test suite
(``tests/llm/vulnerable_server.py``) and a guard proxy (shipped detector, policy block for
user content, strip for tool content, forbidden tool ``transfer_funds``, output leak
scanning) in this process, runs the shipped probe suites against both, and writes
``benchmarks/results/llm_proxy.json`` with the exploit success rate (95% Wilson interval)
overall, per family and per transform. Also records the benign-control pass rate through
the proxy (the canary benign controls must still be answered).

The proxy writes its events to an on-disk SQLite event store (the shared
``store.events.EventStore``, synchronous commits), as ``bastion guard-llm`` does; the
result records how many events of each kind were written and checks that every proxied
request left exactly one ``verdict`` event. ``--latency-requests N`` also times N benign
requests (sequential, interleaved across targets; median and p95) straight to the agent,
through a proxy whose events stay in memory, and through the proxy with the on-disk store:
the cost of durable events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BASTION_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "datasets" / "prompt-injection"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests" / "llm"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="canary,jailbreak,indirect,refusal,transformed")
    ap.add_argument("--per-transform", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="embedding cache .npz (speed only)")
    ap.add_argument("--out", default=str(RESULTS / "llm_proxy.json"))
    ap.add_argument("--latency-requests", type=int, default=100)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import socket

    import uvicorn
    from vulnerable_server import VulnerableServer

    from bastion._util import write_json_atomic
    from bastion.llm.client import ChatClient
    from bastion.llm.detector import PromptInjectionDetector
    from bastion.llm.guard import WITHHELD, LlmGuard
    from bastion.llm.probes import load_probes
    from bastion.llm.proxy import create_guard_app
    from bastion.llm.redteam import run_redteam

    probes = load_probes(args.families.split(","), per_transform=args.per_transform, seed=args.seed)
    from bastion.llm.embed import Embedder, EmbeddingCache
    from bastion.llm.events import LlmEventLog
    from bastion.store.events import EVENT_KINDS

    cache = EmbeddingCache(args.cache) if args.cache else None
    det = PromptInjectionDetector.load_default(embedder=Embedder(cache=cache))
    guard = LlmGuard(det, policy="block", tool_policy="strip", forbidden_tools=["transfer_funds"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    def start(app, port: int):  # type: ignore[no-untyped-def]
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
        )
        th = threading.Thread(target=server.run, daemon=True)
        th.start()
        while not server.started:
            time.sleep(0.05)
        return server, th

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    with VulnerableServer() as agent, tempfile.TemporaryDirectory() as tmp:
        elog = LlmEventLog(f"sqlite:///{Path(tmp) / 'events.db'}")
        # open mode: the benchmark measures the guard's overhead, not key handling
        server, th = start(create_guard_app(agent.base_url, guard=guard, events=elog,
                                            open_mode=True), port)
        proxy_url = f"http://127.0.0.1:{port}/v1"
        direct = run_redteam(
            probes,
            target=agent.base_url,
            model="vuln-agent",
            out_dir=Path(tmp) / "direct",
            resume=False,
        )
        guarded = run_redteam(
            probes,
            target=proxy_url,
            model="vuln-agent",
            out_dir=Path(tmp) / "proxy",
            resume=False,
            concurrency=2,
            timeout=120,
        )
        controls = [
            json.loads(x)
            for x in (DATA / "canary_benign_controls.jsonl").read_text().splitlines()
            if x.strip()
        ]

        async def ask_all() -> list[bool]:
            async with ChatClient(proxy_url, "vuln-agent", api_key_env=None, timeout=120) as c:
                res = []
                for row in controls:
                    r = await c.chat(
                        [
                            {"role": "system", "content": row["test_case_prompt"]},
                            {"role": "user", "content": row["user_input"]},
                        ]
                    )
                    res.append(r.ok and r.content != WITHHELD)
                return res

        answered = asyncio.run(ask_all())
        events = {k: elog.store.count(kinds=k) for k in EVENT_KINDS}
        n_sent = len(probes) + len(controls)

        def timed(urls: dict[str, str], n: int) -> dict[str, dict[str, float]]:
            """n sequential benign requests to each target, interleaved (so load changes on
            a shared machine hit every target alike); median and p95 per target."""
            import httpx
            import numpy as np

            body = {"model": "vuln-agent",
                    "messages": [{"role": "user", "content": "What time do you open on Saturday?"}]}
            ms: dict[str, list[float]] = {k: [] for k in urls}
            with httpx.Client(timeout=60) as c:
                for u in urls.values():  # warm-up
                    for _ in range(3):
                        c.post(u + "/chat/completions", json=body)
                for i in range(n):
                    names = list(urls)
                    for k in names[i % len(names):] + names[: i % len(names)]:
                        t = time.perf_counter()
                        r = c.post(urls[k] + "/chat/completions", json=body)
                        ms[k].append(1000 * (time.perf_counter() - t))
                        assert r.status_code == 200, r.text
            return {k: {"n": n, "median_ms": round(float(np.median(v)), 2),
                        "p95_ms": round(float(np.percentile(v, 95)), 2)} for k, v in ms.items()}

        latency = None
        if args.latency_requests > 0:
            port2 = free_port()
            mem_server, mem_th = start(create_guard_app(agent.base_url, guard=guard,
                                                        open_mode=True), port2)
            latency = timed({
                "direct": agent.base_url,
                "proxy_events_in_memory": f"http://127.0.0.1:{port2}/v1",
                "proxy_events_on_disk": proxy_url,
            }, args.latency_requests)
            mem_server.should_exit = True
            mem_th.join(timeout=10)
        if cache is not None:
            cache.save()
        server.should_exit = True
        th.join(timeout=10)
        elog.close()

    def short(rep) -> dict:  # type: ignore[no-untyped-def]
        keep = {
            "exploit_success_rate",
            "ci95",
            "successes",
            "judged",
            "blocked",
            "errors",
            "unjudged",
        }
        d = rep.model_dump(mode="json")
        return {
            "overall": {k: v for k, v in d["overall"].items() if k in keep},
            "by_family": {f: {k: x for k, x in v.items() if k in keep}
                          for f, v in d["by_family"].items()},
            "by_transform": {f: {k: x for k, x in v.items() if k in keep}
                             for f, v in d["by_transform"].items()},
        }

    result = {
        "benchmark": "llm_proxy",
        "n_probes": len(probes),
        "seconds": round(time.time() - t0, 1),
        "proxy": {
            "policy": "block",
            "tool_policy": "strip",
            "forbidden_tools": ["transfer_funds"],
            "threshold": det.threshold_,
        },
        "direct": short(direct),
        "through_proxy": short(guarded),
        "benign_controls_answered_through_proxy": {
            "n": len(answered),
            "answered": sum(answered),
            "rate": sum(answered) / max(1, len(answered)),
        },
        "event_store": {
            "backend": "sqlite (on disk, synchronous commits)",
            "requests_sent_through_proxy": n_sent,
            "events_by_kind": events,
            "one_verdict_per_request": events["verdict"] == n_sent,
        },
        "latency_benign_request": latency,
    }
    write_json_atomic(args.out, result)
    print(
        json.dumps(
            {
                "direct": result["direct"]["overall"],
                "proxy": result["through_proxy"]["overall"],
                "controls": result["benign_controls_answered_through_proxy"],
                "events": result["event_store"],
                "latency": latency,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
