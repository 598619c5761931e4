"""Benchmark 1 of issue 5: the guard's overhead on ``POST /v1/predict``.

The service runs in its own process (uvicorn on 127.0.0.1, one worker), once with the
guard on (outlier, confidence and squeeze detectors plus per-client extraction watch) and
once with it off (the bare champion; every prediction still goes to the event store).
The load generator runs in separate processes (``multiprocessing``, spawn), each with one
keep-alive ``http.client`` connection sending pre-encoded JSON bodies back to back:
latency phases use one connection (no queueing in the server), throughput phases
``--clients`` connections; single-item and batched. Both servers run side by side and
every phase alternates between them in ``--rounds`` rounds (off, on, off, on, ...), so a
slow spell of the shared machine or its disk (fsync times here swing from 0.3 to 4 ms)
hits both alike. Reported: latency p50/p99 over all rounds, throughput, the guard-on /
guard-off ratios (pooled, and the median of the per-round ratios), and the machine's
load average.

Model: a zoo CNN trained on built-in digits (1x8x8), reference = digits' training split.

    .venv/bin/python benchmarks/service_guard_overhead.py [--requests 2000] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_main(args: argparse.Namespace) -> None:
    """The server process."""
    import torch

    torch.set_num_threads(1)
    from bastion.service.app import create_app
    from bastion.service.config import ServiceConfig
    from bastion.service.server import serve

    cfg = ServiceConfig.build(
        model=args.model, reference="builtin:digits", model_name="bench-guard",
        events_url=f"sqlite:///{args.work}/events-{args.guard}.db",
        tracking_uri=f"sqlite:///{args.work}/mlflow.db", guard=args.guard == "on",
        reload_interval_s=0, max_batch=256,
        # the load generators share one address: measure the guard, not the rate limit
        limits={"rate_limit_per_s": 0},
        **({"detectors": args.detectors.split(",")} if args.detectors else {}))
    serve(create_app(cfg), host="127.0.0.1", port=args.port, log_level="error")


def _train(work: Path) -> Path:
    import torch

    from bastion.data import load_data
    from bastion.models.persist import save_model
    from bastion.models.torch_model import TorchModel
    from bastion.models.train import train_classifier
    from bastion.models.zoo import build_module

    torch.manual_seed(0)
    ds = load_data("builtin:digits", seed=0)
    m = TorchModel(build_module("cnn", input_shape=(1, 8, 8), n_classes=10), n_classes=10,
                   input_shape=(1, 8, 8), name="bench")
    train_classifier(m, ds.x_train, ds.y_train, epochs=5, lr=3e-3, batch_size=64, seed=0)
    return save_model(m, work / "model", arch="cnn")


def _client_proc(host: str, port: int, bodies: list[bytes], warmup: int, barrier: Any,
                 out: Any) -> None:
    """One load-generator process: one keep-alive ``http.client`` connection, requests
    back to back; puts ``(latencies_s, t_first, t_last, errors)`` on ``out``."""
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=60)
    # every request authenticates (the admin token: one SHA-256 and a constant-time
    # compare, as an API key costs); the admin may label requests with any client id
    headers = {"Content-Type": "application/json",
               "Authorization": f"Bearer {os.environ['BASTION_ADMIN_TOKEN']}"}

    def post(b: bytes) -> int:
        nonlocal conn
        for attempt in (0, 1):
            try:
                conn.request("POST", "/v1/predict", body=b, headers=headers)
                r = conn.getresponse()
                r.read()
                return r.status
            except (OSError, http.client.HTTPException):
                # the server closes a keep-alive connection idle for 5 s (e.g. while the
                # other clients start): reconnect once
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=60)
                if attempt:
                    raise
        return 0

    for b in bodies[:warmup]:
        post(b)
    barrier.wait()
    lat: list[float] = []
    errors = 0
    t_first = time.perf_counter()
    for b in bodies:
        t = time.perf_counter()
        if post(b) != 200:
            errors += 1
        lat.append(time.perf_counter() - t)
    t_last = time.perf_counter()
    conn.close()
    out.put((lat, t_first, t_last, errors))


def _cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) the process ``pid`` has used (Linux ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return None


def _load(port: int, bodies: list[bytes], clients: int, n_items: int,
          server_pid: int | None = None) -> dict[str, Any]:
    """Closed-loop load from ``clients`` separate processes (one connection each); with
    ``server_pid``, also the server's CPU time per request (less sensitive to other work
    on the machine than the wall-clock numbers)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(clients)
    q = ctx.Queue()
    per = [bodies[i::clients] for i in range(clients)]
    procs = [ctx.Process(target=_client_proc, args=("127.0.0.1", port, p, 20, barrier, q))
             for p in per]
    for p in procs:
        p.start()
    cpu0 = _cpu_s(server_pid)  # includes the warm-up requests (20 per client)
    import queue

    got: list[Any] = []
    deadline = time.monotonic() + 900
    while len(got) < len(procs):
        try:
            got.append(q.get(timeout=1.0))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.terminate()
                raise SystemExit("a load-generator process failed (see its traceback)") from None
    cpu1 = _cpu_s(server_pid)
    for p in procs:
        p.join(timeout=60)
    lat = np.asarray([x for g in got for x in g[0]]) * 1000
    wall = max(g[2] for g in got) - min(g[1] for g in got)
    return {"_lat_ms": lat, "_cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
            "requests": len(bodies), "clients": clients, "errors": sum(g[3] for g in got),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "mean_ms": float(lat.mean()), "requests_per_s": len(bodies) / wall,
            "items_per_s": n_items / wall, "wall_s": wall,
            "server_cpu_ms_per_request": None if cpu0 is None or cpu1 is None else
            1000 * (cpu1 - cpu0) / (len(bodies) + 20 * clients)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--guard", default="on")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default="")
    ap.add_argument("--work", default="")
    ap.add_argument("--requests", type=int, default=2000,
                    help="single-item requests per phase")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8,
                    help="load-generator processes of the throughput phase")
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternations between the guard-off and guard-on servers per phase")
    ap.add_argument("--detectors", default="",
                    help="comma-separated request-path detectors of the guard-on server "
                         "(default: the service's, outlier,confidence,squeeze); a run with "
                         "other detectors writes service_guard_overhead_<detectors>.json")
    args = ap.parse_args()
    if args.serve:
        serve_main(args)
        return
    import httpx
    from common import write_result

    from bastion.data import load_data

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    import secrets

    # the servers and the load generators (spawned: they inherit the environment)
    os.environ["BASTION_ADMIN_TOKEN"] = secrets.token_urlsafe(32)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-guard-"))
    model = _train(work)
    ds = load_data("builtin:digits", seed=0)
    x = ds.x_test

    def enc(d: dict[str, Any]) -> bytes:
        return json.dumps(d).encode()

    single = [enc({"inputs": x[i % len(x)][None].tolist(), "client_id": f"c{i % 8}"})
              for i in range(args.requests)]
    n_b = max(args.requests // 10, 40)
    batched = [enc({"inputs": x[(i * args.batch) % (len(x) - args.batch):][:args.batch]
                    .tolist(), "client_id": f"c{i % 8}"}) for i in range(n_b)]
    # latency: one connection (no queueing in the server); throughput: --clients
    # connections from as many processes
    phases = [("single", single, 1, 1), (f"batch{args.batch}", batched, 1, args.batch),
              ("single_throughput", single, args.clients, 1),
              (f"batch{args.batch}_throughput", batched, args.clients, args.batch)]
    procs: dict[str, Any] = {}
    ports: dict[str, int] = {}
    results: dict[str, Any] = {"off": {}, "on": {}}
    per_round: dict[str, list[float]] = {}
    try:
        for guard in ("off", "on"):  # one after the other: they share the MLflow store
            ports[guard] = port = _free_port()
            procs[guard] = proc = subprocess.Popen(
                [sys.executable, __file__, "--serve", "--guard", guard, "--port", str(port),
                 "--model", str(model), "--work", str(work), "--detectors", args.detectors],
                env={**os.environ, "OMP_NUM_THREADS": "1"})
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + 300
            while True:
                try:
                    if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit(f"the guard={guard} server did not start")
                time.sleep(0.5)
        rounds = max(1, args.rounds)
        for name, bodies, clients, per in phases:
            runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
            for r in range(rounds):
                part = bodies[r::rounds]
                for guard in ("off", "on"):
                    runs[guard].append(_load(ports[guard], part, clients, per * len(part),
                                             procs[guard].pid))
            per_round[name] = [
                float(np.percentile(on["_lat_ms"], 50) / np.percentile(off["_lat_ms"], 50) - 1)
                for off, on in zip(runs["off"], runs["on"], strict=True)]
            for guard in ("off", "on"):
                rs = runs[guard]
                lat = np.concatenate([x["_lat_ms"] for x in rs])
                wall = sum(x["wall_s"] for x in rs)
                cpu = [x["_cpu_s"] for x in rs]
                n_req = sum(x["requests"] for x in rs)
                results[guard][name] = r_ = {
                    "requests": n_req, "clients": clients, "rounds": rounds,
                    "errors": sum(x["errors"] for x in rs),
                    "p50_ms": float(np.percentile(lat, 50)),
                    "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()),
                    "requests_per_s": n_req / wall, "items_per_s": per * n_req / wall,
                    "wall_s": wall,
                    "server_cpu_ms_per_request": None if None in cpu else
                    1000 * sum(cpu) / (n_req + 20 * clients * rounds)}
                print(guard, name, {k: round(v, 2) if isinstance(v, float) else v
                                    for k, v in r_.items()}, flush=True)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
    ratios = {}
    for kind in results["on"]:
        on, off = results["on"][kind], results["off"][kind]
        ratios[kind] = {"p50_overhead": on["p50_ms"] / off["p50_ms"] - 1,
                        "p50_overhead_per_round": per_round[kind],
                        "p50_overhead_median_of_rounds": float(np.median(per_round[kind])),
                        "p99_overhead": on["p99_ms"] / off["p99_ms"] - 1,
                        "throughput_ratio": on["requests_per_s"] / off["requests_per_s"]}
    payload = {"settings": vars(args),
               "load_generator": "separate processes, one keep-alive http.client connection "
                                 "each; latency phases use 1 connection, throughput phases "
                                 "--clients connections; both servers run side by side and "
                                 "each phase alternates off/on for --rounds rounds",
               "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
               "results": results, "ratios": ratios,
               "goals": {"p50_overhead_below": 0.30, "single_item_rps_guard_on_at_least": 500}}
    name = "service_guard_overhead"
    if args.detectors:
        name += "_" + args.detectors.replace(",", "_")
    path = write_result(name, payload)
    print(ratios)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
