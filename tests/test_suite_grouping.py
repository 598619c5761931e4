"""The suite's own set-up: ``--dist loadgroup`` (test.sh) must keep an ``xdist_group`` on
one worker. The Ray tests rely on it (one local cluster at a time) and so do the browser
tests (one tab, in order); pytest 9 broke it silently (issue: pytest < 9 in ``dev``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xdist")

GROUPED = '''
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.skipif(False, reason="a second mark, as the browser tests have"),
              pytest.mark.xdist_group("one")]


@pytest.mark.parametrize("i", range(8))
def test_where(i):
    out = Path(os.environ["GROUPING_OUT"])
    with out.open("a") as fh:
        fh.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
'''


def test_an_xdist_group_runs_on_one_worker(tmp_path: Path) -> None:
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    out = tmp_path / "workers.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "GROUPING_OUT": str(out)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    workers = out.read_text().split()
    assert len(workers) == 8
    assert len(set(workers)) == 1, f"one group ran on several workers: {sorted(set(workers))}"
