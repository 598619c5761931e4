"""``--timeout``: a job that does not finish in time is stopped, cleanly.

The hang case is a TorchScript model whose forward pass loops forever in C++ (no
Python signal can interrupt it): the job runs in a child process that is killed at the
deadline, exit code 1, one line on stderr, and no report written as if complete.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bastion.errors import DataError
from bastion.jobs import JobTimeout, run_with_deadline


class _Forever(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.reshape(x.shape[0], -1)[:, :10]
        i = 0
        while i >= 0:  # never ends
            i += 1
            y = y * 1.0
        return y


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    return lines[0]


def _bastion(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "bastion.cli", *args], cwd=cwd,
                       capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return r, time.monotonic() - t0


def test_scan_of_a_model_that_never_answers_stops_at_the_timeout(tmp_path: Path) -> None:
    f = tmp_path / "forever.pt"
    torch.jit.save(torch.jit.script(_Forever()), str(f))
    out = tmp_path / "report"
    r, took = _bastion("scan", "--model", str(f), "--data", "builtin:digits", "--out",
                       str(out), "--no-track", "--timeout", "4", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    line = _one_line(r.stderr)
    assert "scan stopped at the --timeout of 4 s" in line and "--timeout" in line
    assert not out.exists()  # nothing written as if complete
    assert took < 60


def test_train_stops_and_removes_its_partial_folder(tmp_path: Path) -> None:
    out = tmp_path / "model"
    r, _ = _bastion("train", "--model", "cnn", "--data", "builtin:digits", "--epochs", "500",
                    "--out", str(out), "--no-track", "--timeout", "3", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    line = _one_line(r.stderr)
    assert "train stopped at the --timeout of 3 s" in line
    assert not out.exists()
    assert not list(tmp_path.glob(".model.tmp-*"))


def _boom() -> None:
    raise DataError("bad rows", hint="fix them")


def test_run_with_deadline_returns_results_and_errors() -> None:
    assert run_with_deadline(lambda: {"a": [1, 2]}, timeout=30, what="t") == {"a": [1, 2]}
    with pytest.raises(DataError, match="bad rows") as e:
        run_with_deadline(_boom, timeout=30, what="t")
    assert e.value.hint == "fix them"
    with pytest.raises(Exception, match="positive"):
        run_with_deadline(lambda: 1, timeout=-1, what="t")
    assert run_with_deadline(lambda: 7, timeout=None, what="t") == 7


def test_an_existing_output_folder_keeps_old_files_loses_debris(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def slow() -> None:
        (out / ".report.json.abc.tmp").write_text("half")
        time.sleep(60)

    t0 = time.monotonic()
    with pytest.raises(JobTimeout, match="job stopped at the --timeout of 0.5 s"):
        run_with_deadline(slow, timeout=0.5, what="job", out_dir=out)
    assert time.monotonic() - t0 < 15
    assert (out / "keep.txt").read_text() == "mine"
    assert not (out / ".report.json.abc.tmp").exists()


def test_long_commands_take_timeout() -> None:
    from bastion.cli.main import app

    for cmd in (["scan"], ["train"], ["harden"], ["audit", "data"], ["audit", "backdoor"],
                ["audit", "extraction"], ["audit", "privacy"]):
        r = CliRunner().invoke(app, [*cmd, "--help"], terminal_width=200)
        assert r.exit_code == 0 and "--timeout" in r.output, cmd
