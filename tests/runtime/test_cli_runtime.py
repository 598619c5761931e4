"""``bastion heal --once`` and ``bastion models list|promote|rollback``."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def cli():
    from bastion.cli import main
    from bastion.cli.runtime import register

    names = {c.name for c in main.app.registered_commands}
    if "heal" not in names:  # until the lead wires bastion.cli.runtime into main
        register(main.app)
    return main.run


def test_models_and_heal_commands(cli, tmp_path, mlflow_uri, zoo_digits, capsys):
    from bastion.registry.models import ModelRegistry

    reg = ModelRegistry("cli-digits", tracking_uri=mlflow_uri)
    reg.register(zoo_digits[1])
    reg.register(zoo_digits[1])
    common = ["--model", "cli-digits", "--tracking-uri", mlflow_uri]
    assert cli(["models", "promote", *common, "--version", "1", "--reason", "first"]) == 0
    assert cli(["models", "promote", *common, "--version", "2", "--reason", "second",
                "--actor", "ops"]) == 0
    assert "champion is v2" in capsys.readouterr().out
    assert cli(["models", "rollback", *common, "--reason", "bad"]) == 0
    assert "champion is v1" in capsys.readouterr().out
    assert cli(["models", "list", *common, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["aliases"] == {"champion": 1, "previous": 2}
    assert [h["alias"] for h in doc["history"]].count("champion") == 3
    assert cli(["models", "list", *common]) == 0
    assert "rollback: bad" in capsys.readouterr().out
    # errors: one line, exit 1
    assert cli(["models", "promote", *common, "--version", "9", "--reason", "x"]) == 1
    err = capsys.readouterr().err
    assert "no version 9" in err and "Traceback" not in err

    events = f"sqlite:///{tmp_path / 'ev.db'}"
    assert cli(["heal", "--once", *common, "--reference", "builtin:digits", "--events", events,
                "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["champion"] == 1 and rep["step_id"] >= 1
    assert {s["monitor"] for s in rep["signals"]} >= {"accuracy", "input_drift"}
    assert cli(["heal", "--once", *common, "--reference", "builtin:digits", "--events",
                events]) == 0
    assert "champion v1" in capsys.readouterr().err
    assert cli(["heal", "--once", *common, "--reference", "nope:x", "--events", events]) == 1


def test_heal_unknown_model_is_one_line_and_moves_no_cursor(cli, tmp_path, mlflow_uri,
                                                             zoo_digits, capsys):
    from bastion.registry.models import ModelRegistry
    from bastion.store.events import EventStore

    reg = ModelRegistry("cursor-digits", tracking_uri=mlflow_uri)
    reg.promote(reg.register(zoo_digits[1]), reason="first", actor="test")
    db = tmp_path / "ev.db"
    events = f"sqlite:///{db}"
    store = EventStore(events)
    for i in range(5):
        store.append("prediction", {"pred": i % 10})
    before = {k: store.get_state(k) for k in ("healing", "healing:cursor-digits",
                                              "healing:cursor-digitz")}
    code = cli(["heal", "--once", "--model", "cursor-digitz", "--tracking-uri", mlflow_uri,
                "--reference", "builtin:digits", "--events", events])
    err = capsys.readouterr().err
    assert code == 1
    assert "no registered model 'cursor-digitz'" in err and "cursor-digits" in err
    assert len(err.strip().splitlines()) == 1 and "champion vNone" not in err
    after = {k: store.get_state(k) for k in before}
    assert after == before  # nothing consumed

    # cursors are per model: the real model's step starts at 0 and keeps its own cursor
    assert cli(["heal", "--once", "--model", "cursor-digits", "--tracking-uri", mlflow_uri,
                "--reference", "builtin:digits", "--events", events, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["from_id"] == 0 and rep["upto_id"] >= 5
    assert store.get_state("healing:cursor-digits")["cursor"] == rep["upto_id"]
    assert store.get_state("healing") is None  # the shared key is no longer written


def test_heal_cursor_migrates_from_the_shared_key(tmp_path, mlflow_uri, zoo_digits):
    from bastion.registry.models import ModelRegistry
    from bastion.runtime.healing import HealingController
    from bastion.runtime.retrain import RetrainPipeline
    from bastion.store.events import EventStore

    store = EventStore(f"sqlite:///{tmp_path / 'old.db'}")
    for i in range(3):
        store.append("prediction", {"pred": i})
    store.set_state("healing", {"cursor": 2, "baseline_id": 1})  # written by an old Bastion
    reg = ModelRegistry("migrate-digits", tracking_uri=mlflow_uri, store=store)
    import numpy as np

    x = np.zeros((20, 1, 8, 8), np.float32)
    y = np.arange(20) % 10
    ctl = HealingController(None, store, reg, RetrainPipeline((x, y), (x, y)), monitors=[])
    assert ctl.state()["cursor"] == 2 and ctl.state()["baseline_id"] == 1
    rep = ctl.step()
    assert rep.from_id == 2
    assert store.get_state("healing:migrate-digits")["cursor"] == rep.upto_id
