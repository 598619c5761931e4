"""``--timeout``: a job that does not finish in time is stopped, cleanly.

The hang case is a TorchScript model whose forward pass loops forever in C++ (no
Python signal can interrupt it): the job runs in a child process that is killed at the
deadline, exit code 1, one line on stderr, and no report written as if complete.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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


PROGRESS_LINE = re.compile(r"^\[\s*\d+\.\ds\] ")  # stage lines when stderr is a pipe


def _one_line(stderr: str) -> str:
    """The one error line; progress lines the job logged before it are not errors."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not PROGRESS_LINE.match(ln)]
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


LONG_COMMANDS = [["scan"], ["train"], ["harden"], ["audit", "data"], ["audit", "backdoor"],
                 ["audit", "extraction"], ["audit", "privacy"], ["llm", "train-detector"],
                 ["llm", "evaluate-detector"], ["llm", "harden-detector"], ["demo"]]


def test_long_commands_take_timeout() -> None:
    from bastion.cli.main import app

    for cmd in LONG_COMMANDS:
        r = CliRunner().invoke(app, [*cmd, "--help"], terminal_width=200)
        assert r.exit_code == 0 and "--timeout" in r.output, cmd


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_a_bad_timeout_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    from bastion.cli.main import run

    for cmd in LONG_COMMANDS:
        out = tmp_path / "out"
        # --timeout comes first: it is checked before anything, whatever else is wrong
        data = [] if cmd == ["demo"] else ["--data", "builtin:digits"]
        code = run([*cmd, "--timeout", value, *data, "--out", str(out)])
        line = _one_line(capsys.readouterr().err)
        assert code == 1, (cmd, line)
        assert "--timeout must be a positive number of seconds" in line, (cmd, line)
        assert not out.exists(), cmd


# --- harden and audit stop at their deadline, like scan ------------------------------


@pytest.fixture(scope="module")
def forever_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("forever") / "forever.pt"
    torch.jit.save(torch.jit.script(_Forever()), str(f))
    return f


@pytest.mark.parametrize("cmd", [
    ["harden", "--method", "squeeze"],
    ["audit", "backdoor"],
    ["audit", "extraction", "--budget", "50"],
])
def test_harden_and_audit_stop_at_the_timeout(
    tmp_path: Path, forever_model: Path, cmd: list[str]
) -> None:
    out = tmp_path / "report"
    r, took = _bastion(*cmd, "--model", str(forever_model), "--data", "builtin:digits",
                       "--out", str(out), "--no-track", "--timeout", "3", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    line = _one_line(r.stderr)
    what = " ".join(cmd[:2]) if cmd[0] == "audit" else "harden"
    assert f"{what} stopped at the --timeout of 3 s" in line, line
    assert not out.exists()  # no report left as if complete, no empty folder either
    assert not list(tmp_path.glob(".report*"))
    assert took < 60


def test_audit_into_an_existing_folder_keeps_its_files_and_writes_no_report(
    tmp_path: Path, forever_model: Path
) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r, _ = _bastion("audit", "backdoor", "--model", str(forever_model), "--data",
                    "builtin:digits", "--out", str(out), "--no-track", "--timeout", "3",
                    cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "no report of this run was written" in _one_line(r.stderr)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# --- the MLflow run of a killed job is ended, not left RUNNING ------------------------


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real SQLite store, created here before the jobs fork (with no pooled connection
    carried into a child)."""
    from bastion.registry.tracking import track_run

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
        mp.chdir(folder)  # artifacts of a SQLite store go under ./mlartifacts
        with track_run("warm-up", tracking_uri=uri):
            pass
        yield uri


def _runs(uri: str) -> dict[str, object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_name: r for r in client.search_runs(exps)}


def _tracked(uri: str, name: str, then: Callable[[], None]) -> Callable[[], None]:
    def job() -> None:
        from bastion.registry.tracking import track_run

        with track_run(name, tracking_uri=uri):
            then()
    return job


def test_a_job_killed_at_its_deadline_ends_its_run_as_killed(mlflow_store: str) -> None:
    with pytest.raises(JobTimeout):
        run_with_deadline(_tracked(mlflow_store, "slow-job", lambda: time.sleep(120)),
                          timeout=4, what="slow job")
    run = _runs(mlflow_store)["slow-job"]
    assert run.info.status == "KILLED"  # type: ignore[attr-defined]
    assert run.data.tags["bastion.stopped"] == "timeout"  # type: ignore[attr-defined]
    assert run.info.end_time is not None  # type: ignore[attr-defined]
    assert _runs(mlflow_store)["warm-up"].info.status == "FINISHED"  # type: ignore[attr-defined]


def test_a_job_that_dies_ends_its_run_as_failed(mlflow_store: str) -> None:
    with pytest.raises(Exception, match="ended unexpectedly"):
        run_with_deadline(_tracked(mlflow_store, "dying-job", lambda: os._exit(3)),
                          timeout=60, what="dying job")
    run = _runs(mlflow_store)["dying-job"]
    assert run.info.status == "FAILED"  # type: ignore[attr-defined]
    assert run.data.tags["bastion.stopped"] == "died"  # type: ignore[attr-defined]


def test_a_finished_run_is_left_as_it_is(mlflow_store: str) -> None:
    def job() -> None:
        _tracked(mlflow_store, "done-job", lambda: None)()
        time.sleep(120)  # the run is closed; the job goes on and times out

    with pytest.raises(JobTimeout):
        run_with_deadline(job, timeout=4, what="job")
    run = _runs(mlflow_store)["done-job"]
    assert run.info.status == "FINISHED"  # type: ignore[attr-defined]
    assert "bastion.stopped" not in run.data.tags  # type: ignore[attr-defined]


def test_a_store_migration_is_not_cut_in_half(tmp_path: Path) -> None:
    """A child creating or migrating a local store is killed only once it is done."""
    from bastion.registry.tracking import store_init_lock

    done = tmp_path / "migrated"

    def job() -> None:
        with store_init_lock(f"sqlite:///{tmp_path / 'mlflow.db'}"):
            time.sleep(2)  # longer than the timeout
            done.write_text("ok")
        time.sleep(120)

    with pytest.raises(JobTimeout):
        run_with_deadline(job, timeout=0.5, what="job")
    assert done.read_text() == "ok"


# --- a progress bar in the killed child does not break the terminal -------------------


def test_a_killed_progress_bar_leaves_a_usable_terminal(tmp_path: Path) -> None:
    import pty

    # 20 s: under a loaded CI the imports and the data alone can take most of 6 s, and
    # the bar must have been drawn before the deadline for this test to mean anything
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bastion.cli", "train", "--model", "cnn", "--data",
         "builtin:digits", "--epochs", "500", "--out", "m", "--no-track", "--timeout", "20"],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm", "COLUMNS": "100"})
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(60) == 1
    text = b"".join(chunks).decode("utf-8", "replace")
    hide, show = "\x1b[?25l", "\x1b[?25h"
    assert hide in text, text  # the bar really was drawn (Rich hides the cursor)
    restore = text.rfind("\r\x1b[2K" + show)  # the bar's line cleared, the cursor back
    assert restore > text.rfind(hide), repr(text[-300:])
    between, _, after = text[restore + len("\r\x1b[2K" + show):].partition("error:")
    assert re.sub(r"\x1b\[[0-9;]*m", "", between) == "", repr(between)  # colour only
    assert "train stopped at the --timeout of 20 s" in after
    assert "\n" not in after.strip()  # one line
    assert not (tmp_path / "m").exists()
