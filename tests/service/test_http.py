"""The service over real HTTP (httpx -> uvicorn on 127.0.0.1): every route, every kind of
bad input (a 4xx JSON error naming the problem, and the service keeps serving), admin
auth, and events surviving a restart."""

from __future__ import annotations

import json
import os
import time

import httpx
import numpy as np
import pytest

from bastion.registry.models import ModelRegistry
from bastion.service.app import create_app
from bastion.service.server import ServiceThread
from bastion.store import events as ev

TOKEN = "t0p-secret-admin-token-of-32-chars-or-more"
NAME = "svc-http"


def clean_batch(digits, n: int, start: int = 0) -> list:
    """n clean test digits as nested lists."""
    return np.asarray(digits.x_test[start:start + n]).tolist()


@pytest.fixture(scope="module")
def server(svc_models, svc_mlflow, tmp_path_factory, digits, make_config, make_keys):
    m1, m2 = svc_models
    d = tmp_path_factory.mktemp("svc-http")
    cfg = make_config(m1, d / "events.db", svc_mlflow, model_name=NAME, max_batch=64,
                      max_body_bytes=200_000, max_feedback=50, admin_token=TOKEN)
    keys = make_keys(cfg.events_url, ops="admin", viewer="reader")
    app = create_app(cfg)
    reg = ModelRegistry(NAME, tracking_uri=svc_mlflow)
    v2 = reg.register(m2, tags={"bastion.source": "test"})
    saved = os.environ.pop("BASTION_ADMIN_TOKEN", None)
    try:
        with ServiceThread(app) as st:
            # an admin key: it may label requests with any client id (a client key may not)
            with httpx.Client(base_url=st.url, timeout=60,
                              headers={"Authorization": f"Bearer {keys['ops']}"}) as c:
                c.keys = keys  # type: ignore[attr-defined]
                yield c, app.state.service, v2
    finally:
        if saved is not None:
            os.environ["BASTION_ADMIN_TOKEN"] = saved


def _ok(c: httpx.Client, digits) -> None:
    """The next good request still works."""
    r = c.post("/v1/predict", json={"inputs": clean_batch(digits, 1)})
    assert r.status_code == 200, r.text
    assert len(r.json()["labels"]) == 1


def test_predict_batch_answers_and_events(server, digits):
    c, svc, _ = server
    thr = c.get("/v1/health").json()["thresholds"]
    assert set(thr) >= {"outlier", "confidence", "squeeze"}
    r = c.post("/v1/predict", json={"inputs": clean_batch(digits, 8), "client_id": "alice"})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["client_id"] == "alice" and b["model_version"] == str(svc.champion_version)
    assert len(b["labels"]) == len(b["verdicts"]) == len(b["request_ids"]) == 8
    assert len(set(b["request_ids"])) == 8
    for p in b["predictions"]:
        if p["label"] is not None:
            assert abs(sum(p["probabilities"]) - 1) < 1e-4
            assert p["label"] == int(np.argmax(p["probabilities"]))
        assert p["verdict"] in ("allow", "flag", "block") and p["why"]
        # every detector's score; a reason for each (and only each) that fired
        assert set(p["scores"]) >= {"outlier", "confidence", "squeeze"}
        assert {x["detector"] for x in p["reasons"]} == {
            k for k, s in p["scores"].items() if k in thr and s > thr[k]} | (
            {"extraction"} if any(x["detector"] == "extraction" for x in p["reasons"]) else set())
        assert (p["verdict"] == "allow") == (p["reasons"] == [])
    acc = np.mean([lab == y for lab, y in zip(b["labels"], digits.y_test[:8], strict=True)])
    assert acc >= 0.75
    # every answer is in the event store, with its request id and client
    got = svc.store.query(kinds=ev.PREDICTION, request_id=b["request_ids"], limit=None)
    assert {e.request_id for e in got} == set(b["request_ids"])
    assert all(e.client_id == "alice" for e in got)
    # flat inputs and the X-Client-Id header work too
    flat = np.asarray(digits.x_test[:2]).reshape(2, -1).tolist()
    r = c.post("/v1/predict", json={"inputs": flat}, headers={"X-Client-Id": "bob"})
    assert r.status_code == 200 and r.json()["client_id"] == "bob"
    assert r.json()["labels"] == b["labels"][:2]


