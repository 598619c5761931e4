"""Event store micro-benchmark: durable appends per second from 1, 8 and 32 threads.

Each thread appends single prediction-like events (``EventStore.append``, the call the
guarded ``/v1/predict`` makes per request) in a loop for ``--seconds``. Two ways of
committing are compared in the same run:

- ``grouped``: the store as shipped; concurrent callers share a transaction and its fsync
  (group commit).
- ``serial``: every call commits alone (a lock around ``append_many``), which is how the
  store worked before group commit: one transaction and one fsync per call.

for ``durability="full"`` (the default: ``synchronous=FULL``, survives power loss) and
``"normal"`` (``synchronous=NORMAL``: survives a process crash only). The SQLite file is
in a fresh temp folder (``--dir``, default the system temp folder; on this machine the same
ext4 disk as the repository). With ``--postgres`` the same runs go against a throw-away
local PostgreSQL server (the ``pgserver`` package, Unix socket).

Every configuration runs ``--rounds`` times, the rounds interleaved (the shared disk's fsync
time swings between about 0.4 and 4 ms from one second to the next); the medians are kept.
Writes ``benchmarks/results/events_store.json``: per configuration, the median appends/s,
p50/p99 latency of one append and mean group size (appends per commit), plus each
round's appends/s. Every run checks that all acknowledged appends are in the store.

    .venv/bin/python benchmarks/events_store.py [--seconds 3] [--rounds 3] [--threads 1,8,32]
        [--postgres]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bastion.store import events as ev  # noqa: E402
from bastion.store.events import EventStore  # noqa: E402

PAYLOAD = {  # about the size of a guarded prediction's event
    "label": 7, "probs": [0.01, 0.0, 0.02, 0.0, 0.01, 0.0, 0.0, 0.93, 0.01, 0.02],
    "verdict": "allow", "reasons": [], "scores": {"ood": 0.12, "input": 0.03},
    "model": "mnist-cnn", "latency_ms": 3.1,
}


class SerialStore(EventStore):
    """Every call commits alone: the store's behaviour before group commit."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self._serial = threading.Lock()

    def append_many(self, events):  # type: ignore[no-untyped-def]
        with self._serial:
            return super().append_many(events)


def run_one(url: str, *, mode: str, durability: str, threads: int,
            seconds: float) -> dict[str, Any]:
    cls = SerialStore if mode == "serial" else EventStore
    store = cls(url, durability=durability)
    commits = [0]
    commit = store._commit_rows

    def counting(group):  # type: ignore[no-untyped-def]
        commits[0] += 1
        return commit(group)

    store._commit_rows = counting  # type: ignore[method-assign]
    lat: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def work(t: int) -> None:
        start.wait()
        mine = lat[t]
        i = 0
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at[0]:
                break
            store.append(ev.PREDICTION, PAYLOAD, client_id=f"c{t}", request_id=f"{t}-{i}",
                         model_version="3")
            mine.append(time.perf_counter() - t0)
            i += 1

    ths = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    t_begin = time.perf_counter()
    stop_at[0] = t_begin + seconds
    start.wait()
    for th in ths:
        th.join()
    wall = time.perf_counter() - t_begin
    all_lat = np.array([x for xs in lat for x in xs]) * 1000
    n = int(all_lat.size)
    stored = store.count()
    store.close()
    assert stored == n, (stored, n)  # every acknowledged append is in the store
    return {"appends": n, "wall_s": round(wall, 3), "appends_per_s": round(n / wall, 1),
            "p50_ms": round(float(np.percentile(all_lat, 50)), 3),
            "p99_ms": round(float(np.percentile(all_lat, 99)), 3),
            "commits": commits[0], "commits_per_s": round(commits[0] / wall, 1),
            "mean_group": round(n / max(commits[0], 1), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per configuration")
    ap.add_argument("--threads", default="1,8,32")
    ap.add_argument("--durability", default="full,normal")
    ap.add_argument("--modes", default="serial,grouped")
    ap.add_argument("--dir", default=None, help="folder for the SQLite files")
    ap.add_argument("--postgres", action="store_true",
                    help="also run against a throw-away local PostgreSQL (pgserver)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats; medians")
    ap.add_argument("--out", default="events_store")
    args = ap.parse_args()
    threads = [int(x) for x in args.threads.split(",")]
    durabilities = args.durability.split(",")
    modes = args.modes.split(",")

    backends: list[tuple[str, Any]] = []
    tmp = tempfile.TemporaryDirectory(prefix="bastion-evbench-", dir=args.dir)
    counter = [0]

    def sqlite_url() -> str:
        counter[0] += 1
        return f"sqlite:///{Path(tmp.name) / f'e{counter[0]}.db'}"

    backends.append(("sqlite", sqlite_url))
    server = None
    if args.postgres:
        import pgserver
        import psycopg

        server = pgserver.get_server(Path(tmp.name) / "pg", cleanup_mode="delete")

        def pg_url() -> str:
            counter[0] += 1
            name = f"bench{counter[0]}"
            with psycopg.connect(server.get_uri(), autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {name}")
            return server.get_uri(name)

        backends.append(("postgresql", pg_url))

    runs: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    try:
        for rnd in range(args.rounds):  # rounds interleave the configurations (disk noise)
            for backend, make_url in backends:
                for durability in durabilities:
                    for mode in modes:
                        for n in threads:
                            r = run_one(make_url(), mode=mode, durability=durability,
                                        threads=n, seconds=args.seconds)
                            runs.setdefault((backend, durability, mode, n), []).append(r)
                            print(f"round {rnd + 1} {backend:10s} {durability:6s} {mode:7s} "
                                  f"{n:2d} threads: {r['appends_per_s']:8.1f} appends/s  "
                                  f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                                  f"mean group {r['mean_group']}", flush=True)
    finally:
        if server is not None:
            server.cleanup()
        tmp.cleanup()

    results: dict[str, Any] = {}
    print("\nmedians over rounds:")
    for (backend, durability, mode, n), rs in runs.items():
        med = {k: round(float(np.median([r[k] for r in rs])), 3)
               for k in ("appends_per_s", "p50_ms", "p99_ms", "mean_group")}
        med["appends_per_s_rounds"] = [r["appends_per_s"] for r in rs]
        med["appends"] = sum(r["appends"] for r in rs)
        results.setdefault(backend, {}).setdefault(durability, {}).setdefault(mode, {})[
            str(n)] = med
        print(f"{backend:10s} {durability:6s} {mode:7s} {n:2d} threads: "
              f"{med['appends_per_s']:8.1f} appends/s  p50 {med['p50_ms']:.2f} ms  "
              f"p99 {med['p99_ms']:.2f} ms  mean group {med['mean_group']}")

    from common import write_result

    path = write_result(args.out, {
        "settings": {"seconds": args.seconds, "rounds": args.rounds, "threads": threads,
                     "durability": durabilities, "modes": modes, "postgres": bool(args.postgres),
                     "dir": args.dir or tempfile.gettempdir()},
        "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
