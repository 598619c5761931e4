"""Red team on the Ray engine: probes spread over actors under one global rate limit,
one attempts.jsonl written by the driver, the same outcomes as a local run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("ray")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "llm"))
from vulnerable_server import VulnerableServer  # noqa: E402


def _outcomes(folder: Path) -> dict[str, str]:
    rows = [json.loads(x) for x in (folder / "attempts.jsonl").read_text().splitlines()]
    return {r["probe_id"]: r["outcome"] for r in rows}


def test_redteam_on_ray_equals_local(ray_cluster, tmp_path, monkeypatch) -> None:
    from bastion.engine import get_engine
    from bastion.llm.probes import load_probes
    from bastion.llm.redteam import run_redteam

    monkeypatch.setenv("BASTION_TEST_KEY", "sk-very-secret-key-123")
    probes = load_probes(limit_per_family=3, per_transform=1, seed=1)
    eng = get_engine("ray", ray_cluster.address)
    with VulnerableServer() as srv:
        kw = dict(target=srv.base_url, model="vuln-agent", api_key_env="BASTION_TEST_KEY",
                  concurrency=4, seed=3)
        local = run_redteam(probes, out_dir=tmp_path / "local", **kw)
        t0 = time.perf_counter()
        on_ray = run_redteam(probes, out_dir=tmp_path / "ray", engine=eng, rate_limit=25.0,
                             **kw)
        took = time.perf_counter() - t0
        sent = len(srv.requests)
        # resumable: a rerun on Ray sends nothing, everything is in attempts.jsonl
        again = run_redteam(probes, out_dir=tmp_path / "ray", engine=eng, **kw)
        assert len(srv.requests) == sent and again.resumed_from_previous == len(probes)
    n = len(probes)
    assert n >= 10 and on_ray.overall.attempts == n and on_ray.overall.errors == 0
    assert _outcomes(tmp_path / "local") == _outcomes(tmp_path / "ray")
    assert on_ray.overall == local.overall and on_ray.by_family == local.by_family
    # one global limit for both actors: n requests at 25/s take at least (n - 1) / 25 s
    assert took >= (n - 1) / 25.0
    for f in ("attempts.jsonl", "report.json", "report.html"):
        assert "sk-very-secret" not in (tmp_path / "ray" / f).read_text()
