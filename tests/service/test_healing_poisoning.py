"""Issue 15, section 1, through real HTTP (httpx -> uvicorn on 127.0.0.1, healing on):
a feedback campaign stamping a 2x2 corner patch on ~400 digits, all labelled 7, must not
leave a backdoored champion; a benign drift retrain with true labels is still promoted.

The service's background loop only reloads aliases here; the test runs the healing step
itself (``heal_once``, what ``--heal-interval`` runs) once all the feedback is in, so the
retrain sees the whole campaign rather than whatever had arrived at a timer tick."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from bastion.registry.models import ModelRegistry
from bastion.runtime.healing import HealingPolicy, MonitorSettings, Rule
from bastion.runtime.retrain import RetrainConfig
from bastion.service.app import create_app
from bastion.service.server import ServiceThread

TARGET = 7
RETRAIN = RetrainConfig(epochs=2, at_steps=2, robust_points=50, robust_steps=5,
                        backdoor_steps=60, backdoor_points=60, margin=0.03, seed=0)
HEALING = HealingPolicy(
    rules=[Rule(monitor="accuracy", actions=["alert", "retrain"]),
           Rule(monitor="client_alert_rate", actions=["alert", "quarantine_client"])],
    monitors=MonitorSettings(window=200, min_window=100, mmd=False), retrain=RETRAIN,
    min_feedback_for_retrain=50)


def trigger(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[..., -2:, -2:] = 1.0
    return x


def shift(x: np.ndarray) -> np.ndarray:
    o = np.zeros_like(x)
    o[..., 1:] = x[..., :-1]
    o[..., 1:, :] = o[..., :-1, :].copy()
    return o


def attack_success(model, digits) -> float:
    keep = digits.y_test != TARGET
    return float((model.predict_proba(trigger(digits.x_test[keep])).argmax(1)
                  == TARGET).mean())


def send(c: httpx.Client, x: np.ndarray, labels: np.ndarray, client: str) -> None:
    """Predict ``x`` as ``client`` (with that client's own API key: feedback is credited
    to the key, not to a name the caller chooses) and label the answers ``labels``."""
    key = {"Authorization": f"Bearer {c.keys[client]}"}  # type: ignore[attr-defined]
    for i in range(0, len(x), 50):
        r = c.post("/v1/predict", json={"inputs": x[i:i + 50].tolist()}, headers=key)
        assert r.status_code == 200, r.text
        fb = [{"request_id": rid, "label": int(y)}
              for rid, y in zip(r.json()["request_ids"], labels[i:i + 50], strict=True)]
        r = c.post("/v1/feedback", json={"feedback": fb}, headers=key)
        assert r.status_code == 200, r.text


@pytest.fixture()
def service(request, svc_models, svc_mlflow, tmp_path, make_config):
    name = f"heal-{request.node.name}"
    cfg = make_config(svc_models[0], tmp_path / "events.db", svc_mlflow, model_name=name,
                      healing=HEALING, heal_interval_s=0.0)
    app = create_app(cfg)
    from bastion.web.keys import KeyStore

    store = KeyStore(app.state.service.store)
    admin = store.create("heal-operator", "admin")[0]
    keys = {who: store.create(who, "client")[0]
            for who in ("ann", "ben", "cat", "dan", "mallory")}
    with ServiceThread(app) as st, httpx.Client(
            base_url=st.url, timeout=120, headers={"Authorization": f"Bearer {admin}"}) as c:
        c.keys = keys  # type: ignore[attr-defined]
        yield c, app.state.service, ModelRegistry(name, tracking_uri=svc_mlflow)


def _drift(c, digits, rng, n_per_client=100, clients=("ann", "ben", "cat")):
    """A natural drift (the camera moved a pixel) reaching every honest client."""
    for who in clients:
        i = rng.choice(len(digits.x_train), n_per_client, replace=False)
        send(c, shift(digits.x_train[i]), digits.y_train[i], who)


def _retrain_audits(c):
    ev = c.get("/v1/events", params={"kind": "audit", "limit": 500}).json()["events"]
    return ([e for e in ev if e["payload"]["action"] == "retrain"],
            [e for e in ev if e["payload"]["action"] == "screen_feedback"])


def test_patch_campaign_through_http_leaves_no_backdoored_champion(service, digits):
    c, svc, reg = service
    rng = np.random.default_rng(0)
    champion0 = reg.load("champion")
    assert attack_success(champion0, digits) <= 0.05
    _drift(c, digits, rng)
    i = rng.choice(np.flatnonzero(digits.y_train != TARGET), 400, replace=False)
    send(c, trigger(digits.x_train[i]), np.full(400, TARGET), "mallory")
    versions_before = [v.version for v in reg.versions()]
    svc.heal_once()
    (rt,), screens = _retrain_audits(c)
    p = rt["payload"]
    champ = reg.load("champion")
    asr = attack_success(champ, digits)
    assert asr <= 0.05, (asr, p["decision"])
    if p["done"]:  # promoted: the poison was removed before training
        assert reg.get_alias("previous") == 1
        ev = p["evidence"]["retrain"]
        assert ev["n_removed"] + ev["n_capped"] >= 300, ev
    else:          # refused: never registered, never aliased
        assert "refused" in p["decision"] and "champion v1 kept" in p["decision"]
        assert [v.version for v in reg.versions()] == versions_before == [1]
        assert reg.get_alias("champion") == 1 and reg.get_alias("previous") is None
    # the screening is in the audit log, per target class, with what it removed and why
    (sc,) = screens
    s = sc["payload"]["evidence"]["screen"]
    assert TARGET in s["suspected_targets"]
    row7 = next(r for r in s["per_class"] if r["label"] == TARGET)
    assert row7["removed"] >= 100 and row7["strip"] > 0
    assert all(r["reasons"] and "feedback_id" in r for r in s["removed"])
    clients = sc["payload"]["evidence"]["clients"]
    assert clients["mallory"]["share"] <= 0.2 + 1e-6 and clients["mallory"]["capped_rows"] > 0
    # ... and in the dashboard's healing timeline
    tl = c.get("/v1/dashboard/data").json()["healing"]
    assert any("feedback screened" in str(e) for e in tl)


def test_benign_drift_through_http_is_still_promoted(service, digits):
    c, svc, reg = service
    rng = np.random.default_rng(1)
    champion0 = reg.load("champion")
    _drift(c, digits, rng, n_per_client=80, clients=("ann", "ben", "cat", "dan"))
    svc.heal_once()
    (rt,), _ = _retrain_audits(c)
    p = rt["payload"]
    assert p["done"], p["decision"]
    assert reg.get_alias("champion") == 2 and reg.get_alias("previous") == 1
    gates = {g["name"]: g for g in p["evidence"]["gates"]}
    assert {"class_absorption", "backdoor", "strip"} <= set(gates)
    champ = reg.load("champion")
    acc = lambda m, x: float((m.predict_proba(x).argmax(1) == digits.y_test).mean())  # noqa: E731
    assert acc(champ, shift(digits.x_test)) > acc(champion0, shift(digits.x_test)) + 0.1
    assert c.get("/v1/health").json()["champion_version"] == 2
