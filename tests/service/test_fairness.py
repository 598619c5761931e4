"""Group fairness in monitoring on a real tabular service (a scikit-learn model served over
HTTP, CSV reference): selection and error rates by the protected column's groups with
intervals (fairlearn), no alarm on balanced traffic, an alert when one group's inputs
shift and the gap grows; a bad protected column is one clear error at start-up."""

from __future__ import annotations

import httpx
import numpy as np
import pandas as pd
import pytest

from bastion.errors import BastionError
from bastion.runtime.fairness import group_rates
from bastion.runtime.healing import HealingPolicy, MonitorSettings, Rule
from bastion.service.app import create_app
from bastion.service.server import ServiceThread
from bastion.store import events as ev


def table(n: int, rng, shift_group1: float = 0.0) -> pd.DataFrame:
    g = rng.integers(0, 2, n)
    x1 = rng.uniform(0, 1, n) - shift_group1 * g
    x2 = rng.uniform(0, 1, n)
    y = (x1 + x2 > 1.0).astype(int)
    return pd.DataFrame({"x1": np.clip(x1, 0, 1), "x2": x2, "group": g.astype(float),
                         "label": y})


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    from sklearn.linear_model import LogisticRegression

    from bastion.models.persist import save_sklearn
    from bastion.models.sklearn_model import SklearnModel

    d = tmp_path_factory.mktemp("fair")
    rng = np.random.default_rng(0)
    df = table(2000, rng)
    df.to_csv(d / "loans.csv", index=False)
    est = LogisticRegression(C=10).fit(df[["x1", "x2", "group"]].to_numpy(np.float32),
                                       df["label"])
    folder = save_sklearn(SklearnModel(est, n_classes=2, input_shape=(3,), name="loans"),
                          d / "model")
    return d, folder


def test_group_rates_with_intervals():
    r = group_rates(np.asarray(["a"] * 100 + ["b"] * 50), np.r_[np.ones(30), np.zeros(70),
                                                                np.ones(40), np.zeros(10)])
    assert r["a"]["n"] == 100 and r["a"]["rate"] == 0.3 and r["b"]["rate"] == 0.8
    lo, hi = r["a"]["interval_95"]
    assert lo < 0.3 < hi and hi - lo < 0.2


def test_fairness_gap_drift_alerts_through_the_service(tabular, svc_mlflow, make_config,
                                                       make_keys, no_admin_env):
    d, folder = tabular
    pol = HealingPolicy(rules=[Rule(monitor="fairness", actions=["alert"])],
                        monitors=MonitorSettings(mmd=False))
    cfg = make_config(folder, d / "events.db", svc_mlflow, model_name="loans",
                      reference=f"csv:{d / 'loans.csv'}", detectors=["outlier"],
                      extraction=False, healing=pol,
                      fairness={"protected_column": "group", "min_group": 40,
                                "window": 400, "tolerance": 0.1})
    keys = make_keys(cfg.events_url, bank="client")
    rng = np.random.default_rng(1)
    app = create_app(cfg)
    svc = app.state.service
    with ServiceThread(app) as st, httpx.Client(
            base_url=st.url, timeout=60, headers={"Authorization": f"Bearer {keys['bank']}"}
    ) as c:
        def send(df: pd.DataFrame) -> None:
            x = df[["x1", "x2", "group"]].to_numpy(np.float32)
            for i in range(0, len(x), 100):
                r = c.post("/v1/predict", json={"inputs": x[i:i + 100].tolist()})
                assert r.status_code == 200, r.text
                fb = [{"request_id": rid, "label": int(y)} for rid, y in
                      zip(r.json()["request_ids"], df["label"].iloc[i:i + 100], strict=True)]
                assert c.post("/v1/feedback", json={"feedback": fb}).status_code == 200

        send(table(300, rng))
        rep = svc.heal_once()
        sig = next(s for s in rep.signals if s.monitor == "fairness")
        assert not sig.fired, sig.message
        sel = sig.evidence["selection_rate"]
        assert set(sel["by_group"]) == {"0", "1"}
        for grp in sel["by_group"].values():
            assert grp["n"] >= 100 and grp["interval_95"][0] <= grp["rate"] <= \
                grp["interval_95"][1]
        assert abs(sel["gap"]["gap"]) < 0.15 and "reference_gap" in sel
        assert set(sig.evidence["error_rate"]["by_group"]) == {"0", "1"}

        # group 1's inputs shift (an upstream change hits one group): its selection rate
        # drops, the gap grows beyond the reference's and the monitor alerts
        send(table(400, rng, shift_group1=0.5))
        rep = svc.heal_once()
        sig = next(s for s in rep.signals if s.monitor == "fairness")
        assert sig.fired, sig.message
        assert "selection_rate gap" in sig.message and "group=0" in sig.message
        assert sig.value > 0.2
        alerts = [e for e in svc.store.query(kinds=ev.ALERT, limit=None)
                  if e.payload["monitor"] == "fairness"]
        assert len(alerts) == 1 and alerts[0].payload["status"] == "firing"
        assert 'bastion_monitor_fired{monitor="fairness"} 1.0' in svc.metrics.render().decode()


def test_bad_protected_column_is_one_clear_error(tabular, svc_mlflow, make_config,
                                                 no_admin_env, svc_models, tmp_path):
    d, folder = tabular
    cfg = make_config(folder, tmp_path / "e.db", svc_mlflow, model_name="loans-bad",
                      reference=f"csv:{d / 'loans.csv'}", detectors=["outlier"],
                      extraction=False, fairness={"protected_column": "gender"})
    with pytest.raises(BastionError, match="protected column 'gender' is not an input "
                                           "feature") as ei:
        create_app(cfg)
    assert "\n" not in str(ei.value)
    # an image model has no columns
    cfg = make_config(svc_models[0], tmp_path / "e2.db", svc_mlflow, model_name="img-fair",
                      fairness={"protected_column": "group"})
    with pytest.raises(BastionError, match="tabular reference with named columns"):
        create_app(cfg)
