"""Model registry over a real MLflow SQLite store: versions, aliases, history, rollback."""

from __future__ import annotations

import numpy as np
import pytest

from bastion.errors import BastionError
from bastion.registry.models import ModelRegistry, RegistryError
from bastion.store.events import MODEL_CHANGE, EventStore


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One MLflow store for the module (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import torch

    from bastion.models.persist import save_model
    from bastion.models.torch_model import TorchModel
    from bastion.models.zoo import build_module

    d = tmp_path_factory.mktemp("models")
    out = []
    for k in range(3):
        torch.manual_seed(k)
        m = TorchModel(build_module("mlp", input_shape=(4,), n_classes=3, hidden=(8,)),
                       n_classes=3, input_shape=(4,), name=f"m{k}")
        out.append((m, save_model(m, d / f"m{k}", arch="mlp", arch_kwargs={"hidden": [8]})))
    return out


def test_register_promote_rollback_history(tmp_path, saved, uri):
    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    reg = ModelRegistry("clf", tracking_uri=uri, store=store)
    assert reg.versions() == [] and reg.get_alias("champion") is None
    v1 = reg.register(saved[0][1], metrics={"clean_accuracy": 0.9}, tags={"stage": "base"})
    v2 = reg.register(saved[1][1])
    v3 = reg.register(saved[2][1])
    assert (v1, v2, v3) == (1, 2, 3)
    info = {v.version: v for v in reg.versions()}
    assert info[1].metrics["clean_accuracy"] == pytest.approx(0.9)
    assert info[1].tags["stage"] == "base" and info[1].tags["bastion.arch"] == "mlp"

    reg.promote(v1, reason="baseline", actor="alice")
    reg.set_alias("fallback", v1, reason="hardened", actor="alice")
    reg.promote(v2, reason="better", actor="bob")
    assert reg.aliases() == {"champion": 2, "previous": 1, "fallback": 1}
    reg.promote(v3, reason="newest", actor="bob")
    assert reg.aliases() == {"champion": 3, "previous": 2, "fallback": 1}

    # rollback to previous, then to any version
    assert reg.rollback(reason="v3 misbehaves", actor="ops") == 2
    assert reg.aliases() == {"champion": 2, "previous": 3, "fallback": 1}
    assert reg.rollback(1, reason="back to baseline", actor="ops") == 1
    assert reg.get_alias("champion") == 1 and reg.get_alias("previous") == 2
    assert reg.get_alias("fallback") == 1  # fallback kept throughout

    hist = reg.alias_history()
    champ = [(h.version, h.from_version) for h in hist if h.alias == "champion"]
    assert champ == [(1, None), (2, 1), (3, 2), (2, 3), (1, 2)]
    last = reg.alias_history("champion")[-1]
    assert last.actor == "ops" and "back to baseline" in last.reason and last.at
    # mirrored into the given event store for the timeline
    assert store.count(kinds=MODEL_CHANGE) == len(hist)
    # a second registry object (another process) sees the same history
    assert len(ModelRegistry("clf", tracking_uri=uri).alias_history()) == len(hist)

    # download by alias and by version; weights round-trip
    m = reg.load("champion")
    x = np.random.default_rng(0).uniform(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(m.predict_proba(x), saved[0][0].predict_proba(x), atol=1e-6)
    p = reg.download(3, tmp_path / "dl")
    assert (p / "bastion-model.json").is_file()


def test_registry_errors(tmp_path, saved, uri):
    reg = ModelRegistry("errs", tracking_uri=uri)
    with pytest.raises(RegistryError, match="no version 9"):
        reg.promote(9, reason="x", actor="y")
    v = reg.register(saved[0][1])
    with pytest.raises(RegistryError, match="no 'previous'"):
        reg.rollback(reason="x", actor="y")
    reg.promote(v, reason="x", actor="y")
    with pytest.raises(RegistryError, match="already the champion"):
        reg.promote(v, reason="x", actor="y")
    with pytest.raises(RegistryError, match="no alias 'nope'"):
        reg.download("nope")
    with pytest.raises(RegistryError, match="integer"):
        reg.set_alias("champion", "abc", reason="x", actor="y")
    with pytest.raises(BastionError, match="not a Bastion model folder|not found"):
        reg.register(tmp_path)
    assert reg.resolve("v1") == 1 and reg.resolve("champion") == 1
