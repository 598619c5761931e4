"""Model factsheets from the real registry (MLflow, SQLite in tmp) and event store: a real
scan of the served model is found by the model's SHA-256, the service's calibration and
alias history show up, missing pieces say "not recorded"; the route's roles (401, 403,
404), escaped HTML; the CLI writes both files and attaches them to the MLflow run."""

from __future__ import annotations

import json

import httpx
import pytest

from bastion.registry.models import ModelRegistry
from bastion.service.app import create_app
from bastion.service.server import ServiceThread

NAME = "svc-factsheet"


@pytest.fixture(scope="module")
def fs(svc_models, tmp_path_factory, make_config, make_keys):
    from bastion.jobs import run_scan

    m1, m2 = svc_models
    d = tmp_path_factory.mktemp("factsheet")
    mlflow = f"sqlite:///{d / 'mlflow.db'}"
    report, _, warns = run_scan(model_spec=str(m1), data_spec="builtin:digits",
                                out_dir=d / "scan", epsilons=(0.05, 0.1), limit=30,
                                preset="quick", tracking_uri=mlflow, seed=0)
    assert not warns
    cfg = make_config(m1, d / "events.db", mlflow, model_name=NAME)
    keys = make_keys(cfg.events_url, ops="admin", viewer="reader", alice="client")
    app = create_app(cfg)
    reg = ModelRegistry(NAME, tracking_uri=mlflow)
    v2 = reg.register(m2, tags={"bastion.source": "test", "bastion.parent_version": 1})
    with ServiceThread(app) as st, httpx.Client(base_url=st.url, timeout=120) as c:
        yield c, keys, report, cfg, mlflow, v2, d


def h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_factsheet_route_json_and_html(fs):
    c, keys, report, cfg, mlflow, v2, _ = fs
    r = c.get("/v1/models/1/factsheet", headers=h(keys["viewer"]))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model"]["name"] == NAME and doc["model"]["version"] == 1
    assert doc["model"]["aliases"] == ["champion"]
    scan = doc["scan"]
    assert scan["status"] == "recorded" and scan["preset"] == "quick"
    got = {r_["eps"]: r_ for r_ in scan["robust_accuracy"]}
    assert set(got) == {str(e) for e in report.robust_accuracy}
    for k, v in report.robust_accuracy.items():
        assert got[str(k)]["accuracy"] == pytest.approx(v)
        assert got[str(k)]["interval_95"] == pytest.approx(list(report.robust_interval[k]))
    cal = doc["calibration"]
    assert cal["status"] == "recorded" and cal["target_fpr"] == cfg.fpr
    assert set(cal["detectors"]) == {"outlier", "confidence", "squeeze"}
    assert all(d["threshold"] is not None and d["n"] > 0 for d in cal["detectors"].values())
    moves = doc["lineage"]["alias_moves"]
    assert moves and moves[0]["alias"] == "champion" and moves[0]["actor"]
    # what nobody recorded is said to be missing, not invented
    assert doc["privacy_audit"]["status"] == "not recorded"
    assert doc["gates"]["status"] == "not recorded"
    assert doc["lineage"]["data_sha256"] == "not recorded"
    assert any("privacy" in x for x in doc["known_limits"])
    assert any("lower bound" in x or "weaker attack" in x for x in doc["known_limits"])
    # v2 was never scanned nor served: its scan and calibration are missing; its parent
    v = c.get(f"/v1/models/{v2}/factsheet", headers=h(keys["viewer"])).json()
    assert v["scan"]["status"] == "not recorded"
    assert v["calibration"]["status"] == "not recorded"
    assert str(v["lineage"]["parent_version"]) == "1"
    assert v["healing"]["status"] == "not recorded"

    # HTML: the same facts, every value escaped, no script allowed
    r = c.post("/v1/models/promote", headers=h(keys["ops"]),
               json={"version": v2, "reason": "<script>alert(1)</script> better"})
    assert r.status_code == 200, r.text
    r = c.get(f"/v1/models/{v2}/factsheet", params={"format": "html"},
              headers=h(keys["viewer"]))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    page = r.text
    assert f"Factsheet: {NAME} v{v2}" in page and "not recorded" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    r = c.post("/v1/models/rollback", headers=h(keys["ops"]), json={"reason": "back"})
    assert r.status_code == 200


@pytest.mark.parametrize("path, who, code", [
    ("/v1/models/1/factsheet", None, 401),
    ("/v1/models/1/factsheet", "bst_not-a-real-key", 401),
    ("/v1/models/1/factsheet", "alice", 403),
    ("/v1/models/99/factsheet", "viewer", 404),
    ("/v1/models/0/factsheet", "viewer", 404),
    ("/v1/models/abc/factsheet", "viewer", 422),
    ("/v1/models/1/factsheet?format=pdf", "viewer", 422),
])
def test_factsheet_route_refuses(fs, path, who, code):
    c, keys = fs[0], fs[1]
    headers = {} if who is None else h(keys.get(who, who))
    r = c.get(path, headers=headers)
    assert r.status_code == code, r.text
    assert r.json()["error"]["code"]


def test_cli_writes_and_attaches(fs, capsys):
    from bastion.cli.main import run

    _, _, _, cfg, mlflow, _, d = fs
    out = d / "fs-cli"
    assert run(["factsheet", "--model", f"{NAME}@1", "--out", str(out), "--events",
                cfg.events_url, "--tracking-uri", mlflow]) == 0
    said = capsys.readouterr().out
    assert "attached to MLflow run" in said
    doc = json.loads((out / "factsheet.json").read_text())
    assert doc["scan"]["status"] == "recorded" and doc["calibration"]["status"] == "recorded"
    assert "Latest robustness scan" in (out / "factsheet.html").read_text()
    reg = ModelRegistry(NAME, tracking_uri=mlflow)
    run_id = doc["model"]["run_id"]
    names = {a.path for a in reg.client.list_artifacts(run_id, "factsheet")}
    assert names == {"factsheet/factsheet.json", "factsheet/factsheet.html"}
    # mistakes: one line each, nothing written
    for args, msg in [(["--model", "no-such-model"], "no registered model"),
                      (["--model", f"{NAME}@42"], "has no version 42"),
                      (["--model", f"{NAME}@nope"], "has no alias 'nope'"),
                      (["--model", "@3"], "--model is empty")]:
        assert run(["factsheet", *args, "--out", str(d / "bad"), "--tracking-uri",
                    mlflow]) == 1
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) <= 2, err
    assert not (d / "bad").exists()
    (d / "afile").write_text("x")
    assert run(["factsheet", "--model", NAME, "--out", str(d / "afile"), "--tracking-uri",
                mlflow]) == 1
    assert "is a file" in capsys.readouterr().err
