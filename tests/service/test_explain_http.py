"""POST /v1/predict with "explain": true over real HTTP: integrated-gradient attributions
per input, the nearest clean reference for a flagged input (recorded for the dashboard),
a separate, lower per-client budget (429 with Retry-After while plain predicts go on),
and 4xx for bad requests."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from bastion.service.app import create_app
from bastion.service.server import ServiceThread


@pytest.fixture(scope="module")
def live(svc_models, svc_mlflow, tmp_path_factory, make_config, make_keys):
    d = tmp_path_factory.mktemp("svc-explain")
    cfg = make_config(svc_models[0], d / "events.db", svc_mlflow, model_name="svc-explain",
                      explain_rate_per_s=0.01, explain_burst=2, explain_max_batch=4)
    keys = make_keys(cfg.events_url, alice="client", bob="client", viewer="reader")
    with ServiceThread(create_app(cfg)) as st, httpx.Client(base_url=st.url, timeout=120) as c:
        yield c, keys


def h(token):
    return {"Authorization": f"Bearer {token}"}


def test_explanations_and_the_reference_of_a_flagged_input(live, digits):
    c, keys = live
    noisy = np.random.default_rng(0).uniform(0, 1, size=(1, 1, 8, 8))
    x = np.concatenate([np.asarray(digits.x_test[:2]), noisy]).tolist()
    r = c.post("/v1/predict", json={"inputs": x, "explain": True}, headers=h(keys["alice"]))
    assert r.status_code == 200, r.text
    doc = r.json()
    ex = doc["explanations"]
    assert len(ex) == 3 and doc["verdicts"][2] != "allow"
    for e, label, verdict in zip(ex, doc["labels"], doc["verdicts"], strict=True):
        assert e["method"] == "integrated_gradients" and e["explained_model"] == "champion"
        assert np.asarray(e["attribution"]).shape == (1, 8, 8)
        assert e["target"] == label
        assert (e["reference"] is None) == (verdict == "allow")
    ref = ex[2]["reference"]
    assert ref["distance"] > 0 and np.asarray(ref["attribution"]).shape == (1, 8, 8)
    # recorded for the dashboard: the attribution and the trusted reference, never the
    # client's input
    dd = c.get("/v1/dashboard/data", headers=h(keys["viewer"])).json()
    got = [e for e in dd["explanations"] if e["request_id"] == doc["request_ids"][2]]
    assert len(got) == 1
    p = got[0]["payload"]
    assert p["verdict"] != "allow" and p["shape"] == [1, 8, 8]
    assert np.asarray(p["reference"]["reference_input"]).shape == (1, 8, 8)
    assert "input" not in p and "inputs" not in p
    assert c.get("/v1/events", params={"kind": "explanation"},
                 headers=h(keys["viewer"])).json()["count"] >= 1
    # a plain predict has no explanations
    r = c.post("/v1/predict", json={"inputs": x[:1]}, headers=h(keys["alice"]))
    assert r.json().get("explanations") is None


def test_explain_budget_is_separate_and_per_client(live, digits):
    c, keys = live
    x = np.asarray(digits.x_test[:1]).tolist()
    codes = [c.post("/v1/predict", json={"inputs": x, "explain": True},
                    headers=h(keys["bob"])).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    r = c.post("/v1/predict", json={"inputs": x, "explain": True}, headers=h(keys["bob"]))
    assert r.status_code == 429 and r.json()["error"]["code"] == "explain_rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    # plain predicts of the same client are not limited by it
    assert all(c.post("/v1/predict", json={"inputs": x}, headers=h(keys["bob"])).status_code
               == 200 for _ in range(5))


@pytest.mark.parametrize("body, code", [
    ({"explain": "yes"}, 422),
    ({"explain": True, "n": 5}, 413),
    ({"explain": True, "inputs": [[1, 2, 3]]}, 422),
])
def test_bad_explain_requests_are_4xx(live, digits, body, code):
    c, keys = live
    n = body.pop("n", 1)
    doc = {"inputs": np.asarray(digits.x_test[:n]).tolist(), **body}
    r = c.post("/v1/predict", json=doc, headers=h(keys["alice"]))
    assert r.status_code == code, r.text
    assert r.json()["error"]["code"]
