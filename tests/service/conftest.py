"""Fixtures for the service tests: two small digits CNNs saved as model folders, one
MLflow store per session, and a helper that builds and runs the service on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def _train(seed: int, epochs: int, out: Path) -> Path:
    import torch

    from bastion.data import load_data
    from bastion.models.persist import save_model
    from bastion.models.torch_model import TorchModel
    from bastion.models.train import train_classifier
    from bastion.models.zoo import build_module

    ds = load_data("builtin:digits", seed=0)
    torch.manual_seed(seed)
    m = TorchModel(build_module("cnn", input_shape=(1, 8, 8), n_classes=10), n_classes=10,
                   input_shape=(1, 8, 8), name=f"svc-{seed}")
    train_classifier(m, ds.x_train, ds.y_train, epochs=epochs, lr=3e-3, batch_size=64,
                     seed=seed)
    return save_model(m, out, arch="cnn")


@pytest.fixture(scope="session")
def svc_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two model folders (different seeds) for promote/rollback."""
    d = tmp_path_factory.mktemp("svc-models")
    return _train(0, 6, d / "m1"), _train(1, 6, d / "m2")


@pytest.fixture(scope="session")
def svc_mlflow(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('svc-mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def digits() -> Any:
    from bastion.data import load_data

    return load_data("builtin:digits", seed=0)


def _make_config(model: Path, events_db: Path, mlflow: str, **over: Any) -> Any:
    from bastion.runtime.healing import HealingPolicy, Rule
    from bastion.service.config import ServiceConfig

    quiet_healing = HealingPolicy(rules=[
        Rule(monitor="input_drift", actions=["alert"]),
        Rule(monitor="client_alert_rate", actions=["alert", "quarantine_client"]),
    ])
    fields: dict[str, Any] = {
        "model": str(model), "reference": "builtin:digits",
        "events_url": f"sqlite:///{events_db}", "tracking_uri": mlflow,
        "reference_limit": 600, "reload_interval_s": 0.5, "healing": quiet_healing,
        # every test client sends from 127.0.0.1: the per-address rate limit would make
        # tests of other features depend on their speed (test_limits.py sets its own)
        "limits": {"rate_limit_per_s": 0},
    }
    fields.update(over)
    return ServiceConfig.build(**fields)


@pytest.fixture()
def no_admin_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("BASTION_ADMIN_TOKEN", raising=False)
    yield


@pytest.fixture(scope="session")
def make_config() -> Any:
    """``make_config(model, events_db, mlflow_uri, **overrides) -> ServiceConfig``."""
    return _make_config




def _make_keys(events_url: str, **clients: str) -> dict[str, str]:
    """Create one API key per ``name=role`` in the store at ``events_url``; return the
    tokens by name."""
    from bastion.web.keys import KeyStore

    with KeyStore(events_url) as ks:
        return {name: ks.create(name, role)[0] for name, role in clients.items()}


@pytest.fixture(scope="session")
def make_keys() -> Any:
    """``make_keys(events_url, alice="client", ops="admin", ...) -> {name: token}``."""
    return _make_keys


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
