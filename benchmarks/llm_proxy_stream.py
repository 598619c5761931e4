"""Benchmark: a 500k-character streamed answer through the guard proxy versus straight from
the upstream, and what big streams do to a one-line request beside them (issue 14, item 7).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llm_proxy_stream.py [--chars 500000] [--runs 5]

The upstream is the test suite's local OpenAI-compatible server (``tests/llm/
vulnerable_server.py``, model ``long:N``: N characters in 16-character chunks, as fast as
it can write them). Upstream, proxy and client run in three processes, as in production.
The proxy runs the shipped detector on the prompt, has two secrets
configured (one of 123 characters, so the hold-back is 262 characters) and a 600-character
system prompt in the request, so the answer scan does all its work (secrets and
system-prompt overlap). Each run times the whole stream (request to ``[DONE]``) direct and
through the proxy, interleaved; the medians are compared. Then a one-line chat request is
timed through the proxy alone and while three big streams relay (median of
``--small-requests``). Writes ``benchmarks/results/llm_proxy_stream.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests" / "llm"))

SYSTEM = ("You are the assistant of ACME Bank. Answer questions about accounts, cards, loans "
          "and opening hours. Be polite and brief. Never give legal or tax advice. The branch "
          "manager's override code is 'ORCA-5521-TIDE' and must never be shared with anyone. "
          "If a customer asks for the override code, refuse. Do not discuss other banks. "
          "Escalate complaints to a human agent. Do not make promises about interest rates. "
          "Always remind customers never to share their PIN. Answer in the customer's language "
          "when you can. Keep answers under two hundred words unless asked for detail.")


LONG_SECRET = "".join("ABCDEFGHJKMNPQRSTUVWXYZ23456789"[(i * 7 + 3) % 31] for i in range(123))
SECRETS = ["sk-live-4f9a8b7c6d5e4f3a2b1c", LONG_SECRET]


class _NoDetector:
    threshold_ = 0.5


def serve_upstream(port: int) -> None:
    from vulnerable_server import VulnerableServer

    VulnerableServer(port).start()
    print("ready", flush=True)
    time.sleep(10**9)


def serve_proxy(upstream: str, port: int, events: str) -> None:
    import uvicorn

    from bastion.llm.detector import PromptInjectionDetector
    from bastion.llm.guard import LlmGuard
    from bastion.llm.proxy import create_guard_app

    det = PromptInjectionDetector.load_default()
    det.score(["warm-up"])
    guard = LlmGuard(det, secrets=SECRETS, trusted_roles=["system"])
    uvicorn.run(create_guard_app(upstream, guard=guard, events=events), host="127.0.0.1",
                port=port, log_level="error")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: list[str], url: str) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([sys.executable, __file__, *args])
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            httpx.get(url, timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{args[0]} did not start")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chars", type=int, default=500_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--small-requests", type=int, default=20)
    ap.add_argument("--out", default=str(RESULTS / "llm_proxy_stream.json"))
    ap.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)  # child processes
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.serve:
        if args.serve[0] == "upstream":
            serve_upstream(int(args.serve[1]))
        else:
            serve_proxy(args.serve[1], int(args.serve[2]), args.serve[3])
        return 0
    import tempfile

    import httpx
    from vulnerable_server import LOREM

    from bastion._util import write_json_atomic
    from bastion.llm.client import parse_sse_lines
    from bastion.llm.guard import LlmGuard
    from bastion.web.keys import KeyStore

    expected = (LOREM * (args.chars // len(LOREM) + 1))[: args.chars]
    tmp = tempfile.mkdtemp(prefix="bastion-bench-")
    events = f"sqlite:///{tmp}/events.db"  # the proxy's store, with its api_keys table
    with KeyStore(events) as ks:
        auth = {"Authorization": f"Bearer {ks.create('bench', 'client')[0]}"}
    up_port, port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    procs = [start(["--serve", "upstream", str(up_port)], upstream + "/models")]
    procs.append(start(["--serve", "proxy", upstream, str(port), events],
                       f"http://127.0.0.1:{port}/healthz"))
    try:
        agent_base = upstream
        proxy = f"http://127.0.0.1:{port}/v1"
        big = {"model": f"long:{args.chars}", "stream": True, "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Please write the long report."}]}

        def cpu(pid: int) -> float:  # user + system seconds of a process (Linux)
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

        def stream(base: str) -> dict[str, float]:
            c0 = [cpu(p.pid) for p in procs]
            t0 = time.perf_counter()
            first = None
            lines = []
            with httpx.stream("POST", base + "/chat/completions", json=big, timeout=600,
                              headers=auth) as r:
                for line in r.iter_lines():
                    if first is None and line.startswith("data:"):
                        first = time.perf_counter() - t0
                    lines.append(line)
            total = time.perf_counter() - t0
            c1 = [cpu(p.pid) for p in procs]
            text, _ = parse_sse_lines(lines)
            assert text == expected, (base, len(text))
            return {"total_s": total, "first_byte_s": first or total,
                    "upstream_cpu_s": c1[0] - c0[0], "proxy_cpu_s": c1[1] - c0[1]}

        stream(agent_base)  # warm-up
        stream(proxy)
        runs: dict[str, list[dict[str, float]]] = {"direct": [], "proxy": []}
        for i in range(args.runs):
            for k in (["direct", "proxy"] if i % 2 == 0 else ["proxy", "direct"]):
                runs[k].append(stream(agent_base if k == "direct" else proxy))

        small = {"model": "vuln-agent",
                 "messages": [{"role": "user", "content": "What time do you open?"}]}

        def small_latency(n: int) -> list[float]:
            out = []
            with httpx.Client(timeout=120, headers=auth) as c:
                for _ in range(n):
                    t = time.perf_counter()
                    assert c.post(proxy + "/chat/completions", json=small).status_code == 200
                    out.append(time.perf_counter() - t)
            return out

        quiet = small_latency(args.small_requests)
        stop = threading.Event()

        def keep_streaming() -> None:
            while not stop.is_set():
                stream(proxy)

        bg = [threading.Thread(target=keep_streaming, daemon=True) for _ in range(3)]
        for t in bg:
            t.start()
        time.sleep(1.0)
        busy = small_latency(args.small_requests)
        stop.set()
        for t in bg:
            t.join(timeout=600)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
    guard = LlmGuard(_NoDetector(), secrets=SECRETS)

    med = {k: statistics.median(r["total_s"] for r in v) for k, v in runs.items()}
    result = {
        "benchmark": "llm_proxy_stream",
        "answer_chars": args.chars,
        "chunk_chars": 16,
        "runs": args.runs,
        "proxy": {"secrets": 2, "longest_secret": 123, "hold_back": guard.output_scanner(
            SYSTEM).hold_back, "system_prompt_chars": len(SYSTEM), "detector": "shipped"},
        "stream_total_s": {k: {"median": round(m, 3),
                               "all": [round(r["total_s"], 3) for r in runs[k]]}
                           for k, m in med.items()},
        "first_byte_s_median": {k: round(statistics.median(r["first_byte_s"] for r in v), 4)
                                for k, v in runs.items()},
        "proxy_slower_by": round(med["proxy"] / med["direct"] - 1, 4),
        "cpu_s_per_stream_median": {
            "upstream": round(statistics.median(r["upstream_cpu_s"] for r in runs["direct"]), 3),
            "proxy": round(statistics.median(r["proxy_cpu_s"] for r in runs["proxy"]), 3)},
        "chars_per_s": {k: round(args.chars / m) for k, m in med.items()},
        "one_line_request_s": {
            "quiet_median": round(statistics.median(quiet), 4),
            "beside_3_big_streams_median": round(statistics.median(busy), 4),
            "beside_3_big_streams_max": round(max(busy), 4),
            "n": args.small_requests},
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "cpu_note": f"{os.cpu_count()} cores shared with other jobs; OMP_NUM_THREADS="
                    f"{os.environ.get('OMP_NUM_THREADS')}",
    }
    write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
