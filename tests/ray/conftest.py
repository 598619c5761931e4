"""A real two-node Ray cluster for the engine tests, started once per test session.

``ray start --head`` plus a second node joining it (``ray start --address``), one CPU
each, a small object store, every port free (never Ray's defaults: other people may run
clusters on this machine) and a dedicated ``--temp-dir``. Teardown kills exactly the
processes whose command line names that folder: never ``ray stop``, which would stop every
Ray cluster of the user.

Every Ray test module sets ``pytestmark = pytest.mark.xdist_group("ray")`` and the suite
runs with ``--dist loadgroup``, so one xdist worker runs them all and starts one cluster.
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
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray")

SRC = Path(__file__).resolve().parents[2] / "src"


# Ray >= 2.5x turns token authentication on for a cluster whenever ~/.ray/auth_token exists
# (and a local ray.init() writes that file), while a client without the token is refused
# ("InvalidAuthToken"): a token left in the home folder by any earlier Ray run broke every
# test cluster here. The test clusters live on 127.0.0.1 and die with the test, so their
# mode is set explicitly for the driver and every process started from this environment.
os.environ["RAY_AUTH_MODE"] = "disabled"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_range(width: int = 40) -> int:
    """The start of ``width`` consecutive free ports (worker ports of one node)."""
    import random

    rnd = random.Random()
    for _ in range(200):
        base = rnd.randrange(20000, 60000 - width)
        ok = True
        for p in range(base, base + width):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range for the Ray workers")


def _node_ports() -> list[str]:
    base = _free_range()
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--min-worker-port", str(base), "--max-worker-port", str(base + 39),
            "--metrics-export-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port())]


def _own_pids(marker: str) -> list[int]:
    """Processes naming ``marker`` on their command line (raylet, GCS, agents) and their
    descendants (Ray's workers rename themselves to ``ray::...``)."""
    parent: dict[int, int] = {}
    roots: set[int] = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if marker in cmd:
            roots.add(int(d.name))
    out, changed = set(roots), True
    while changed:
        changed = False
        for pid, pp in parent.items():
            if pp in out and pid not in out and pid != os.getpid():
                out.add(pid)
                changed = True
    return sorted(out)


def kill_cluster(temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, every process whose command line names ``temp_dir``, and
    their descendants."""
    for sig, pause in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 0.5)):
        pids = _own_pids(temp_dir)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(pause)


class Cluster:
    def __init__(self, address: str, temp_dir: str, env: dict[str, str]) -> None:
        self.address, self.temp_dir, self.env = address, temp_dir, env


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Cluster]:
    ray_bin = str(Path(sys.executable).parent / "ray")
    # short: Ray's unix socket paths must stay under ~107 characters
    temp_dir = tempfile.mkdtemp(prefix="bray-", dir="/tmp")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(
               os.pathsep)}
    env.pop("BASTION_RAY_ADDRESS", None)
    port = free_port()
    common = ["--num-cpus", "1", "--object-store-memory", str(100 * 1024 * 1024),
              "--temp-dir", temp_dir, "--disable-usage-stats"]
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1",
                        "--port", str(port), "--include-dashboard", "false",
                        "--ray-client-server-port", str(free_port()), *common,
                        *_node_ports()],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([ray_bin, "start", "--address", address, "--node-ip-address",
                        "127.0.0.1", *common, *_node_ports()],
                       env=env, check=True, capture_output=True, timeout=120)
    except subprocess.CalledProcessError as exc:
        kill_cluster(temp_dir)
        pytest.fail(f"ray start failed: {exc.stderr.decode(errors='replace')[-2000:]}")
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # the driver too (this test process)
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    deadline = time.time() + 60
    while ray.cluster_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    try:
        yield Cluster(address, temp_dir, env)
    finally:
        ray.shutdown()
        kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
