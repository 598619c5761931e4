"""The job layer called directly from Python: one fast job each (tiny data,
an MLP trained by the train job), its report and the files it wrote; bad specs are one clear
line (a :class:`SpecError`; the CLI exits 2) and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bastion import jobs
from bastion.errors import BastionError
from bastion.jobs import SpecError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The train job: a zoo MLP on digits, saved as a Bastion model folder."""
    out = tmp_path_factory.mktemp("train") / "mlp"
    metrics, paths, warnings = jobs.train(jobs.TrainSpec(
        model="mlp", data="builtin:digits", out=out, epochs=5, lr=3e-3, track=False))
    assert paths == {"model": out} and warnings == []
    assert (out / "bastion-model.json").is_file()
    assert metrics["test_accuracy"] > 0.8
    return out


def test_train_job(model_dir: Path) -> None:
    meta = json.loads((model_dir / "bastion-model.json").read_text())
    assert meta["arch"] == "mlp", meta


def test_scan_job_writes_the_report_and_an_mlflow_run(model_dir, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # a sqlite MLflow store puts artifacts under ./mlartifacts
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = jobs.ScanSpec(model=str(model_dir), data="builtin:digits", out=tmp_path / "scan",
                         epsilons=[0.1], attacks=["pgd"], attack_options={"pgd": {"steps": 3}},
                         limit=20, tracking_uri=uri)
    report, paths, warnings = jobs.scan(spec)
    assert warnings == []
    assert {"json", "html"} <= set(paths) and paths["json"] == tmp_path / "scan" / "report.json"
    on_disk = json.loads(paths["json"].read_text())
    assert on_disk["clean_accuracy"] == pytest.approx(report.clean_accuracy)
    assert report.clean_accuracy > 0.5
    assert 0 <= report.robust_accuracy["0.1"] <= report.clean_accuracy
    assert paths["html"].read_text().startswith("<!DOCTYPE html>")
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["bastion"])
    assert len(runs) == 1
    assert runs.iloc[0]["metrics.clean_accuracy"] == pytest.approx(report.clean_accuracy)
    # one seed, one result: the same spec gives the same report
    again = jobs.scan(spec.model_copy(update={"out": tmp_path / "scan2", "track": False}))
    assert again.report.robust_accuracy == report.robust_accuracy


def test_harden_job(model_dir, tmp_path):
    rep, paths, _ = jobs.harden(jobs.HardenSpec(
        model=str(model_dir), data="builtin:digits", out=tmp_path / "h", method="squeeze",
        epochs=0, options={"bits": 2}, epsilons=[0.1], limit=20, attacks=["pgd"],
        attack_options={"pgd": {"steps": 3}}, track=False))
    assert rep.method == "squeeze" and rep.before.clean_accuracy > 0.5
    assert "0.1" in rep.after.robust_accuracy
    assert paths["model"].is_dir() and paths["json"].is_file() and paths["html"].is_file()
    assert json.loads(paths["json"].read_text())["verdict"] == rep.verdict


def test_audit_data_job(tmp_path):
    rep, paths, _ = jobs.audit_data(jobs.AuditDataSpec(
        data="builtin:breast-cancer", out=tmp_path / "a", track=False))
    assert rep.n_train > 100 and rep.n_removed <= rep.n_train
    assert json.loads(paths["json"].read_text())["n_train"] == rep.n_train
    assert paths["html"].is_file() and (tmp_path / "a" / "cleaned.npz").is_file()


def test_audit_model_jobs(model_dir, tmp_path):
    said: list[str] = []
    bd, paths, _ = jobs.audit_backdoor(jobs.AuditBackdoorSpec(
        model=str(model_dir), data="builtin:digits", out=tmp_path / "bd", checks=["strip"],
        overlays=4, limit=60, track=False), progress=said.append)
    assert bd.strip is not None and 0 <= bd.strip.flagged_share_test <= 1
    assert paths["json"].is_file() and said  # the progress callback heard the stages
    pv, paths, _ = jobs.audit_privacy(jobs.AuditPrivacySpec(
        model=str(model_dir), data="builtin:digits", out=tmp_path / "pv", targets=50,
        attacks=["loss-threshold"], track=False))
    assert [a.attack for a in pv.attacks] == ["loss-threshold"] and 0 <= pv.attacks[0].auc <= 1
    assert json.loads(paths["json"].read_text())["n_members"] == pv.n_members


def test_audit_extraction_job(tmp_path):
    from sklearn.linear_model import LogisticRegression

    from bastion.data import load_data
    from bastion.models import SklearnModel, save_sklearn

    bc = load_data("builtin:breast-cancer", seed=0)
    lr = LogisticRegression(max_iter=5000).fit(bc.x_train, bc.y_train)
    save_sklearn(SklearnModel(lr, n_classes=2, input_shape=(30,)), tmp_path / "lr")
    rep, paths, _ = jobs.audit_extraction(jobs.AuditExtractionSpec(
        model=str(tmp_path / "lr"), data="builtin:breast-cancer", out=tmp_path / "ex",
        budget=32, epochs=2, track=False))
    assert rep.equation_solving["fidelity"] == 1.0  # a linear model is solved exactly
    assert [p.queries for p in rep.surrogate_curve][-1] == 32 and paths["html"].is_file()


def test_audit_poison_job(tmp_path):
    pr, paths, warnings = jobs.audit_poison(jobs.AuditPoisonSpec(
        data="builtin:digits", attack="label-flip", rate=0.1, out=tmp_path / "p"))
    z = np.load(paths["data"])
    assert warnings == [] and z["poison_mask"].sum() == pr.n_poison > 0
    assert json.loads(paths["json"].read_text())["n_poison"] == pr.n_poison


