"""scripts/bootstrap.sh: one install serves demo.sh and test.sh (issue 15, section 5).

Runs the real script in a scratch copy of the repository with
``BASTION_BOOTSTRAP_DRY_RUN=1`` (prints the pip commands instead of running them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def sandbox(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy2(REPO / "scripts" / "bootstrap.sh", tmp_path / "scripts" / "bootstrap.sh")
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / ".venv" / "bin" / "python")
    return tmp_path


def _boot(root: Path, extras: str) -> list[str]:
    p = subprocess.run(["bash", str(root / "scripts" / "bootstrap.sh"), extras],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "BASTION_BOOTSTRAP_DRY_RUN": "1",
                            "PYTHON": sys.executable})
    assert p.returncode == 0, p.stderr
    return [x for x in p.stdout.splitlines() if x.startswith("would run:")]


def test_demo_and_test_share_one_install(sandbox):
    stamp = sandbox / ".venv" / ".bastion-install-stamp"
    first = _boot(sandbox, "")  # demo.sh on a fresh clone
    assert len(first) == 2 and first[-1].endswith("-e .")
    second = _boot(sandbox, "dev,llm")  # test.sh: installs its extras
    assert second and second[-1].endswith("-e .[dev,llm]")
    assert stamp.read_text().strip().endswith("extras=[dev,llm]")
    # switching back and forth installs nothing more
    for extras in ("", "dev,llm", "llm", "llm,dev", " dev ", ""):
        assert _boot(sandbox, extras) == [], extras
    # a new extra adds to what is there, never drops it
    assert _boot(sandbox, "service")[-1].endswith("-e .[dev,llm,service]")
    assert _boot(sandbox, "dev") == []


def test_changed_pyproject_reinstalls_keeping_the_extras(sandbox):
    _boot(sandbox, "dev,llm")
    with open(sandbox / "pyproject.toml", "a") as fh:
        fh.write("\n# changed\n")
    again = _boot(sandbox, "")
    assert again and again[-1].endswith("-e .[dev,llm]")
    assert _boot(sandbox, "dev") == []


def test_old_stamp_format_is_understood(sandbox):
    stamp = sandbox / ".venv" / ".bastion-install-stamp"
    _boot(sandbox, "")
    digest = stamp.read_text().split()[0]
    stamp.write_text(f"{digest} extras=[dev,llm]\n")  # as the old script wrote it
    assert _boot(sandbox, "llm") == [] and _boot(sandbox, "") == []


def test_onnx_extra_installs_onnx2torch_without_its_dependencies(sandbox):
    cmds = _boot(sandbox, "dev,onnx")
    assert any("--no-deps onnx2torch==" in c for c in cmds), cmds
    assert cmds[-1].endswith("-e .[dev,onnx]")
    assert _boot(sandbox, "onnx") == []
