"""Alerts out of the real service (uvicorn on loopback): an alert written to the store by
a healing controller goes to a live receiver, while a receiver that never answers and a
dead one block neither predicts nor the background loop; deliveries show in /metrics."""

from __future__ import annotations

import time

import httpx
import numpy as np

from bastion.service.app import create_app
from bastion.service.server import ServiceThread
from bastion.store import events as ev


def test_service_delivers_alerts_and_a_dead_receiver_blocks_nothing(
        svc_models, svc_mlflow, tmp_path, digits, make_config, make_keys, receiver_factory,
        dead_url, no_admin_env):
    live, hang = receiver_factory(), receiver_factory(delay_s=20.0)
    cfg = make_config(svc_models[0], tmp_path / "events.db", svc_mlflow,
                      model_name="svc-alerts", reload_interval_s=0.2, alerting={
                          "external_url": "http://bastion.example",
                          "receivers": [
                              {"name": "am", "kind": "alertmanager", "url": live.url},
                              {"name": "hang", "kind": "slack", "url": hang.url,
                               "timeout_s": 10, "max_attempts": 2},
                              {"name": "dead", "kind": "webhook", "url": dead_url,
                               "secret": "k" * 32, "backoff_s": 0.05, "max_attempts": 2}]})
    keys = make_keys(cfg.events_url, ops="admin")
    x = np.asarray(digits.x_test[:4]).tolist()
    with ServiceThread(create_app(cfg)) as st, httpx.Client(
            base_url=st.url, timeout=30, headers={"Authorization": f"Bearer {keys['ops']}"}) as c:
        store = ev.EventStore(cfg.events_url)  # the controller's process, say
        try:
            store.append(ev.ALERT, {"monitor": "input_drift", "status": "firing",
                                    "severity": "warning", "model": "svc-alerts",
                                    "message": "inputs drifted"})
            t0 = time.perf_counter()
            got = live.wait(1)
            assert len(got) == 1 and got[0]["alerts"][0]["labels"]["monitor"] == "input_drift"
            # the hanging receiver holds its worker for 10 s: predicts stay fast
            slowest = 0.0
            for _ in range(15):
                t0 = time.perf_counter()
                assert c.post("/v1/predict", json={"inputs": x}).status_code == 200
                slowest = max(slowest, time.perf_counter() - t0)
            assert slowest < 2.0, slowest
            store.append(ev.ALERT, {"monitor": "input_drift", "status": "resolved",
                                    "model": "svc-alerts"})
            got = live.wait(2)
            assert [g["status"] for g in got] == ["firing", "resolved"]
            end = time.monotonic() + 5
            text = ""
            while time.monotonic() < end:
                text = c.get("/metrics").text
                if 'outcome="failed",receiver="dead"} 2.0' in text and \
                        'outcome="delivered",receiver="am"} 2.0' in text:
                    break
                time.sleep(0.2)
            assert 'bastion_alert_deliveries_total{outcome="delivered",receiver="am"} 2.0' \
                in text
            assert 'bastion_alert_deliveries_total{outcome="failed",receiver="dead"} 2.0' in text
            assert "bastion_event_store_errors_total 0.0" in text
            assert "bastion_traffic_on_fallback 0.0" in text
            assert "bastion_guard_fpr_scale 1.0" in text
            assert "bastion_guard_squeeze_bits 0.0" in text
            assert len(hang.posts) == 1  # still waiting on the first attempt
        finally:
            store.close()
