"""The local engine: no Ray needed; per-point seeds make a scan independent of batching."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bastion.engine import EngineError, LocalEngine, TokenBucket, get_engine
from bastion.engine.base import check_address

SRC = Path(__file__).resolve().parents[2] / "src"


def _square(v: int, *, k: int) -> int:
    return v * v + k


def test_local_map_in_order_with_shared() -> None:
    eng = get_engine("local")
    assert isinstance(eng, LocalEngine) and eng.workers == 1
    assert eng.map(_square, [3, 1, 2], shared=eng.share(k=1)) == [10, 2, 5]
    assert sorted(eng.imap_unordered(_square, [2, 3], shared={"k": 0})) == [(0, 4), (1, 9)]


def test_local_engine_runs_with_ray_import_blocked(tmp_path: Path) -> None:
    """A local scan imports no Ray, and works where Ray cannot be imported at all."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ImportError('ray is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np\n"
        "from bastion.engine import get_engine\n"
        "from bastion.evaluate import scan\n"
        "from bastion.models.sklearn_model import SklearnModel\n"
        "from sklearn.linear_model import LogisticRegression\n"
        "from sklearn.datasets import load_iris\n"
        "d = load_iris(); x = (d.data / 8).astype('float32'); y = d.target\n"
        "m = SklearnModel(LogisticRegression(max_iter=300).fit(x, y), n_classes=3,\n"
        "                 input_shape=(4,), bounds=(0.0, 1.0))\n"
        "r = scan(m, x[:20], y[:20], epsilons=[0.05], attacks=['square'], seed=0,\n"
        "         attack_options={'square': {'max_queries': 20}}, sanity_checks=False,\n"
        "         engine=get_engine('local'))\n"
        "assert 'ray' not in sys.modules\n"
        "try:\n"
        "    get_engine('ray')\n"
        "except Exception as e:\n"
        "    print('RAYERR', type(e).__name__, e)\n"
        "print('OK', r.robust_accuracy)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK {" in out.stdout
    assert "RAYERR EngineError the Ray engine needs Ray" in out.stdout


@pytest.mark.parametrize("bad", ["", "nope", "http://x:1", "host:", "host:99999",
                                 "ray://:10001", "a/b:1"])
def test_bad_address_is_one_clear_error(bad: str) -> None:
    with pytest.raises(EngineError) as ei:
        check_address(bad)
    assert "\n" not in str(ei.value) and "HOST:PORT" in str(ei.value)
    assert ei.value.exit_code == 2


def test_unknown_engine_and_address_without_ray() -> None:
    with pytest.raises(EngineError, match="unknown engine"):
        get_engine("spark")
    with pytest.raises(EngineError, match="only for --engine ray"):
        get_engine("local", address="auto")


def test_token_bucket_spaces_reservations() -> None:
    b = TokenBucket(rate=100.0)
    delays = [b.reserve() for _ in range(5)]
    assert delays[0] == 0.0
    assert delays[-1] == pytest.approx(0.04, abs=0.01)


def test_scan_does_not_depend_on_batching(digits_cnn, digits_eval) -> None:
    """Per-point seeds: the same report whatever the batch size (so whatever the shards)."""
    from bastion.evaluate import scan

    x, y = digits_eval
    x, y = x[:30], y[:30]
    kw = dict(norm="linf", epsilons=[0.03, 0.08], attacks=["pgd", "apgd-t", "square"], seed=1,
              attack_options={"pgd": {"steps": 5, "restarts": 2},
                              "apgd-t": {"steps": 5, "n_target_classes": 2},
                              "square": {"max_queries": 40}}, sanity_checks=False)
    a = scan(digits_cnn, x, y, batch_size=500, **kw)
    b = scan(digits_cnn, x, y, batch_size=7, **kw)
    assert a.robust_accuracy == b.robust_accuracy
    assert a.first_broken_by == b.first_broken_by
    assert [s.queries_total for s in a.per_attack] == [s.queries_total for s in b.per_attack]
    assert [e.x_adv for e in a.examples] == [e.x_adv for e in b.examples]
    assert a.robust_accuracy["0.08"] < 1.0