def test_heal_job_runs_one_step(model_dir, tmp_path, monkeypatch):
    from bastion.registry.models import ModelRegistry

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = ModelRegistry("jobs-digits", tracking_uri=uri)
    reg.promote(reg.register(model_dir), reason="baseline", actor="test")
    seen = []
    rep, paths, warnings = jobs.heal(jobs.HealSpec(
        model="jobs-digits", reference="builtin:digits", once=True, tracking_uri=uri,
        events=f"sqlite:///{tmp_path / 'ev.db'}"), on_step=seen.append)
    assert seen == [rep] and rep.champion == 1 and rep.step_id >= 1
    assert paths == {} and warnings == []


# --- specs: validated, one line, nothing written --------------------------------------


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda t: jobs.ScanSpec(model="m", data="d", out=t, engine="spark"),
     "ScanSpec.engine: Input should be 'local' or 'ray', got 'spark'"),
    (lambda t: jobs.HardenSpec(model="m", data="d", out=t, method="pgd-at",
                               ray_address="http://x"),
     "ray_address: 'http://x' is not a Ray address"),
    (lambda t: jobs.TrainSpec(data="d", out=t, epochs=0), "TrainSpec.epochs"),
    (lambda t: jobs.AuditBackdoorSpec(model="m", data="d", out=t, fpr=1.5), "less than 1"),
    (lambda t: jobs.RedteamSpec(target="u", model="m", out=t, concurrency="many"),
     "valid integer"),
    (lambda t: jobs.ScanSpec(model="m", data="d", out=t, epsilon=0.1),
     "ScanSpec has no field 'epsilon'"),
    (lambda t: jobs.HealSpec(model="m", reference="r", timeout=3), "has no field 'timeout'"),
    (lambda t: jobs.LlmHardenDetectorSpec(data=t, out=t, rounds=50), "rounds"),
    (lambda t: jobs.AuditDataSpec(out=t), "AuditDataSpec.data: Field required"),
])
def test_bad_spec_values_are_one_clear_line(tmp_path, make, fragment):
    with pytest.raises(SpecError) as info:
        make(tmp_path / "out")
    text = str(info.value)
    assert fragment in text and "\n" not in text, text
    assert isinstance(info.value, BastionError) and info.value.exit_code == 2


def test_the_package_names_are_the_jobs_and_import_lazily():
    import subprocess
    import sys

    code = ("import sys, bastion.jobs as j, bastion.jobs.scanning, bastion.jobs.healing\n"
            "from bastion.jobs import heal, scan, train, harden, check_timeout\n"
            "assert all(callable(f) and f.__name__ == n for f, n in ((heal, 'heal'), "
            "(scan, 'scan'), (train, 'train'), (harden, 'harden')))\n"
            "assert sorted(j.__all__) == sorted(j._LAZY)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    cheap = subprocess.run([sys.executable, "-c", "import sys, bastion.jobs as j; "
                            "j.check_timeout(3); print('pydantic' in sys.modules)"],
                           check=True, capture_output=True, text=True)
    assert cheap.stdout.strip() == "False"  # --timeout's check does not import the specs


def test_specs_are_frozen_and_default_like_the_cli(tmp_path):
    spec = jobs.ScanSpec(model="m", data="d", out=tmp_path)
    assert (spec.engine, spec.ray_address, spec.preset, spec.epsilons) == (
        "local", None, "standard", (0.05, 0.1, 0.2))
    with pytest.raises(Exception, match="frozen"):
        spec.seed = 3  # type: ignore[misc]
    assert jobs.HardenSpec(model="m", data="d", out=tmp_path, method="smooth").limit == 200
    assert jobs.ScanSpec(model="m", data="d", out=tmp_path, engine="ray",
                         ray_address="ray://head:10001").ray_address == "ray://head:10001"
    # the fields are documented (what the Python API docs and help() show)
    assert "Ray cluster" in (jobs.ScanSpec.model_fields["ray_address"].description or "")
    specs = [getattr(jobs, n) for n in jobs.__all__ if n.endswith("Spec") and n != "JobSpec"]
    assert len(specs) == 13
    for cls in specs:
        assert "engine" in cls.model_fields and "ray_address" in cls.model_fields
        undocumented = [n for n, f in cls.model_fields.items() if not f.description]
        assert not undocumented, (cls.__name__, undocumented)


def test_checks_the_cli_made_before_keep_their_message(tmp_path):
    """Values the library always rejected (exit 1) are still rejected at construction."""
    for kwargs, fragment in (({"limit": 0}, "--limit must be at least 1"),
                             ({"norm": "l3"}, "unknown norm"),
                             ({"epsilons": [-1]}, "epsilon must be")):
        with pytest.raises(BastionError, match=fragment) as info:
            jobs.ScanSpec(model="m", data="d", out=tmp_path / "o", **kwargs)
        assert not isinstance(info.value, SpecError)
    assert not (tmp_path / "o").exists()


def test_engine_ray_without_a_cluster_is_refused_and_writes_nothing(tmp_path):
    spec = jobs.ScanSpec(model="builtin:digits-cnn", data="builtin:digits",
                         out=tmp_path / "o", engine="ray", ray_address="127.0.0.1:1")
    with pytest.raises(BastionError, match="no Ray cluster answers at 127.0.0.1:1"):
        jobs.scan(spec)
    assert not (tmp_path / "o").exists()


def test_a_bad_spec_through_the_cli_is_one_line_exit_2(tmp_path, capsys):
    from bastion.cli.main import run

    out = tmp_path / "bd"
    code = run(["audit", "backdoor", "--model", "builtin:digits-cnn", "--data",
                "builtin:digits", "--out", str(out), "--fpr", "1.5", "--no-track"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "AuditBackdoorSpec.fpr" in err and "--fpr" in err
    assert not out.exists()