BAD = [
    # (name, raw body or json, content-type, status, code, words in the message)
    ("malformed", b'{"inputs": [[1, 2', "application/json", 400, "malformed_json", "JSON"),
    ("not-json-object", b"[1, 2, 3]", "application/json", 422, "invalid_request", ""),
    ("no-content-type", b"{oops", None, 400, "malformed_json", "JSON"),
    ("missing-inputs", {"client_id": "x"}, None, 422, "invalid_request", "inputs"),
    ("empty-inputs", {"inputs": []}, None, 422, "invalid_request", "at least 1"),
    ("ragged", {"inputs": [[0.1, 0.2], [0.3]]}, None, 422, "invalid_request", "rectangular"),
    ("strings", {"inputs": [["a", "b"]]}, None, 422, "invalid_request", "numbers"),
    ("nulls", {"inputs": [[None, 0.1]]}, None, 422, "invalid_request", "numbers"),
    ("booleans", {"inputs": [[True, False]]}, None, 422, "invalid_request", "booleans"),
    ("nan-literal", b'{"inputs": [[NaN, 0.5]]}', "application/json", 422, "invalid_request",
     "NaN"),
    ("infinity-literal", b'{"inputs": [[Infinity]]}', "application/json", 422,
     "invalid_request", "NaN or Infinity"),
    ("minus-infinity", b'{"inputs": [[-Infinity]]}', "application/json", 422,
     "invalid_request", "NaN or Infinity"),
    ("overflow", b'{"inputs": [[1e999]]}', "application/json", 422, "invalid_request",
     "Infinity"),
    ("wrong-shape", {"inputs": [[0.1, 0.2, 0.3]]}, None, 422, "bad_inputs", "shape"),
    ("out-of-bounds", {"inputs": [[[[2.0] * 8] * 8]]}, None, 422, "bad_inputs", "bounds"),
    ("negative", {"inputs": [[-0.5] * 64]}, None, 422, "bad_inputs", "bounds"),
    ("extra-field", {"inputs": [[0.0] * 64], "foo": 1}, None, 422, "invalid_request", "foo"),
    ("bad-client", {"inputs": [[0.0] * 64], "client_id": "no spaces!"}, None, 422,
     "invalid_request", "client_id"),
    ("deep-nesting", b"[" * 5000 + b"]" * 5000, "application/json", 422, None, ""),
    ("deep-object", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json",
     400, "malformed_json", "JSON"),
    # valid JSON sent as another content type is not read as JSON
    ("text-plain", b'{"inputs": [[0.0]]}', "text/plain", 400, "malformed_json", "JSON"),
    ("client-id-newline", {"inputs": [[0.0] * 64], "client_id": "ab\n"}, None, 422,
     "invalid_request", "client_id"),
    ("client-id-number", {"inputs": [[0.0] * 64], "client_id": 7}, None, 422,
     "invalid_request", "client_id"),
]


