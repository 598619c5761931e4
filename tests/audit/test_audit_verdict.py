"""``bastion audit data``: a calibrated verdict, only flagged samples removed, every row of
a CSV audited and reported by its row number and id (issue 15, section 5)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest

from bastion.cli.main import run


@pytest.fixture(scope="module")
def digits_csvs(tmp_path_factory):
    """Digits as a CSV with an id column: clean, and with 10% of the labels flipped."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.reshape(len(d.target), -1)
    rng = np.random.default_rng(0)
    flipped = np.sort(rng.choice(len(x), int(0.1 * len(x)), replace=False))
    y = d.target.copy()
    y[flipped] = (y[flipped] + rng.integers(1, 10, len(flipped))) % 10
    folder = tmp_path_factory.mktemp("csv")
    df = pd.DataFrame(x, columns=[f"p{i}" for i in range(64)])
    df.insert(0, "sample_id", [f"s{i:04d}" for i in range(len(x))])
    df["label"] = d.target
    df.to_csv(folder / "clean.csv", index=False)
    df["label"] = y
    df.to_csv(folder / "flipped.csv", index=False)
    return folder, set(flipped.tolist()), len(x)


def test_flipped_labels_csv_no_model_recall_and_precision(digits_csvs, tmp_path, capsys):
    """The acceptance check: 10% flipped labels, no model -> recall >= 0.8 at precision
    >= 0.6, counted on the file's own row numbers."""
    folder, truth, n = digits_csvs
    src = folder / "flipped.csv"
    before = src.read_bytes()
    out = tmp_path / "a"
    assert run(["audit", "data", "--data", f"csv:{src}", "--id-column", "sample_id",
                "--out", str(out), "--no-track"]) == 0
    err = capsys.readouterr().err
    assert "abnormal" in err and "nothing abnormal" not in err
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_train"] == n and rep["whole_file"] and rep["abnormal"]
    rows = {r["row"] for r in rep["flagged_rows"]}
    hit = len(rows & truth)
    recall, precision = hit / len(truth), hit / max(len(rows), 1)
    assert recall >= 0.8 and precision >= 0.6, (recall, precision)
    # ids are the file's ids of those rows; removed.csv says the same
    assert all(r["id"] == f"s{r['row']:04d}" for r in rep["flagged_rows"])
    with open(out / "removed.csv", newline="") as fh:
        csv_rows = {int(r["row"]) for r in csv.DictReader(fh)}
    assert csv_rows == rows
    # the cleaned copy of the file lacks exactly those rows; the original is untouched
    cleaned = pd.read_csv(out / "cleaned.csv")
    assert len(cleaned) == n - len(rows)
    assert not set(cleaned["sample_id"]) & {f"s{r:04d}" for r in rows}
    assert src.read_bytes() == before
    # and Bastion reads both cleaned files back
    from bastion.data import load_data

    assert len(load_data(f"csv:{out / 'cleaned.csv'}", id_column="sample_id").y_train) > 0
    ds = load_data(f"npz:{out / 'cleaned.npz'}")
    assert len(ds.y_train) + len(ds.y_test) == n - len(rows)


def test_clean_csv_says_nothing_abnormal_and_removes_near_nothing(digits_csvs, tmp_path,
                                                                  capsys):
    folder, _, n = digits_csvs
    out = tmp_path / "b"
    assert run(["audit", "data", "--data", f"csv:{folder / 'clean.csv'}", "--out", str(out),
                "--id-column", "sample_id", "--no-track"]) == 0
    assert "nothing abnormal" in capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    assert not rep["abnormal"] and rep["n_train"] == n
    assert rep["n_removed"] <= 0.015 * n  # measured: 17 of 1797


def test_budget_still_removes_the_asked_share(digits_csvs, tmp_path):
    folder, _, n = digits_csvs
    out = tmp_path / "c"
    assert run(["audit", "data", "--data", f"csv:{folder / 'clean.csv'}", "--out", str(out),
                "--id-column", "sample_id", "--budget", "0.05", "--no-track", "-q"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_removed"] == int(0.05 * n) and "by the budget/threshold" in rep["verdict"]
    assert rep["verdict"].startswith("nothing abnormal")


def test_bad_id_column_is_one_line(digits_csvs, tmp_path, capsys):
    folder, _, _ = digits_csvs
    assert run(["audit", "data", "--data", f"csv:{folder / 'clean.csv'}", "--out",
                str(tmp_path / "d"), "--id-column", "nope", "--no-track"]) == 1
    err = capsys.readouterr().err.strip()
    assert "id column 'nope'" in err and len(err.splitlines()) == 1


def test_clean_digits_with_a_white_box_model_nothing_abnormal(digits_arrays, digits_cnn):
    """With a model every detector runs; activation clustering's small clusters (which
    split clean classes too) are reported but do not decide unless named."""
    from bastion.audit import audit_data
    from bastion.data.dataset import Dataset

    x_tr, y_tr, x_te, y_te = digits_arrays
    ds = Dataset(name="digits", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                 n_classes=10)
    rep, _, res = audit_data(ds, digits_cnn)
    assert {d.detector for d in rep.detectors} >= {"spectral", "activation-clustering",
                                                   "confident-learning", "knn", "strip"}
    assert not rep.abnormal, rep.verdict
    assert res.n_flagged <= 0.015 * len(y_tr)
    # naming activation clustering makes its decision count
    rep2, _, _ = audit_data(ds, digits_cnn, detectors=["activation-clustering"],
                            use="activation-clustering")
    assert rep2.n_flagged == rep2.detectors[0].flagged


def test_a_whole_file_cleaned_npz_is_audited_row_by_row(digits_csvs, tmp_path):
    """The cleaned.npz of a CSV audit (x, y) reads back and is audited on every row."""
    folder, _, n = digits_csvs
    assert run(["audit", "data", "--data", f"csv:{folder / 'flipped.csv'}", "--id-column",
                "sample_id", "--out", str(tmp_path / "a"), "--no-track", "-q"]) == 0
    first = json.loads((tmp_path / "a" / "report.json").read_text())
    assert run(["audit", "data", "--data", f"npz:{tmp_path / 'a' / 'cleaned.npz'}", "--out",
                str(tmp_path / "b"), "--no-track", "-q"]) == 0
    second = json.loads((tmp_path / "b" / "report.json").read_text())
    assert second["whole_file"] and second["n_train"] == n - first["n_removed"]
    assert not second["abnormal"], second["verdict"]  # the flips are gone
    assert not (tmp_path / "b" / "cleaned.csv").exists()
