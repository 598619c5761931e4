"""A real, throw-away local Ray cluster for the serving and training tests.

``ray start --head --block`` in a process group of its own, on free ports (never Ray's
defaults: other clusters may run on this machine), with a dedicated ``--temp-dir``, few
CPUs and a small object store; torn down by killing that process group only (``ray stop``
would stop every Ray process on the machine). Until the engine's shared fixture lands,
the tests in this folder import :func:`start_cluster` from here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback now (bound and released together)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class Cluster:
    address: str
    temp_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        """Kill the cluster's own process group (raylet, GCS, workers started by them)
        and delete its temp dir."""
        try:
            self._kill()
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _kill(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                continue
            # workers may outlive the head process briefly; the group is ours alone
            time.sleep(0.5)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return


def start_cluster(*, num_cpus: int = 2, object_store_mb: int = 100,
                  src: Path | None = None, attempts: int = 3) -> Cluster:
    """Start a head node; return when it is up. ``src`` goes first on the workers'
    PYTHONPATH (the worktree's code, not the installed package). A port taken between
    choosing it and binding it (other clusters start on this machine too) means another
    attempt on other ports."""
    for i in range(attempts):
        try:
            return _start(num_cpus=num_cpus, object_store_mb=object_store_mb, src=src)
        except RuntimeError:
            if i == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _start(*, num_cpus: int, object_store_mb: int, src: Path | None) -> Cluster:
    tmp = Path(tempfile.mkdtemp(prefix="bray-", dir="/tmp"))  # short: socket paths
    (gcs, nm, om, client, dash_l, dash_g, rt_env, metrics) = free_ports(8)
    lo = free_ports(1)[0]
    # a small range of worker ports just above a free one (checked free when bound)
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(src)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update({"OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_DISABLE_DOCKER_CPU_WARNING": "1", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"})
    log = tmp / "ray-start.log"
    cmd = [RAY, "start", "--head", "--block", f"--port={gcs}", f"--node-manager-port={nm}",
           f"--object-manager-port={om}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={dash_l}", f"--dashboard-agent-grpc-port={dash_g}",
           f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
           f"--min-worker-port={lo}", f"--max-worker-port={min(lo + 200, 65535)}",
           "--include-dashboard=false", f"--num-cpus={num_cpus}",
           f"--object-store-memory={object_store_mb * 1024 * 1024}",
           f"--temp-dir={tmp}", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    address = f"127.0.0.1:{gcs}"
    cluster = Cluster(address=address, temp_dir=tmp, proc=proc, log=log, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text(errors="replace")[-3000:]  # stop() removes the folder
            cluster.stop()  # whatever it started before failing
            raise RuntimeError(f"ray start failed:\n{text}")
        if "Ray runtime started" in log.read_text(errors="replace"):
            return cluster
        time.sleep(0.3)
    text = log.read_text(errors="replace")[-3000:]
    cluster.stop()
    raise RuntimeError(f"ray start did not come up in time:\n{text}")
