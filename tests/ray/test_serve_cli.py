"""``bastion serve --engine ray``: options refused in one line before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def _bastion(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    env.pop("BASTION_RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "bastion.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_engine_ray_with_a_sqlite_store_is_one_line_and_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    r = _bastion("serve", "--engine", "ray", "--model", "builtin:digits-cnn",
                 "--reference", "builtin:digits", "--events", f"sqlite:///{db}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "PostgreSQL" in lines[0] and "SQLite cannot be shared" in lines[0]
    assert "Traceback" not in r.stderr
    assert not db.exists()  # nothing was opened or created
    # the default store is SQLite too
    r = _bastion("serve", "--engine", "ray", "--model", "builtin:digits-cnn",
                 "--reference", "builtin:digits", cwd=tmp_path)
    assert r.returncode == 2 and "SQLite cannot be shared" in r.stderr


def test_ray_only_options_without_engine_ray_are_refused(tmp_path: Path) -> None:
    r = _bastion("serve", "--replicas", "3", "--model", "builtin:digits-cnn",
                 "--reference", "builtin:digits", cwd=tmp_path)
    assert r.returncode == 1
    assert "--replicas and --ray-address need --engine ray" in r.stderr
    r = _bastion("serve", "--engine", "spark", "--model", "builtin:digits-cnn",
                 "--reference", "builtin:digits", cwd=tmp_path)
    assert r.returncode == 2 and "unknown engine 'spark'" in r.stderr


def test_harden_with_an_unknown_engine_is_one_line(tmp_path: Path) -> None:
    r = _bastion("harden", "--engine", "spark", "--model", "builtin:digits-cnn", "--data",
                 "builtin:digits", "--method", "fast-at", "--out", str(tmp_path / "o"),
                 cwd=tmp_path)
    assert r.returncode == 2 and "unknown engine 'spark'" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "o").exists()
