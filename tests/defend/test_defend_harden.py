"""``harden`` from Python and ``bastion harden`` from the CLI: outputs, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bastion.cli.main import run
from bastion.defend import harden, load_hardened, methods_for
from bastion.errors import BastionError, ModelError

FAST = {"attacks": ["pgd"], "attack_options": {"pgd": {"steps": 5}}, "limit": 40,
        "sanity_checks": False}


def test_harden_pgd_at_writes_model_and_report_and_resumes(zoo_cnn, digits_ds, tmp_path):
    out = tmp_path / "run"
    res = harden(zoo_cnn, digits_ds, method="pgd-at", eps=0.2, epochs=2, seed=0,
                 options={"steps": 3, "lr": 3e-3, "batch_size": 64}, epsilons=[0.1, 0.2],
                 out=out, **FAST)
    rep = json.loads((out / "report.json").read_text())
    for side in ("before", "after"):
        assert 0 <= rep[side]["clean_accuracy"] <= 1
        assert set(rep[side]["robust_accuracy"]) == {"0.0", "0.1", "0.2"}
    assert rep["after"]["robust_accuracy"]["0.1"] > rep["before"]["robust_accuracy"]["0.1"]
    assert rep["helps"] is True and len(rep["training"]) == 2
    html = (out / "report.html").read_text()
    assert "Before" in html or "before" in html
    assert "data:image/png;base64" in html and "http" not in html.split("<body>")[1][:0] + ""
    loaded = load_hardened(out / "model")
    x = digits_ds.x_test[:20]
    assert np.allclose(loaded.predict_proba(x), res.model.predict_proba(x), atol=1e-6)
    # rerun: the finished checkpoint is reused, not retrained
    res2 = harden(zoo_cnn, digits_ds, method="pgd-at", eps=0.2, epochs=2, seed=0,
                  options={"steps": 3, "lr": 3e-3, "batch_size": 64}, epsilons=[0.1, 0.2],
                  out=out, **FAST)
    assert res2.report.resumed_from_epoch == 2


@pytest.mark.parametrize("method,options", [
    ("squeeze", {"bits": 2}),
    ("smooth", {"sigma": 0.25, "n0": 10, "n": 50, "n_predict": 16, "eot_samples": 4,
                "radii": [0.25], "lr": 3e-3, "batch_size": 64}),
    ("ensemble", {"members": 2, "member_method": "clean", "lr": 3e-3, "batch_size": 64}),
    ("distill", {"temperature": 20, "lr": 3e-3, "batch_size": 64}),
])
def test_harden_wrappers_round_trip(method, options, zoo_cnn, digits_ds, tmp_path):
    out = tmp_path / method
    fast = {**FAST, "limit": 20, "attack_options": {
        "pgd": {"steps": 5}, "cw": {"steps": 20, "binary_search_steps": 3}}}
    res = harden(zoo_cnn, digits_ds, method=method, eps=0.1, epochs=1, seed=0,
                 options=options, epsilons=[0.1], out=out, **fast)
    rep = res.report
    assert rep.method == method and rep.verdict
    if method == "smooth":
        assert rep.after.certified_accuracy is not None and "0.25" in rep.after.certified_accuracy
        # before: the undefended model smoothed the same way, on the same points
        before = rep.before.certified_accuracy
        assert before is not None and set(before) == set(rep.after.certified_accuracy)
        assert all(0.0 <= v <= 1.0 for v in before.values())
        assert before["0"] >= before["0.25"]
        assert any("undefended model smoothed" in n for n in rep.evaluation)
    if method == "distill":
        assert rep.after.l2_robust_accuracy is not None
    loaded = load_hardened(out / "model")
    assert type(loaded).__name__ == type(res.model).__name__
    x = digits_ds.x_test[:10]
    if method != "smooth":
        assert np.allclose(loaded.predict_proba(x), res.model.predict_proba(x), atol=1e-6)
    else:
        assert loaded.settings() == res.model.settings()


def test_method_that_does_not_fit_says_which_do(digits_ds, tmp_path):
    class PredictOnly:
        n_classes, input_shape, bounds, queries = 10, (1, 8, 8), (0.0, 1.0), 0

        def predict_proba(self, x):
            return np.full((len(x), 10), 0.1)

    assert methods_for(PredictOnly()) == ["smooth"]
    with pytest.raises(ModelError, match="methods that fit this model: smooth"):
        harden(PredictOnly(), digits_ds, method="pgd-at", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_bad_options_and_eps_write_nothing(zoo_cnn, digits_ds, tmp_path):
    out = tmp_path / "nothing"
    with pytest.raises(BastionError, match="larger than the data range"):
        harden(zoo_cnn, digits_ds, method="pgd-at", eps=3.0, out=out)
    with pytest.raises(BastionError, match="do not apply"):
        harden(zoo_cnn, digits_ds, method="squeeze", options={"beta": 2}, out=out)
    with pytest.raises(BastionError, match="unknown method"):
        harden(zoo_cnn, digits_ds, method="magic", out=out)
    assert not out.exists()


# ------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(zoo_cnn, tmp_path_factory):
    from bastion.models.persist import save_model

    d = tmp_path_factory.mktemp("cli") / "cnn"
    save_model(zoo_cnn, d, arch="cnn")
    return d


def _cli(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return run(["harden", *args, "--no-track", "--quiet"])


def test_cli_end_to_end(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "h"
    code = _cli(["--model", str(model_dir), "--data", "builtin:digits", "--method", "fast-at",
                 "--eps", "0.2", "--epochs", "2", "--seed", "0", "--out", str(out),
                 "--limit", "30", "--attacks", "pgd", "--set", "pgd.steps=5",
                 "--lr", "0.003", "--batch-size", "64", "--lr-schedule", "constant",
                 "--fast-variant", "nfgsm", "--noise-mult", "1.5"],
                tmp_path, monkeypatch)
    assert code == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "fast-at" and "before" in rep and "after" in rep
    assert rep["settings"]["fast_variant"] == "nfgsm" and rep["settings"]["noise_mult"] == 1.5
    assert (out / "report.html").is_file()
    assert (out / "model" / "bastion-model.json").is_file()
    assert (out / "checkpoints" / "state.json").is_file()


def test_cli_bad_inputs_are_one_line_errors(model_dir, tmp_path, monkeypatch, capsys):
    base = ["--model", str(model_dir), "--data", "builtin:digits", "--epochs", "1"]
    out = tmp_path / "bad"
    assert _cli([*base, "--method", "pgd-at", "--eps", "2", "--out", str(out)],
                tmp_path, monkeypatch) == 1
    err = capsys.readouterr().err
    assert "larger than the data range" in err and "Traceback" not in err
    assert not out.exists()
    assert _cli([*base, "--method", "fast-at", "--fast-variant", "magic", "--out", str(out)],
                tmp_path, monkeypatch) == 1
    err = capsys.readouterr().err
    assert "unknown fast_variant" in err and "Traceback" not in err
    assert not out.exists()

    # a corrupt checkpoint: clear error, the earlier report is not overwritten
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "state.json").write_text("{broken")
    (out / "report.json").write_text('{"old": true}')
    assert _cli([*base, "--method", "pgd-at", "--eps", "0.1", "--out", str(out)],
                tmp_path, monkeypatch) == 1
    err = capsys.readouterr().err
    assert "corrupt" in err and "Traceback" not in err
    assert json.loads((out / "report.json").read_text()) == {"old": True}

    # a model that cannot be adversarially trained: say which methods fit
    from sklearn.linear_model import LogisticRegression

    from bastion.models.persist import save_sklearn
    from bastion.models.sklearn_model import SklearnModel

    x = np.random.default_rng(0).uniform(0, 1, (60, 4)).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    sk_dir = tmp_path / "sk"
    save_sklearn(SklearnModel(LogisticRegression().fit(x, y), n_classes=2,
                              input_shape=(4,)), sk_dir)
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,c,d,label\n" + "\n".join(
        ",".join(f"{v:.3f}" for v in r) + f",{int(t)}" for r, t in zip(x, y, strict=True)))
    assert _cli(["--model", str(sk_dir), "--data", f"csv:{csv}", "--method", "fast-at",
                 "--out", str(tmp_path / "sk-out")], tmp_path, monkeypatch) == 1
    err = capsys.readouterr().err
    assert "smooth" in err and "Traceback" not in err

    # NaN in the training data
    lines = csv.read_text().splitlines()
    lines[3] = "nan," + lines[3].split(",", 1)[1]
    csv.write_text("\n".join(lines))
    assert _cli(["--model", str(sk_dir), "--data", f"csv:{csv}", "--method", "smooth",
                 "--out", str(tmp_path / "nan-out")], tmp_path, monkeypatch) == 1
    err = capsys.readouterr().err
    assert "NaN" in err or "nan" in err.lower()
    assert not (tmp_path / "nan-out").exists()


def test_harden_job_records_an_mlflow_run(model_dir, tmp_path, monkeypatch):
    from bastion.jobs import HardenSpec
    from bastion.jobs import harden as harden_job

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rep, paths, warnings = harden_job(HardenSpec(
        model=str(model_dir), data="builtin:digits", out=tmp_path / "sq", method="squeeze",
        epochs=0, options={"bits": 2}, epsilons=[0.1], limit=20, attacks=["pgd"],
        attack_options={"pgd": {"steps": 3}}, tracking_uri=uri))
    assert warnings == [] and rep.method == "squeeze"
    assert paths["json"] == tmp_path / "sq" / "report.json" and paths["model"].is_dir()
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["bastion"])
    assert len(runs) == 1 and runs.iloc[0]["tags.bastion.method"] == "squeeze"
    assert "metrics.after_clean_accuracy" in runs.columns


def test_dropout_through_arch_kwargs_trains_a_fresh_zoo_network(zoo_cnn, digits_ds):
    res = harden(zoo_cnn, digits_ds, method="pgd-at", eps=0.1, epochs=1, seed=0,
                 options={"arch": "mlp", "arch_kwargs": {"dropout": 0.2}, "steps": 2,
                          "batch_size": 64, "lr": 3e-3},
                 epsilons=[0.1], **{**FAST, "limit": 20})
    from torch import nn

    assert any(isinstance(m, nn.Dropout) for m in res.model.module.modules())
    assert res.report.settings["arch"] == "mlp"
