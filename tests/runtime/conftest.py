"""Fixtures for the runtime tests: one MLflow SQLite store per session (creating one
takes seconds), a zoo CNN trained on digits and saved as a Bastion model folder."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{d / 'mlflow.db'}"


@pytest.fixture(scope="session")
def zoo_digits(digits_arrays, tmp_path_factory):
    """``(model, folder)``: a zoo ``cnn`` trained on digits and saved."""
    from bastion.models.persist import save_model
    from bastion.models.torch_model import TorchModel
    from bastion.models.train import train_classifier
    from bastion.models.zoo import build_module

    x_tr, y_tr, _, _ = digits_arrays
    import torch

    torch.manual_seed(0)
    m = TorchModel(build_module("cnn", input_shape=(1, 8, 8), n_classes=10), n_classes=10,
                   input_shape=(1, 8, 8), name="digits-zoo")
    train_classifier(m, x_tr, y_tr, epochs=12, lr=3e-3, batch_size=64, seed=0)
    folder = save_model(m, tmp_path_factory.mktemp("zoo") / "cnn", arch="cnn")
    return m, folder


@pytest.fixture(scope="session")
def splits(digits_arrays):
    """Trusted reference (train), holdout, and a pool for traffic (from test)."""
    x_tr, y_tr, x_te, y_te = digits_arrays
    return (x_tr, y_tr), (x_te[:150], y_te[:150]), (x_te[150:], y_te[150:])


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """A real, throw-away PostgreSQL server for the session (the ``pgserver`` package's
    binaries, in the ``dev`` extra), on a Unix socket in a temp folder; stopped and deleted
    at the end. Skips when pgserver or psycopg is not installed."""
    import warnings

    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        pgserver = pytest.importorskip("pgserver")
    pytest.importorskip("psycopg")
    srv = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="delete")
    yield srv
    srv.cleanup()


@pytest.fixture()
def pg_url(pg_server, request) -> str:
    """A ``postgresql://`` URL to a fresh, empty schema on :func:`pg_server` (a schema,
    not a database: creating a database copies and logs a template of several MB)."""
    import re
    import uuid

    import psycopg

    name = (f"t_{re.sub(r'[^a-z0-9]+', '_', request.node.name.lower())[:40]}"
            f"_{uuid.uuid4().hex[:8]}")
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"')
    return f"{pg_server.get_uri()}&options=-csearch_path%3D{name}"
