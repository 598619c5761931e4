"""``bastion redteam`` against a dead or failing target: exit 1, one line naming the cause,
attempts kept (issue 15, section 5)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redteam(target: str, model: str, out) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bastion.cli", "redteam", "--target", target, "--model", model,
         "--out", str(out), "--probes", "jailbreak", "--limit", "3", "--retries", "1",
         "--timeout", "5", "--no-track"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})


def test_dead_target_is_an_error_naming_the_cause(tmp_path):
    port = free_port()  # nothing listens there
    p = _redteam(f"http://127.0.0.1:{port}/v1", "any", tmp_path / "rt")
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "answered none of 3 probes: cannot connect" in lines[0]
    assert "check that the target is running" in lines[0] and "Traceback" not in p.stderr
    assert "n/a" not in p.stderr
    rows = [json.loads(x) for x in (tmp_path / "rt" / "attempts.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {r["error_kind"] for r in rows} == {"connect"}


def test_all_5xx_target_is_an_error_naming_the_cause(vuln_server, tmp_path):
    p = _redteam(vuln_server.base_url, "error-500", tmp_path / "rt")
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "server errors" in lines[0] and "HTTP 500" in lines[0] and "http_5xx: 3" in lines[0]