def test_point_random_is_keyed_by_point() -> None:
    from bastion.attacks._rng import PointRandom

    full = PointRandom(7, np.arange(10))
    part = PointRandom(7, np.array([3, 8]))
    assert np.array_equal(full.uniform((4,), 1, 2)[[3, 8]], part.uniform((4,), 1, 2))
    assert not np.array_equal(full.uniform((4,), 1), full.uniform((4,), 2))
    u = full.uniform((1000,))
    assert 0.45 < u.mean() < 0.55 and u.min() >= 0 and u.max() < 1
    z = PointRandom(1, n=4).normal((5000,))
    assert abs(z.mean()) < 0.05 and 0.95 < z.std() < 1.05


@pytest.mark.parametrize("argv", [
    ["scan", "--model", "builtin:logreg", "--data", "builtin:digits", "--engine", "ray",
     "--ray-address", "127.0.0.1:1"],
    ["audit", "data", "--data", "parquet:x.parquet", "--engine", "ray", "--ray-address",
     "ray://127.0.0.1:1"],
    ["redteam", "--target", "http://127.0.0.1:1/v1", "--model", "m", "--engine", "ray",
     "--ray-address", "bad address"],
    ["scan", "--model", "builtin:logreg", "--data", "builtin:digits", "--engine", "spark"],
])
def test_cli_bad_engine_or_address_is_one_line_exit_2(argv, tmp_path, capsys,
                                                      monkeypatch) -> None:
    """Nothing runs, nothing is written: one line naming the problem and the fix."""
    import time

    from bastion.cli.main import run

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    code = run([*argv, "--out", str(out), "--no-track"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert ("no Ray cluster answers" in err or "not a Ray address" in err
            or "unknown engine" in err)
    assert time.perf_counter() - t0 < 10 and not out.exists()


def test_env_address_is_used_for_ray_only(monkeypatch) -> None:
    monkeypatch.setenv("BASTION_RAY_ADDRESS", "127.0.0.1:1")
    assert isinstance(get_engine("local"), LocalEngine)  # the variable does not matter here
    with pytest.raises(EngineError, match="no Ray cluster answers at 127.0.0.1:1"):
        get_engine("ray")


def test_cli_streamed_audit_on_the_local_engine(tmp_path, digits_arrays, monkeypatch) -> None:
    """`bastion audit data --engine local` streams Parquet shards; other data or options
    the streamed audit cannot honour are one clear line."""
    import json

    import pandas as pd

    from bastion.cli.main import run

    monkeypatch.chdir(tmp_path)
    x, y = digits_arrays[0][:300].reshape(300, -1), digits_arrays[1][:300].copy()
    y[::30] = (y[::30] + 5) % 10
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, part in enumerate(np.array_split(np.arange(300), 2)):
        df = pd.DataFrame(x[part], columns=[f"f{j}" for j in range(64)])
        df["label"] = y[part]
        df.to_parquet(shards / f"p{i}.parquet", index=False)
    out = tmp_path / "audit"
    assert run(["audit", "data", "--data", f"parquet:{shards}", "--engine", "local",
                "--out", str(out), "--no-track", "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["command"] == "audit data (streamed)" and rep["n_train"] == 300
    assert [d["detector"] for d in rep["detectors"]] == ["spectral", "knn"]
    assert {r["row"] for r in rep["flagged_rows"]} & set(range(0, 300, 30))
    assert run(["audit", "data", "--data", "builtin:digits", "--engine", "local",
                "--out", str(tmp_path / "b"), "--no-track"]) == 1
    assert run(["audit", "data", "--data", f"parquet:{shards}", "--engine", "local",
                "--mode", "relabel", "--out", str(tmp_path / "c"), "--no-track"]) == 1


def test_serve_and_train_connect_through_the_engine(monkeypatch) -> None:
    """``bastion._ray.connect`` (Ray Serve, Ray Train) checks and probes the address as
    the engine does: one line, fast, never Ray's minute of retries."""
    import time

    pytest.importorskip("ray")
    from bastion._ray import connect

    monkeypatch.delenv("BASTION_RAY_ADDRESS", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(EngineError, match="not a Ray address"):
        connect("bad address")
    with pytest.raises(EngineError, match="no Ray cluster answers at 127.0.0.1:1"):
        connect("127.0.0.1:1")
    monkeypatch.setenv("BASTION_RAY_ADDRESS", "ray://127.0.0.1:1")
    with pytest.raises(EngineError, match="no Ray cluster answers at ray://127.0.0.1:1"):
        connect()
    assert time.perf_counter() - t0 < 15
