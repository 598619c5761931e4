"""Long commands log progress lines to stderr when it is not a terminal (issue 15, §5)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

LINE = re.compile(r"^\[\s*\d+\.\ds\] ")


def _bastion(*args: str, cwd) -> subprocess.CompletedProcess[str]:
    # stderr is a pipe here: not a terminal
    return subprocess.run([sys.executable, "-m", "bastion.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_train_prints_epoch_lines_to_a_pipe(tmp_path):
    p = _bastion("train", "--model", "cnn", "--data", "builtin:digits", "--epochs", "1",
                 "--out", "m", "--no-track", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = [x for x in p.stderr.splitlines() if LINE.match(x)]
    assert any("train: epoch 1/1" in x for x in lines), p.stderr
    assert p.stdout == ""  # stdout stays clean
    # a bad option is still one line: no progress line before the error
    bad = _bastion("train", "--model", "cnn", "--data", "builtin:nope", "--out", "m2",
                   "--no-track", cwd=tmp_path)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_audit_stage_lines_and_quiet(tmp_path, capsys):
    from bastion.cli.main import run

    # in-process, stderr is pytest's capture: not a terminal either
    assert run(["audit", "data", "--data", "builtin:digits", "--out", str(tmp_path / "a"),
                "--no-track"]) == 0
    stages = [x for x in capsys.readouterr().err.splitlines() if LINE.match(x)]
    assert [s.split("] ", 1)[1] for s in stages] == [
        "audit data: running confident-learning", "audit data: running knn"]
    assert run(["audit", "data", "--data", "builtin:digits", "--out", str(tmp_path / "b"),
                "--no-track", "--quiet"]) == 0
    assert not [x for x in capsys.readouterr().err.splitlines() if LINE.match(x)]


def test_ticks_are_throttled(capsys, monkeypatch):
    from bastion.cli import _common as c

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    h = c.install_progress_lines([])
    try:
        for i in range(50):
            c.tick(f"train: epoch {i}")
        c.stage("scan: apgd-ce (1/3)")
        c.stage("scan: square (2/3)")
    finally:
        c.remove_progress_lines(h)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "epoch 0" in err[0] and "square" in err[2]
