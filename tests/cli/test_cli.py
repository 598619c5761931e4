"""End-to-end tests through the ``bastion`` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bastion.cli.main import run

FAST = [
    "--set",
    "apgd-ce.steps=10",
    "--set",
    "apgd-t.steps=10",
    "--set",
    "apgd-t.n_target_classes=2",
    "--set",
    "square.max_queries=50",
    "--set",
    "fab-t.steps=10",
    "--set",
    "fab-t.n_target_classes=2",
]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory: pytest.TempPathFactory):
    """A private model cache, so the builtin model is trained once here."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("BASTION_CACHE")
    os.environ["BASTION_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("BASTION_CACHE", None)
    else:
        os.environ["BASTION_CACHE"] = old


def _bastion(*args: str, cwd: Path, env_extra: dict[str, str] | None = None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "bastion.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--version"]) == 0
    assert "bastion" in capsys.readouterr().out


def test_scan_end_to_end_writes_reports_and_mlflow_run(
    tmp_path: Path,
    cache_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "scan"
    code = run(
        [
            "scan",
            "--model",
            "builtin:digits-cnn",
            "--data",
            "builtin:digits",
            "--eps",
            "0.05,0.2",
            "--limit",
            "40",
            "--out",
            str(out),
            "--json",
            "--quiet",
            *FAST,
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert printed["robust_accuracy"] == report["robust_accuracy"]
    for key in (
        "clean_accuracy",
        "robust_accuracy",
        "per_attack",
        "n_points",
        "norm",
        "seed",
        "warnings",
    ):
        assert key in report
    assert report["n_points"] == 40 and report["norm"] == "linf" and report["seed"] == 0
    ra = {float(k): v for k, v in report["robust_accuracy"].items()}
    assert set(ra) == {0.05, 0.2}
    assert report["clean_accuracy"] > 0.9
    assert ra[0.2] <= ra[0.05] < report["clean_accuracy"]  # an undefended CNN falls
    html = (out / "report.html").read_text()
    assert "<img" in html and "http://" not in html and "https://" not in html
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("bastion").experiment_id])
    assert len(runs) == 1
    assert runs[0].data.metrics["clean_accuracy"] == pytest.approx(report["clean_accuracy"])
    assert runs[0].data.params["model"] == "builtin:digits-cnn"


def test_scan_same_seed_same_report(tmp_path: Path, cache_env: Path) -> None:
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert (
            run(
                [
                    "scan",
                    "--model",
                    "builtin:digits-cnn",
                    "--data",
                    "builtin:digits",
                    "--eps",
                    "0.1",
                    "--limit",
                    "25",
                    "--out",
                    str(out),
                    "--no-track",
                    "--quiet",
                    "--seed",
                    "7",
                    *FAST,
                ]
            )
            == 0
        )
        outs.append(json.loads((out / "report.json").read_text()))
    assert outs[0]["robust_accuracy"] == outs[1]["robust_accuracy"]
    assert [a["robust_accuracy_after"] for a in outs[0]["per_attack"]] == [
        a["robust_accuracy_after"] for a in outs[1]["per_attack"]
    ]


def test_train_then_scan_the_folder(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    assert (
        run(
            [
                "train",
                "--model",
                "cnn",
                "--data",
                "builtin:digits",
                "--epochs",
                "2",
                "--out",
                str(model_dir),
                "--no-track",
                "--quiet",
            ]
        )
        == 0
    )
    assert (model_dir / "model.safetensors").exists()
    meta = json.loads((model_dir / "bastion-model.json").read_text())
    assert meta["input_shape"] == [1, 8, 8]
    out = tmp_path / "scan"
    assert (
        run(
            [
                "scan",
                "--model",
                str(model_dir),
                "--data",
                "builtin:digits",
                "--eps",
                "0.1",
                "--limit",
                "20",
                "--attacks",
                "fgsm",
                "--out",
                str(out),
                "--no-track",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((out / "report.json").read_text())["n_points"] == 20


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--eps", "-0.1"], "epsilon"),
        (["--eps", ","], "empty"),
        (["--eps", "abc"], "--eps"),
        (["--norm", "l3"], "norm"),
        (["--limit", "0"], "limit"),
        (["--attacks", "nosuchattack"], "nosuchattack"),
        (["--preset", "fastest"], "unknown preset 'fastest'"),
    ],
)
def test_bad_options_fail_cleanly_and_write_nothing(
    tmp_path: Path,
    cache_env: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    fragment: str,
) -> None:
    out = tmp_path / "scan"
    base = [
        "scan",
        "--model",
        "builtin:digits-cnn",
        "--data",
        "builtin:digits",
        "--out",
        str(out),
        "--no-track",
        "--quiet",
    ]
    code = run(base + args)
    err = capsys.readouterr().err
    assert code == 1
    assert fragment in err and "Traceback" not in err
    assert not (out / "report.json").exists()


def test_bad_model_and_data_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "bastion-model.json").write_text("{not json")
    nan_csv = tmp_path / "nan.csv"
    nan_csv.write_text("a,b,label\n0.1,0.2,0\n0.3,nan,1\n0.5,0.6,0\n0.7,0.8,1\n")
    cases = [
        (["--model", str(tmp_path / "missing.pt"), "--data", "builtin:digits"], "missing.pt"),
        (["--model", str(corrupt), "--data", "builtin:digits"], "bastion-model.json"),
        (["--model", "builtin:digits-cnn", "--data", "nosuch:thing"], "nosuch"),
        (["--model", "builtin:digits-cnn", "--data", f"csv:{nan_csv}"], "NaN"),
    ]
    for args, fragment in cases:
        out = tmp_path / "out"
        code = run(["scan", *args, "--eps", "0.1", "--out", str(out), "--no-track", "--quiet"])
        err = capsys.readouterr().err
        assert code == 1, args
        assert fragment in err, (fragment, err)
        assert "Traceback" not in err
        assert not out.exists()


def test_shape_mismatch_between_model_and_data(
    tmp_path: Path, cache_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(
        [
            "scan",
            "--model",
            "builtin:digits-cnn",
            "--data",
            "builtin:wine",
            "--eps",
            "0.1",
            "--out",
            str(tmp_path / "o"),
            "--no-track",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "shape" in err.lower() and "Traceback" not in err


def test_real_process_exit_code_and_debug_traceback(tmp_path: Path, cache_env: Path) -> None:
    bad = _bastion(
        "scan",
        "--model",
        "builtin:digits-cnn",
        "--data",
        "builtin:digits",
        "--eps",
        "-1",
        "--out",
        str(tmp_path / "o"),
        "--no-track",
        cwd=tmp_path,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "error:" in bad.stderr
    dbg = _bastion(
        "scan",
        "--model",
        "builtin:digits-cnn",
        "--data",
        "builtin:digits",
        "--eps",
        "-1",
        "--out",
        str(tmp_path / "o"),
        "--no-track",
        "--debug",
        cwd=tmp_path,
    )
    assert dbg.returncode != 0 and "Traceback" in dbg.stderr


def test_unreachable_tracking_server_keeps_the_report(
    tmp_path: Path,
    cache_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    out = tmp_path / "scan"
    code = run(
        [
            "scan",
            "--model",
            "builtin:digits-cnn",
            "--data",
            "builtin:digits",
            "--eps",
            "0.1",
            "--limit",
            "10",
            "--attacks",
            "fgsm",
            "--out",
            str(out),
            "--tracking-uri",
            f"http://127.0.0.1:{port}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0
    assert "MLflow tracking failed" in err
    assert json.loads((out / "report.json").read_text())["n_points"] == 10


def test_nan_inputs_rejected_by_library(cache_env: Path) -> None:
    from bastion.errors import BastionError
    from bastion.evaluate import scan
    from bastion.models import resolve_model

    model = resolve_model("builtin:digits-cnn")
    x = np.full((3, 1, 8, 8), np.nan, dtype=np.float32)
    with pytest.raises(BastionError, match="NaN"):
        scan(model, x, np.zeros(3, dtype=np.int64), epsilons=[0.1])


def test_scan_loads_a_hardened_wrapper_folder(
    tmp_path: Path, cache_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bastion harden`` writes squeeze/smooth/ensemble wrappers as their own folders;
    ``bastion scan`` must attack the wrapper (here through BPDA), not refuse it."""
    from bastion.defend.persist import save_hardened
    from bastion.defend.squeeze import FeatureSqueezing
    from bastion.models import resolve_model

    folder = tmp_path / "squeezed"
    save_hardened(FeatureSqueezing(resolve_model("builtin:digits-cnn"), bits=3), folder)
    out = tmp_path / "scan"
    code = run(["scan", "--model", str(folder), "--data", "builtin:digits", "--eps", "0.3",
                "--limit", "20", "--attacks", "pgd", "--set", "pgd.steps=20", "--out", str(out),
                "--no-track", "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert "squeeze" in report["model"]["name"]
    assert report["robust_accuracy"]["0.3"] < 0.5  # BPDA gets through the squeezer


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["scan", "--no-such-option"])
    err = capsys.readouterr().err
    assert code == 2
    assert "No such option" in err and "internal error" not in err
