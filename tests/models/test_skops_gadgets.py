"""Gadget chains in .skops files are refused before anything in them runs.

Every gadget here is made only of scikit-learn, NumPy and SciPy objects, which the old
namespace allowlist (``sklearn.``, ``numpy.``, ``scipy.``) let through. Each is proved
live first (run in-process, it really writes the sentinel file), then it must be
refused by ``load_skops``, by ``bastion scan`` on the file and on a model folder, and
the sentinel must not exist afterwards.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.special
import skops.io as sio
from numpy.testing._private.utils import runstring
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, MinMaxScaler, StandardScaler

from bastion.cli.main import run
from bastion.errors import ModelError
from bastion.models import SklearnModel, load_model, load_skops, save_sklearn


def _xy(digits_arrays: Any, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    x, y = digits_arrays[0][:n], digits_arrays[1][:n]
    return x.reshape(len(x), -1), y


def _exec_steps(code: str) -> list[tuple[str, Any]]:
    """full_like -> take -> runstring: builds the string from the input, then execs it."""
    return [
        ("fill", FunctionTransformer(np.full_like,
                                     kw_args={"fill_value": code, "dtype": object})),
        ("pick", FunctionTransformer(np.take, kw_args={"indices": 0})),
        ("run", FunctionTransformer(runstring, kw_args={"dict": {}})),
    ]


def _gadgets(sentinel: Path, clf: Any) -> dict[str, Any]:
    code = f"open({str(sentinel)!r}, 'w').write('pwned')"
    writes = f"open({str(sentinel)!r}, 'w')"
    # a fitted ColumnTransformer inside a Pipeline whose fitted branch is swapped for
    # the exec chain, as an attacker editing a real model would do
    cols = ColumnTransformer([("inner", FunctionTransformer(), list(range(64)))])
    cols.fit(np.zeros((4, 64)))
    cols.transformers_[0] = ("inner", Pipeline(_exec_steps(code)), list(range(64)))
    nested = Pipeline([("cols", cols), ("clf", clf)])
    return {
        # a numpy testing helper that executes a string, fed by numpy functions
        "runstring-chain": Pipeline([*_exec_steps(code), ("clf", clf)]),
        # the same chain hidden inside a ColumnTransformer inside a Pipeline
        "nested-columntransformer": nested,
        # functools.partial around numpy functions (a PartialNode)
        "partial": Pipeline([
            ("p", FunctionTransformer(functools.partial(np.full_like, fill_value=writes,
                                                        dtype=object))),
            ("pick", FunctionTransformer(np.take, kw_args={"indices": 0})),
            ("run", FunctionTransformer(runstring, kw_args={"dict": {}})),
            ("clf", clf)]),
        # a numpy ufunc skops trusts by default: still a function as a parameter
        "numpy-ufunc": make_pipeline(FunctionTransformer(np.exp), clf),
        # a scipy helper as a parameter
        "scipy-helper": make_pipeline(FunctionTransformer(scipy.special.expit), clf),
    }


@pytest.fixture(scope="module")
def fitted_clf(digits_arrays: Any) -> LogisticRegression:
    x, y = _xy(digits_arrays)
    return LogisticRegression(max_iter=200).fit(x, y)


@pytest.fixture()
def gadget_files(tmp_path: Path, fitted_clf: Any) -> tuple[Path, dict[str, Path]]:
    sentinel = tmp_path / "SENTINEL"
    files = {}
    for name, pipe in _gadgets(sentinel, fitted_clf).items():
        f = tmp_path / f"{name}.skops"
        sio.dump(pipe, f)
        files[name] = f
    return sentinel, files


def test_the_exec_gadgets_are_live(tmp_path: Path, fitted_clf: Any) -> None:
    """Proof that these chains run code when built: run each in-process."""
    x = np.zeros((2, 64), dtype=np.float32)
    for name in ("runstring-chain", "nested-columntransformer", "partial"):
        sentinel = tmp_path / f"S-{name}"
        pipe = _gadgets(sentinel, fitted_clf)[name]
        with pytest.raises(Exception):  # noqa: B017 - the chain breaks after it ran
            pipe.predict_proba(x)
        assert sentinel.exists(), name


def test_every_gadget_is_refused_by_name_before_it_runs(gadget_files: Any) -> None:
    sentinel, files = gadget_files
    expected = {
        "runstring-chain": "function numpy.testing._private.utils.runstring",
        "nested-columntransformer": "function numpy.take",
        "partial": "function functools.partial",
        "numpy-ufunc": "function numpy.exp",
        "scipy-helper": "function scipy.special",
    }
    for name, f in files.items():
        with pytest.raises(ModelError) as e:
            load_skops(f, input_shape=(1, 8, 8))
        msg = str(e.value)
        assert "does not load" in msg and expected[name] in msg, (name, msg)
        assert "\n" not in msg
    assert not sentinel.exists()


def test_unlisted_estimator_and_type_objects_are_refused(tmp_path: Path,
                                                         digits_arrays: Any) -> None:
    x, y = _xy(digits_arrays, 200)
    sio.dump(KNeighborsClassifier(3).fit(x, y), tmp_path / "knn.skops")
    with pytest.raises(ModelError, match="KNeighborsClassifier"):
        load_skops(tmp_path / "knn.skops", input_shape=(1, 8, 8))
    # a type object that is not a NumPy scalar type (dtype=object) is refused too
    sio.dump({"t": object}, tmp_path / "type.skops")
    with pytest.raises(ModelError, match="type object builtins.object"):
        load_skops(tmp_path / "type.skops", input_shape=(1, 8, 8))


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


def test_scan_refuses_gadget_file_and_folder(gadget_files: Any, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    sentinel, files = gadget_files
    for name, f in files.items():
        # scan on the bare file
        code = run(["scan", "--model", str(f), "--data", "builtin:digits", "--out",
                    str(tmp_path / f"r-{name}"), "--no-track", "--limit", "5"])
        line = _one_error_line(capsys.readouterr().err)
        assert code == 1 and "does not load: " in line, line
        # scan on a model folder holding it as model.skops
        folder = tmp_path / f"folder-{name}"
        save_sklearn(SklearnModel(sio.load(f, trusted=sio.get_untrusted_types(file=f)),
                                  n_classes=10, input_shape=(1, 8, 8)), folder)
        code = run(["scan", "--model", str(folder), "--data", "builtin:digits", "--out",
                    str(tmp_path / f"rf-{name}"), "--no-track", "--limit", "5"])
        line = _one_error_line(capsys.readouterr().err)
        assert code == 1 and "does not load: function" in line, line
        assert not (tmp_path / f"r-{name}").exists()
        with pytest.raises(ModelError):
            load_model(folder)
    assert not sentinel.exists()


@pytest.mark.parametrize("kind", ["pipeline", "mlp", "forest", "boosting", "columns"])
def test_legitimate_sklearn_models_still_load(tmp_path: Path, digits_arrays: Any,
                                              kind: str) -> None:
    x, y = _xy(digits_arrays)
    est = {
        "pipeline": lambda: make_pipeline(StandardScaler(),
                                          LogisticRegression(max_iter=200)),
        "mlp": lambda: MLPClassifier(hidden_layer_sizes=(16,), max_iter=30, random_state=0),
        "forest": lambda: RandomForestClassifier(n_estimators=5, random_state=0),
        "boosting": lambda: GradientBoostingClassifier(n_estimators=3, random_state=0),
        "columns": lambda: make_pipeline(ColumnTransformer([
            ("a", StandardScaler(), list(range(32))), ("b", MinMaxScaler(), slice(32, 64))]),
            LogisticRegression(max_iter=200)),
    }[kind]().fit(x, y)
    m = SklearnModel(est, n_classes=10, input_shape=(1, 8, 8), name=kind)
    save_sklearn(m, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    xt = digits_arrays[2][:20]
    np.testing.assert_allclose(loaded.predict_proba(xt), m.predict_proba(xt), atol=1e-6)
    bare = load_skops(tmp_path / "m" / "model.skops", input_shape=(1, 8, 8))
    assert bare.n_classes == 10
