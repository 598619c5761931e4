"""``bastion harden --seeds N --max-recoveries K --recovery/--no-recovery`` (issue 21)."""

from __future__ import annotations

import json


def test_cli_harden_seeds_and_bad_values(zoo_cnn, tmp_path, capsys):
    from bastion.cli.main import run
    from bastion.models.persist import save_model

    model = tmp_path / "cnn"
    save_model(zoo_cnn, model, arch="cnn")
    out = tmp_path / "cli"
    code = run(["harden", "--model", str(model), "--data", "builtin:digits",
                "--method", "fast-at", "--eps", "0.1", "--epochs", "1", "--seeds", "2",
                "--max-recoveries", "1", "--limit", "30", "--attacks", "pgd",
                "--set", "pgd.steps=3", "--out", str(out), "--no-track", "--quiet"])
    assert code == 0, capsys.readouterr()
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["seeds"]["runs"]) == 2 and "median" in rep["seeds"]["stats"][
        "test_robust_accuracy"]
    assert rep["settings"]["max_recoveries"] == 1
    for args, msg in ((["--seeds", "0"], "seeds must be a whole number"),
                      (["--max-recoveries", "-1"], "max_recoveries"),
                      (["--seeds", "2", "--method", "squeeze"], "do not apply to squeeze")):
        argv = ["harden", "--model", str(model), "--data", "builtin:digits",
                "--method", "fast-at", "--epochs", "1", "--out", str(tmp_path / "bad"),
                "--no-track", "--quiet", *args]
        code = run(argv)
        err = capsys.readouterr().err
        assert code != 0 and msg in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
        assert not (tmp_path / "bad" / "report.json").exists()
