"""Scan on the Ray engine: the same report as a local run with the same seed."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("ray")


def _same(a, b) -> None:
    assert a.robust_accuracy == b.robust_accuracy
    assert a.first_broken_by == b.first_broken_by
    assert a.first_broken_eps == b.first_broken_eps
    assert [s.queries_total for s in a.per_attack] == [s.queries_total for s in b.per_attack]
    assert [s.newly_broken for s in a.per_attack] == [s.newly_broken for s in b.per_attack]
    assert [(e.index, e.x_adv) for e in a.examples] == [(e.index, e.x_adv) for e in b.examples]


def test_scan_on_ray_equals_local(ray_cluster, digits_arrays) -> None:
    from _raymodels import zoo_digits_cnn

    from bastion.engine import get_engine
    from bastion.evaluate import scan

    x_tr, y_tr, x_te, y_te = digits_arrays
    model = zoo_digits_cnn(x_tr, y_tr)
    x, y = x_te[:48], y_te[:48]
    kw = dict(norm="linf", epsilons=[0.03, 0.08], attacks=["apgd-ce", "square"], seed=5,
              attack_options={"apgd-ce": {"steps": 8, "restarts": 2},
                              "square": {"max_queries": 60}},
              sanity_checks=False)
    eng = get_engine("ray", ray_cluster.address)
    assert eng.workers == 2
    on_ray = scan(model, x, y, engine=eng, **kw)
    local = scan(model, x, y, **kw)
    _same(local, on_ray)
    # something happened at all: some points broken by each stage, some still standing
    assert 0 < on_ray.robust_accuracy["0.08"] < on_ray.clean_accuracy
    assert {b for b in on_ray.first_broken_by if b} >= {"apgd-ce"}


def test_minimal_attack_on_ray_equals_local(ray_cluster, digits_arrays) -> None:
    from _raymodels import zoo_digits_cnn

    from bastion.engine import get_engine
    from bastion.evaluate import scan

    x_tr, y_tr, x_te, y_te = digits_arrays
    model = zoo_digits_cnn(x_tr, y_tr)
    kw = dict(norm="l2", epsilons=[0.5, 1.5], attacks=["hsj"], seed=2,
              attack_options={"hsj": {"max_queries": 150}}, sanity_checks=False)
    eng = get_engine("ray", ray_cluster.address)
    _same(scan(model, x_te[:12], y_te[:12], **kw),
          scan(model, x_te[:12], y_te[:12], engine=eng, **kw))
    assert np.isfinite(list(scan(model, x_te[:2], y_te[:2], **kw).robust_accuracy.values())).all()


def test_cli_scan_on_the_cluster(ray_cluster, tmp_path, monkeypatch) -> None:
    """`bastion scan --engine ray` against the cluster (address from BASTION_RAY_ADDRESS)."""
    import json

    from bastion.cli.main import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BASTION_RAY_ADDRESS", ray_cluster.address)
    out = tmp_path / "scan"
    code = run(["scan", "--model", "builtin:digits-mlp", "--data", "builtin:digits",
                "--limit", "16", "--eps", "0.1", "--attacks", "apgd-ce",
                "--set", "apgd-ce.steps=5", "--engine", "ray", "--out", str(out),
                "--no-track", "--quiet"])
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_points"] == 16 and "0.1" in rep["robust_accuracy"]