@pytest.mark.parametrize("name,body,ctype,status,code,words", BAD, ids=[b[0] for b in BAD])
def test_bad_predict_input_is_4xx_and_service_keeps_serving(server, digits, name, body, ctype,
                                                             status, code, words):
    c, svc, _ = server
    if isinstance(body, bytes):
        headers = {"content-type": ctype} if ctype else {}
        r = c.post("/v1/predict", content=body, headers=headers)
    else:
        r = c.post("/v1/predict", json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if name != "deep-nesting":
        assert r.status_code == status, r.text
    err = r.json()["error"]
    if code:
        assert err["code"] == code, err
    assert words.lower() in err["message"].lower(), err
    _ok(c, digits)


def test_oversized_batch_and_bodies(server, digits):
    c, _, _ = server
    r = c.post("/v1/predict", json={"inputs": [[0.0] * 64] * 65})
    assert r.status_code == 413 and r.json()["error"]["code"] == "batch_too_large"
    assert "64" in r.json()["error"]["message"]
    big = json.dumps({"inputs": [[0.5] * 64] * 1000}).encode()  # > 200 kB
    r = c.post("/v1/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the streamed size is counted
        for _ in range(50):
            yield b" " * 10_000

    r = c.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    _ok(c, digits)


def test_feedback_by_request_id(server, digits):
    c, svc, _ = server
    b = c.post("/v1/predict", json={"inputs": clean_batch(digits, 4, 20)}).json()
    fb = [{"request_id": r, "label": int(y)} for r, y in
          zip(b["request_ids"], digits.y_test[20:24], strict=True)]
    r = c.post("/v1/feedback", json={"feedback": fb})
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 4 and len(r.json()["event_ids"]) == 4
    assert r.json()["correct"] == sum(
        int(lab == y) for lab, y in zip(b["labels"], digits.y_test[20:24], strict=True))
    assert svc.store.count(kinds=ev.FEEDBACK, request_id=b["request_ids"]) == 4
    # unknown ids: 404 naming them, nothing stored
    n0 = svc.store.count(kinds=ev.FEEDBACK)
    r = c.post("/v1/feedback", json={"feedback": [fb[0], {"request_id": "ghost-1", "label": 1},
                                                  {"request_id": "ghost-2", "label": 2}]})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "unknown_request_ids" and "ghost-1" in err["message"]
    assert err["details"]["unknown_request_ids"] == ["ghost-1", "ghost-2"]
    assert svc.store.count(kinds=ev.FEEDBACK) == n0
    for body, status in [({"feedback": [{"request_id": b["request_ids"][0], "label": 10}]}, 422),
                         ({"feedback": [{"request_id": b["request_ids"][0], "label": -1}]}, 422),
                         ({"feedback": []}, 422), ({"labels": {}}, 422),
                         ({"feedback": [{"request_id": "x", "label": 1.5}]}, 422),
                         ({"feedback": [{"request_id": "x", "label": 1}] * 51}, 413)]:
        r = c.post("/v1/feedback", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["message"]
    _ok(c, digits)


def test_health_models_events_metrics(server, digits):
    c, svc, _ = server
    h = c.get("/v1/health").json()
    assert h["status"] == "ok" and h["model_name"] == NAME
    assert h["champion_version"] == svc.champion_version and h["events"] > 0
    m = c.get("/v1/models").json()
    assert m["aliases"]["champion"] == svc.champion_version
    assert [v["version"] for v in m["versions"]][:1] == [1]
    assert any(x["alias"] == "champion" for x in m["history"])
    t_before = time.time()
    c.post("/v1/predict", json={"inputs": clean_batch(digits, 3), "client_id": "carol"})
    e = c.get("/v1/events", params={"kind": "prediction", "client_id": "carol"}).json()
    assert e["count"] == 3 and all(x["client_id"] == "carol" for x in e["events"])
    assert "input" not in e["events"][0]["payload"]
    e2 = c.get("/v1/events", params={"client_id": "carol", "include_inputs": "true",
                                      "limit": 1}).json()
    assert e2["count"] == 1 and len(e2["events"][0]["payload"]["input"]) == 64
    e3 = c.get("/v1/events", params={"since": t_before - 0.5, "kind": "prediction,verdict",
                                      "order": "asc"}).json()
    assert e3["count"] >= 3 and [x["id"] for x in e3["events"]] == sorted(
        x["id"] for x in e3["events"])
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_before + 3600))
    assert c.get("/v1/events", params={"since": iso}).json()["count"] == 0
    for params, word in [({"kind": "bogus"}, "bogus"), ({"since": "yesterday"}, "since"),
                         ({"limit": 0}, "limit"), ({"limit": 5000}, "limit"),
                         ({"order": "sideways"}, "order")]:
        r = c.get("/v1/events", params=params)
        assert r.status_code == 422, (params, r.text)
        assert word in r.json()["error"]["message"], r.json()
    text = c.get("/metrics").text
    assert 'bastion_http_requests_total{method="POST",route="/v1/predict",status="200"}' in text
    assert "bastion_http_request_duration_seconds_bucket" in text
    assert 'bastion_predictions_total{answered_by="champion",verdict="allow"}' in text
    assert 'bastion_client_errors_total{code="malformed_json"}' in text
    assert "bastion_feedback_accuracy" in text and "bastion_champion_version" in text
    assert c.get("/nope").status_code == 404 and c.get("/nope").json()["error"]["code"]
    assert c.get("/v1/predict").status_code == 405


def test_admin_routes_auth(server, digits):
    c, svc, v2 = server
    anon = {"Authorization": ""}
    for headers in [anon, {"Authorization": "Bearer"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN}x"}]:
        for route in ("/v1/models/promote", "/v1/models/rollback"):
            r = c.post(route, json={"version": v2}, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert "WWW-Authenticate" in r.headers
            assert TOKEN not in r.text
    # a reader key is known but may not promote: 403, before the body is looked at
    r = c.post("/v1/models/promote", json={"version": "x"},
               headers={"Authorization": f"Bearer {c.keys['viewer']}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert svc.registry.get_alias("champion") == 1
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = c.post("/v1/models/promote", json={"version": 99}, headers=auth)
    assert r.status_code == 404 and "99" in r.json()["error"]["message"]
    r = c.post("/v1/models/promote", json={"version": 1}, headers=auth)
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_champion"
    r = c.post("/v1/models/promote", json={"version": v2, "reason": "test"}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["champion"] == v2 and r.json()["previous"] == 1
    assert svc.champion_version == v2  # the service swapped models at once
    p = c.post("/v1/predict", json={"inputs": clean_batch(digits, 1)}).json()
    assert p["model_version"] == str(v2)
    r = c.post("/v1/models/rollback", headers=auth)  # no body: back to previous
    assert r.status_code == 200 and r.json()["champion"] == 1
    m = c.get("/v1/models").json()
    assert m["aliases"]["champion"] == 1 and m["aliases"]["previous"] == v2
    moves = [(x["alias"], x["version"], x["actor"]) for x in m["history"]]
    assert ("champion", v2, "api") in moves and ("champion", 1, "api") in moves
    # the token never reaches the event store, the health answer or the metrics
    everything = json.dumps([e.as_dict() for e in svc.store.query(limit=None)])
    assert TOKEN not in everything
    assert TOKEN not in c.get("/v1/health").text and TOKEN not in c.get("/metrics").text
    _ok(c, digits)


def test_dashboard_page_is_self_contained(server):
    c, _, _ = server
    r = c.get("/dashboard")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp
    page = r.text
    assert "<svg" in page and "rollback-btn" in page
    for bad in ("src=\"http", "href=\"http", "@import", "cdn", "googleapis"):
        assert bad not in page.lower()
    d = c.get("/v1/dashboard/data").json()
    assert {s["name"] for s in d["traffic"]} == {"allow", "flag", "block"}
    assert sum(p["v"] for s in d["traffic"] for p in s["points"]) > 0
    assert d["models"]["model_name"] == NAME and d["health"]["status"] == "ok"


def test_restart_keeps_acknowledged_events(svc_models, svc_mlflow, tmp_path, digits, make_config,
                                          make_keys):
    m1, _ = svc_models
    cfg = make_config(m1, tmp_path / "events.db", svc_mlflow, model_name="svc-restart",
                      reload_interval_s=0)
    h = {"Authorization": f"Bearer {make_keys(cfg.events_url, ops='admin')['ops']}"}
    with ServiceThread(create_app(cfg)) as st, httpx.Client(base_url=st.url, headers=h) as c:
        ids = []
        for i in range(5):
            r = c.post("/v1/predict", json={"inputs": clean_batch(digits, 2, 2 * i),
                                            "client_id": "before"})
            assert r.status_code == 200
            ids += r.json()["request_ids"]
        fb = c.post("/v1/feedback", json={"feedback": [{"request_id": ids[0], "label": 3}]})
        assert fb.status_code == 200
    # a new server process state on the same files: everything acknowledged is there
    # (the keys too)
    with ServiceThread(create_app(cfg)) as st, httpx.Client(base_url=st.url, headers=h) as c:
        got = c.get("/v1/events", params={"client_id": "before", "kind": "prediction",
                                           "limit": 100}).json()
        assert {e["request_id"] for e in got["events"]} == set(ids)
        assert c.get("/v1/events", params={"kind": "feedback"}).json()["count"] == 1
        # feedback for a request answered before the restart is accepted
        r = c.post("/v1/feedback", json={"feedback": [{"request_id": ids[1], "label": 4}]})
        assert r.status_code == 200
        assert c.get("/v1/health").json()["champion_version"] == 1  # no re-registration
    reg = ModelRegistry("svc-restart", tracking_uri=svc_mlflow)
    assert [v.version for v in reg.versions()] == [1]
