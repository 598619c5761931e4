"""The same scan, audit and training job on the local engine and on Ray with 1 and 2
single-threaded workers, in one run (issue 18).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/engine_scaling.py [--quick]

Starts its own Ray cluster on free ports in a private temp folder: a head node with one
CPU (Ray, 1 worker), then a second node with one CPU joins (Ray, 2 workers); kills exactly
those processes at the end. Every job runs with one torch thread per process, so "local"
and "Ray, 1 worker" use the same cores (the driver waits while Ray's worker computes).

- scan: Bastion's scan (APGD-CE + Square) of a digits CNN on ``N_SCAN`` test points;
- audit: the streamed data audit (penultimate features of an MLP, spectral signatures and
  kNN label agreement) over ``N_AUDIT`` rows of MNIST (14x14) in 8 Parquet shards;
- training: the shadow models of the membership-inference audit (``N_SHADOWS`` MLPs).

Writes ``results/engine_scaling.json``; prints a Markdown table. Each job is checked to
give the same result on every engine. The machine is shared: the load average is
recorded beside every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
SHARED = Path(os.environ.get("BASTION_SHARED", ROOT.parent / "shared"))


# ----------------------------------------------------------------------------- cluster

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_ports() -> list[str]:
    import random
    import socket

    for _ in range(200):
        base = random.randrange(20000, 59000)
        try:
            for p in range(base, base + 40):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            break
        except OSError:
            continue
    return ["--node-manager-port", str(_free_port()), "--object-manager-port",
            str(_free_port()), "--min-worker-port", str(base), "--max-worker-port",
            str(base + 39), "--metrics-export-port", str(_free_port()),
            "--dashboard-agent-listen-port", str(_free_port()),
            "--dashboard-agent-grpc-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port())]


class Cluster:
    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="bbench-", dir="/tmp")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        self.ray = str(Path(sys.executable).parent / "ray")
        self.common = ["--num-cpus", "1", "--object-store-memory", str(300 * 1024 * 1024),
                       "--temp-dir", self.temp, "--disable-usage-stats",
                       "--node-ip-address", "127.0.0.1"]

    def start_head(self) -> None:
        subprocess.run([self.ray, "start", "--head", "--port", str(self.port),
                        "--include-dashboard", "false", "--ray-client-server-port",
                        str(_free_port()), *self.common, *_node_ports()],
                       env=self.env, check=True, capture_output=True, timeout=180)

    def add_node(self) -> None:
        subprocess.run([self.ray, "start", "--address", self.address, *self.common,
                        *_node_ports()], env=self.env, check=True, capture_output=True,
                       timeout=180)

    def stop(self) -> None:
        import signal

        for sig, pause in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 0.5)):
            pids = cluster_pids(self.temp)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if pids:
                time.sleep(pause)
        shutil.rmtree(self.temp, ignore_errors=True)


# ----------------------------------------------------------------------------- jobs

def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    return x[idx[:1400]], y[idx[:1400]], x[idx[1400:]], y[idx[1400:]]


def _torch_model(arch, x, y, shape, epochs, name):
    import torch

    from bastion.models.torch_model import TorchModel
    from bastion.models.train import train_classifier
    from bastion.models.zoo import build_module

    torch.manual_seed(0)
    m = TorchModel(build_module(arch, input_shape=shape, n_classes=10), n_classes=10,
                   input_shape=shape, bounds=(0.0, 1.0), name=name)
    train_classifier(m, x, y, epochs=epochs, lr=3e-3, seed=0)
    return m


def make_jobs(quick: bool, tmp: Path, scale: int = 1, scan_model: str = "digits") -> dict:
    import pandas as pd

    n_scan = 120 if quick else 400  # (the digits test split has 397 points)
    apgd_steps, square_queries = 50 * scale, 300 * scale
    n_audit = min((8000 if quick else 30000) * scale, 60000)
    n_shadows = 4
    shadow_epochs = 15 * scale
    x_tr, y_tr, x_te, y_te = _digits()
    cnn = _torch_model("cnn", x_tr, y_tr, (1, 8, 8), 4, "digits-cnn")

    npz = SHARED / "datasets" / "mnist" / "mnist.npz"
    if not npz.exists():
        raise SystemExit(f"MNIST not found at {npz}; set BASTION_SHARED")
    mn = np.load(npz)
    scan_eps = [0.05, 0.1]
    if scan_model == "wong-cnn":  # a model whose forward pass outweighs the per-step overhead
        xm = mn["x_train"][:6000].astype(np.float32)[:, None] / 255.0
        cnn = _torch_model("wong-cnn", xm, mn["y_train"][:6000].astype(np.int64), (1, 28, 28),
                           1, "mnist-wong-cnn")
        x_te = mn["x_test"][:n_scan].astype(np.float32)[:, None] / 255.0
        y_te = mn["y_test"][:n_scan].astype(np.int64)
    xa = mn["x_train"][:n_audit].astype(np.float32) / 255.0
    xa = xa.reshape(-1, 14, 2, 14, 2).mean((2, 4)).reshape(len(xa), -1)  # 14x14 = 196
    ya = mn["y_train"][:n_audit].astype(np.int64).copy()
    flip = np.arange(0, n_audit, 50)  # 2% label noise to find
    ya[flip] = (ya[flip] + 1) % 10
    mlp = _torch_model("mlp", xa[:5000], ya[:5000], (196,), 3, "mnist14-mlp")
    shards = tmp / "audit"
    shards.mkdir()
    for i, part in enumerate(np.array_split(np.arange(n_audit), 8)):
        df = pd.DataFrame(xa[part], columns=[f"p{j}" for j in range(196)])
        df["label"] = ya[part]
        df.to_parquet(shards / f"part-{i:02d}.parquet", index=False)

    xsf = xa[600:3600]
    target = _torch_model("mlp", xa[:600], ya[:600], (196,), 8, "target-mlp")

    def scan_job(engine):
        from bastion.evaluate import scan

        r = scan(cnn, x_te[:n_scan], y_te[:n_scan], norm="linf", epsilons=scan_eps,
                 attacks=["apgd-ce", "square"], seed=0, sanity_checks=False,
                 attack_options={"apgd-ce": {"steps": apgd_steps},
                                 "square": {"max_queries": square_queries}},
                 engine=engine)
        return {"robust_accuracy": r.robust_accuracy, "first": r.first_broken_by}

    def audit_job(engine):
        from bastion.audit.stream import audit_data_stream

        r, _, s = audit_data_stream(shards, mlp, engine=engine, batch_size=1000)
        return {"n_flagged": r.n_flagged, "knn": s["knn"].round(6).tolist()}

    def train_job(engine):
        from bastion.attacks.privacy import ShadowModelAttack

        r = ShadowModelAttack(n_shadows=n_shadows, epochs=shadow_epochs, seed=0).run(
            target, xa[:200], ya[:200], xsf[:200], ya[600:800], x_pop=xsf,
            y_pop=ya[600:3600], engine=engine)
        return {"auc": round(float(r.auc), 9)}

    return {"scan": (scan_job, f"{cnn.name}: {min(n_scan, len(x_te))} points, APGD-CE "
                                f"({apgd_steps} steps) "
                                f"+ Square ({square_queries} queries), 2 epsilons"),
            "audit": (audit_job, f"{n_audit} rows x 196 features in 8 Parquet shards, MLP "
                                 "features + spectral + kNN (k=10)"),
            "training": (train_job, f"{n_shadows} shadow MLPs ({shadow_epochs} epochs on "
                                    "1500 rows each)")}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def cluster_cpu(marker: str | None) -> float:
    """CPU seconds (user + system) used so far by every process whose command line names
    ``marker`` (the cluster's temp folder: raylets, GCS, workers)."""
    if not marker:
        return 0.0
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in cluster_pids(marker):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return total


def cluster_pids(marker: str) -> set[int]:
    """Processes naming ``marker`` on their command line (raylet, GCS, agents) and all
    their descendants (Ray's workers rename themselves to ``ray::...``)."""
    parent: dict[int, int] = {}
    roots: set[int] = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            parent[int(d.name)] = int(fields[1])
            if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                roots.add(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    out, changed = set(roots), True
    while changed:
        changed = False
        for pid, pp in parent.items():
            if pp in out and pid not in out:
                out.add(pid)
                changed = True
    return out


def timed(fn, engine, repeats: int, marker: str | None = None):
    """Best wall time of ``repeats`` runs, and the CPU seconds (this process plus the
    cluster's processes) of the cheapest run: CPU time hardly depends on the machine's
    load, wall time does."""
    best, cpu, out, loads = float("inf"), float("inf"), None, []
    for _ in range(repeats):
        loads.append(load())
        c0 = time.process_time() + cluster_cpu(marker)
        t0 = time.perf_counter()
        out = fn(engine)
        best = min(best, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() + cluster_cpu(marker) - c0)
        loads.append(load())
    return best, out, loads, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller jobs (a smoke run)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N runs per cell")
    ap.add_argument("--scale", type=int, default=1,
                    help="multiply the scan's attack steps and queries, the audit's rows (at "
                    "most 60,000) and the shadow epochs: larger jobs show the speed-up past "
                    "Ray's fixed costs")
    ap.add_argument("--scan-model", choices=["digits", "wong-cnn"], default="digits",
                    help="the scan's model: the 8x8 digits CNN (default) or Wong et al.'s "
                    "MNIST CNN (28x28, trained one epoch on 6,000 images)")
    ap.add_argument("--out", default=None, help="results file (default "
                    "results/engine_scaling.json)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from bastion.engine import get_engine

    tmp = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    jobs = make_jobs(args.quick, tmp, max(1, args.scale), args.scan_model)
    rows: dict[str, dict] = {name: {"what": what} for name, (_, what) in jobs.items()}
    results: dict[str, dict] = {name: {} for name in jobs}

    local = get_engine("local")
    for name, (fn, _) in jobs.items():
        fn(local)  # warm-up (imports, caches)
        t, out, loads, cpu = timed(fn, local, args.repeats)
        rows[name]["local_s"], rows[name]["local_load"] = round(t, 3), loads
        rows[name]["local_cpu_s"] = round(cpu, 3)
        results[name]["local"] = out
        print(f"{name}: local {t:.2f}s", flush=True)

    cluster = Cluster()
    try:
        cluster.start_head()
        eng = get_engine("ray", cluster.address)
        for n_workers in (1, 2):
            if n_workers == 2:
                cluster.add_node()
                import ray

                deadline = time.time() + 120
                while ray.cluster_resources().get("CPU", 0) < 2 and time.time() < deadline:
                    time.sleep(0.5)
            assert eng.workers == n_workers, eng.workers
            for name, (fn, _) in jobs.items():
                fn(eng)  # warm-up: worker processes start, imports, the object store
                t, out, loads, cpu = timed(fn, eng, args.repeats, cluster.temp)
                rows[name][f"ray{n_workers}_s"] = round(t, 3)
                rows[name][f"ray{n_workers}_cpu_s"] = round(cpu, 3)
                rows[name][f"ray{n_workers}_load"] = loads
                results[name][f"ray{n_workers}"] = out
                print(f"{name}: ray x{n_workers} {t:.2f}s", flush=True)
    finally:
        try:
            import ray

            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    for name, r in rows.items():
        r["same_result_on_every_engine"] = (results[name]["local"] == results[name]["ray1"]
                                            == results[name]["ray2"])
        r["ray_overhead_pct"] = round(100 * (r["ray1_s"] / r["local_s"] - 1), 1)
        r["speedup_1_to_2"] = round(r["ray1_s"] / r["ray2_s"], 2)
        # CPU seconds spent by Ray (driver + cluster) per CPU second of the local run
        r["ray_cpu_overhead_pct"] = round(100 * (r["ray1_cpu_s"] / r["local_cpu_s"] - 1), 1)
        r["ray2_cpu_overhead_pct"] = round(100 * (r["ray2_cpu_s"] / r["local_cpu_s"] - 1), 1)
    payload = {
        "benchmark": "engine_scaling",
        "command": "OMP_NUM_THREADS=1 python benchmarks/engine_scaling.py"
                   + (" --quick" if args.quick else "")
                   + (f" --scale {args.scale}" if args.scale > 1 else "")
                   + (f" --scan-model {args.scan_model}" if args.scan_model != "digits" else ""),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "note": "the 1-minute load average of each cell is in its row"},
        "repeats": args.repeats,
        "goals": {"ray_overhead_pct_max": 10, "speedup_min_scan_audit": 1.7},
        "jobs": rows,
    }
    out = Path(args.out) if args.out else HERE / "results" / "engine_scaling.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print("\n| job | local (s) | Ray, 1 worker (s) | Ray, 2 workers (s) | overhead | "
          "speed-up 1→2 | CPU s local / Ray 1 / Ray 2 | CPU overhead 1 / 2 | same result | "
          "load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        lo = [x for k in ("local_load", "ray1_load", "ray2_load") for x in r[k]]
        print(f"| {name} | {r['local_s']:.2f} | {r['ray1_s']:.2f} | {r['ray2_s']:.2f} | "
              f"{r['ray_overhead_pct']:+.1f}% | {r['speedup_1_to_2']:.2f}x | "
              f"{r['local_cpu_s']:.1f} / {r['ray1_cpu_s']:.1f} / {r['ray2_cpu_s']:.1f} | "
              f"{r['ray_cpu_overhead_pct']:+.1f}% / {r['ray2_cpu_overhead_pct']:+.1f}% | "
              f"{r['same_result_on_every_engine']} | {min(lo):.1f}-{max(lo):.1f} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
