"""Issue 14's load benchmark: the service under slow clients, a flooding client and an
fd-exhaustion attempt, with its default limits (``bastion.web.limits.HttpLimits``).

The service runs in its own process (uvicorn on 127.0.0.1, the guard on, default
limits: header timeout 10 s, 2048 connections, 100 requests/s per key, ...). Attackers
run in separate processes (``multiprocessing``, spawn); the measuring client in this
one. Health probes open a fresh connection each (as a load balancer's probe does).

(a) ``slowloris``: ``--slow`` sockets each send an unfinished request head and then one
    header line a second, reconnecting when the server cuts them; /v1/health latency is
    measured while they are open (over more than one header timeout, so the cuts and
    reconnections are included), against its latency on a quiet server.
(b) ``flood``: ``--flooders`` processes send guarded predictions back to back with one API
    key (the server's per-key limit: ``--rate-limit``, 20/s by default here, below what
    the guard serves on the benchmark machine; the library default is 100/s); a
    well-behaved client (another key, 10 requests/s, one keep-alive connection)
    measures its guarded predict p50 in quiet and flooded rounds, alternating
    (``--rounds``) so a slow spell of the shared machine hits both.
(c) ``fd``: ``--idle`` sockets opened as fast as possible and never used, reopened when
    closed; /v1/health latency, and the server's open file descriptors (``/proc``).

    .venv/bin/python benchmarks/security_load.py [--slow 1000] [--idle 5000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


#: the server's client API keys by name (written by ``--serve`` to ``WORK/keys.json``)
KEYS: dict[str, str] = {}


def serve_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from bastion.service.app import create_app
    from bastion.service.config import ServiceConfig
    from bastion.service.server import serve

    cfg = ServiceConfig.build(
        model=args.model, reference="builtin:digits", model_name="bench-security",
        events_url=f"sqlite:///{args.work}/events.db",
        tracking_uri=f"sqlite:///{args.work}/mlflow.db", reload_interval_s=0,
        limits={"rate_limit_per_s": args.rate_limit, "rate_limit_burst": args.rate_burst,
                "rate_limit_delay_s": args.rate_delay})
    app = create_app(cfg)
    from bastion.web.keys import KeyStore

    # real client keys (the rate limit keys on the verified key); the parent reads them
    keys = {name: KeyStore(app.state.service.store).create(name, "client")[0]
            for name in ("flooder", "well-behaved")}
    (Path(args.work) / "keys.json").write_text(json.dumps(keys))
    serve(app, host="127.0.0.1", port=args.port, log_level="critical")


# -- attackers (separate processes) -------------------------------------------------------
def _slowloris(port: int, n: int, seconds: float, opened: Any, out: Any) -> None:
    import asyncio

    from bastion.web.limits import raise_fd_limit

    raise_fd_limit()
    stats = {"connects": 0, "cut_408": 0, "cut_other": 0, "connect_errors": 0}

    async def one(i: int, stop: float) -> None:
        while time.monotonic() < stop:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                stats["connect_errors"] += 1
                await asyncio.sleep(0.5)
                continue
            stats["connects"] += 1
            with opened.get_lock():
                opened.value += 1
            try:
                w.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
                await w.drain()
                k = 0
                while time.monotonic() < stop:
                    try:
                        data = await asyncio.wait_for(r.read(1024), 1.0)
                    except TimeoutError:
                        w.write(b"X-Slow-%d: a\r\n" % k)
                        k += 1
                        await w.drain()
                        continue
                    stats["cut_408" if data.startswith(b"HTTP/1.1 408") else "cut_other"] += 1
                    break
            except OSError:
                stats["cut_other"] += 1
            finally:
                with opened.get_lock():
                    opened.value -= 1
                w.close()

    async def main() -> None:
        stop = time.monotonic() + seconds
        await asyncio.gather(*(one(i, stop) for i in range(n)))

    asyncio.run(main())
    out.put(stats)


def _idle_flood(port: int, n: int, seconds: float, opened: Any, out: Any) -> None:
    import asyncio

    from bastion.web.limits import raise_fd_limit

    raise_fd_limit()
    stats = {"connects": 0, "closed_by_server": 0, "connect_errors": 0}

    async def one(stop: float) -> None:
        while time.monotonic() < stop:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                stats["connect_errors"] += 1
                await asyncio.sleep(0.2)
                continue
            stats["connects"] += 1
            with opened.get_lock():
                opened.value += 1
            try:
                data = await asyncio.wait_for(r.read(1), max(0.01, stop - time.monotonic()))
                if not data:
                    stats["closed_by_server"] += 1
            except (TimeoutError, OSError):
                pass
            finally:
                with opened.get_lock():
                    opened.value -= 1
                w.close()

    async def main() -> None:
        stop = time.monotonic() + seconds
        await asyncio.gather(*(one(stop) for _ in range(n)))

    asyncio.run(main())
    out.put(stats)


def _flooder(port: int, body: bytes, seconds: float, out: Any, key: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", "X-API-Key": key}
    codes: dict[int, int] = {}
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        try:
            conn.request("POST", "/v1/predict", body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            codes[r.status] = codes.get(r.status, 0) + 1
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            codes[0] = codes.get(0, 0) + 1
    out.put(codes)


# -- measuring client (this process) -----------------------------------------------------
def _health_once(port: int) -> tuple[float, int]:
    t = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", "/v1/health")
        r = c.getresponse()
        r.read()
        status = r.status
    except (OSError, http.client.HTTPException):
        status = 0
    finally:
        c.close()
    return (time.perf_counter() - t) * 1000, status


def _health_series(port: int, seconds: float, every: float = 0.05,
                   fds_of: int | None = None) -> dict[str, Any]:
    lat, bad, fds = [], 0, []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        ms, status = _health_once(port)
        if status == 200:
            lat.append(ms)
        else:
            bad += 1
        if fds_of is not None:
            try:
                fds.append(len(os.listdir(f"/proc/{fds_of}/fd")))
            except OSError:
                pass
        time.sleep(every)
    a = np.asarray(lat) if lat else np.asarray([np.nan])
    out = {"probes": len(lat) + bad, "failed": bad, "p50_ms": float(np.percentile(a, 50)),
           "p99_ms": float(np.percentile(a, 99)), "max_ms": float(np.max(a))}
    if fds:
        out["server_fds_max"] = int(max(fds))
    return out


def _predict_series(port: int, bodies: list[bytes], every: float) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", "X-API-Key": KEYS["well-behaved"]}
    lat, codes = [], {}
    t_start = time.perf_counter()
    for b in bodies:
        t = time.perf_counter()
        conn.request("POST", "/v1/predict", body=b, headers=headers)
        r = conn.getresponse()
        r.read()
        ms = (time.perf_counter() - t) * 1000
        codes[r.status] = codes.get(r.status, 0) + 1
        if r.status == 200:
            lat.append(ms)
        time.sleep(max(0.0, every - ms / 1000))
    conn.close()
    return {"lat": lat, "codes": codes, "wall_s": time.perf_counter() - t_start}


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _limited(port: int) -> dict[str, float]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    out = {}
    for line in text.splitlines():
        if line.startswith("bastion_http_limited_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.removeprefix("bastion_http_limited_total")] = float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default="")
    ap.add_argument("--work", default="")
    ap.add_argument("--slow", type=int, default=1000, help="slow connections in (a)")
    ap.add_argument("--slow-seconds", type=float, default=15.0)
    ap.add_argument("--idle", type=int, default=5000, help="idle sockets in (c)")
    ap.add_argument("--idle-seconds", type=float, default=12.0)
    ap.add_argument("--flooders", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=100, help="well-behaved requests a round")
    ap.add_argument("--rate-limit", type=float, default=20.0,
                    help="the server's per-key limit (requests/s; the library default is 100)")
    ap.add_argument("--rate-burst", type=int, default=40)
    ap.add_argument("--rate-delay", type=float, default=1.0,
                    help="seconds a limited key's 429 is held back (0: at once)")
    args = ap.parse_args()
    if args.serve:
        serve_main(args)
        return
    import multiprocessing as mp

    from common import markdown_table, write_result
    from service_guard_overhead import _free_port, _train

    from bastion.data import load_data
    from bastion.web.limits import HttpLimits, raise_fd_limit

    raise_fd_limit()
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-security-"))
    model = _train(work)
    x = load_data("builtin:digits", seed=0).x_test
    bodies = [json.dumps({"inputs": x[i % len(x)][None].tolist()}).encode()
              for i in range(args.requests * args.rounds * 2)]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(port),
                             "--model", str(model), "--work", str(work), "--rate-limit",
                             str(args.rate_limit), "--rate-burst", str(args.rate_burst),
                             "--rate-delay", str(args.rate_delay)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    ctx = mp.get_context("spawn")
    res: dict[str, Any] = {}
    try:
        t0 = time.time()
        while _health_once(port)[1] != 200:
            if proc.poll() is not None or time.time() - t0 > 300:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        KEYS.update(json.loads((work / "keys.json").read_text()))
        for _ in range(20):
            _health_once(port)
        _predict_series(port, bodies[:50], 0.0)  # warm-up

        # (a) slow connections
        res["health_quiet"] = _health_series(port, 5.0)
        opened = ctx.Value("i", 0)
        q = ctx.Queue()
        p = ctx.Process(target=_slowloris, args=(port, args.slow, args.slow_seconds, opened, q))
        p.start()
        t = time.monotonic()
        while opened.value < args.slow and time.monotonic() - t < 30:
            time.sleep(0.1)
        at_start = int(opened.value)
        res["slowloris"] = {"slow_connections_open_at_start": at_start,
                            **_health_series(port, args.slow_seconds - (time.monotonic() - t)
                                             - 1.0, fds_of=proc.pid)}
        res["slowloris"]["attacker"] = q.get(timeout=120)
        p.join(30)
        print("slowloris", res["slowloris"], flush=True)

        # (b) a flooding key beside a well-behaved one
        rounds: list[dict[str, Any]] = []
        per = args.requests
        for r in range(args.rounds):
            quiet = _predict_series(port, bodies[2 * r * per:(2 * r + 1) * per], 0.1)
            fq = ctx.Queue()
            seconds = per * 0.1 + 3.0
            fl = [ctx.Process(target=_flooder, args=(port, bodies[0], seconds, fq,
                                                           KEYS["flooder"]))
                  for _ in range(args.flooders)]
            for f in fl:
                f.start()
            time.sleep(1.5)  # the flood is on before measuring
            cpu0 = _cpu_s(proc.pid)
            flood = _predict_series(port, bodies[(2 * r + 1) * per:(2 * r + 2) * per], 0.1)
            cpu1 = _cpu_s(proc.pid)
            codes: dict[str, int] = {}
            for _ in fl:
                for k, v in fq.get(timeout=120).items():
                    codes[str(k)] = codes.get(str(k), 0) + v
            for f in fl:
                f.join(30)
            rounds.append({"server_cpu_share_during_flood": (cpu1 - cpu0) / flood["wall_s"],
                           "quiet_p50_ms": float(np.median(quiet["lat"])),
                           "flood_p50_ms": float(np.median(flood["lat"])),
                           "quiet_codes": quiet["codes"], "flood_codes": flood["codes"],
                           "flooder_codes": codes})
            print("flood round", r, rounds[-1], flush=True)
        q_all = [rr["quiet_p50_ms"] for rr in rounds]
        f_all = [rr["flood_p50_ms"] for rr in rounds]
        res["flood"] = {"rounds": rounds, "quiet_p50_ms": float(np.median(q_all)),
                        "flood_p50_ms": float(np.median(f_all)),
                        "p50_increase": float(np.median(f_all) / np.median(q_all) - 1),
                        "p50_increase_per_round": [f / q - 1 for q, f in zip(q_all, f_all,
                                                                             strict=True)]}

        # (c) fd exhaustion attempt
        opened = ctx.Value("i", 0)
        q = ctx.Queue()
        p = ctx.Process(target=_idle_flood, args=(port, args.idle, args.idle_seconds, opened,
                                                  q))
        p.start()
        time.sleep(2.0)
        res["fd_flood"] = _health_series(port, args.idle_seconds - 3.0, fds_of=proc.pid)
        res["fd_flood"]["attacker_sockets_open_mid_run"] = int(opened.value)
        res["fd_flood"]["attacker"] = q.get(timeout=120)
        p.join(30)
        print("fd_flood", res["fd_flood"], flush=True)
        res["limited_counters"] = _limited(port)
        res["health_after"] = _health_series(port, 2.0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lim = HttpLimits(rate_limit_per_s=args.rate_limit, rate_limit_burst=args.rate_burst,
                     rate_limit_delay_s=args.rate_delay)
    payload = {"settings": vars(args), "limits": lim.model_dump(),
               "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
               "results": res,
               "goals": {"health_p50_ms_under_1000_slow": 100.0,
                         "well_behaved_p50_increase_under_flood": 0.20}}
    name = "security_load" + ("" if args.rate_limit == 20.0 else f"_rate{args.rate_limit:g}") \
        + ("" if args.rate_delay == 1.0 else f"_delay{args.rate_delay:g}")
    path = write_result(name, payload)
    s, f, d = res["slowloris"], res["flood"], res["fd_flood"]
    print(markdown_table(
        ["run", "health p50 (ms)", "health p99 (ms)", "failed probes", "notes"],
        [["quiet", res["health_quiet"]["p50_ms"], res["health_quiet"]["p99_ms"],
          res["health_quiet"]["failed"], ""],
         [f"(a) {args.slow} slow connections", s["p50_ms"], s["p99_ms"], s["failed"],
          f"attacker: {s['attacker']}"],
         [f"(c) {args.idle} idle sockets", d["p50_ms"], d["p99_ms"], d["failed"],
          f"server fds max {d.get('server_fds_max')}; attacker: {d['attacker']}"]]))
    print(f"(b) well-behaved guarded predict p50: quiet {f['quiet_p50_ms']:.2f} ms, "
          f"flooded {f['flood_p50_ms']:.2f} ms ({100 * f['p50_increase']:+.1f}%)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
