"""Shared fixtures: small data and a quickly trained, undefended model.

Tests keep to one torch thread per process (the suite runs under pytest-xdist on two
cores) and to small data: scikit-learn's digits (1x8x8 images in [0, 1]) and slices of
MNIST from ``../shared/datasets`` when it is there.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

torch.set_num_threads(1)
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BASTION_SHARED", REPO.parent / "shared"))
os.environ["BASTION_SHARED"] = str(SHARED)  # one answer for every test module
MNIST_NPZ = SHARED / "datasets" / "mnist" / "mnist.npz"
PROMPT_INJECTION = SHARED / "datasets" / "prompt-injection"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under ``--dist loadgroup`` (test.sh) every ``xdist_group`` test must carry its group
    in its node id, or xdist spreads the group over workers (two Ray clusters at once, a
    browser tab's tests out of order). pytest 9 ignores that suffix: refuse to run then."""
    cfg = session.config
    if not (hasattr(cfg, "workerinput") and getattr(cfg.option, "loadgroup", False)):
        return  # not an xdist worker under --dist loadgroup
    bad = [i.nodeid for i in session.items
           if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if bad:
        raise pytest.UsageError(
            f"--dist loadgroup does not group {bad[0]} (and {len(bad) - 1} more): this "
            f"pytest ({pytest.__version__}) drops xdist's group suffix; use pytest < 9")


class SmallCNN(nn.Module):
    """A tiny CNN for 1x8x8 digits; undefended, so attacks must beat it."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU())
        self.out = nn.Linear(64, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    tr, te = idx[:1400], idx[1400:]
    return x[tr], y[tr], x[te], y[te]


@pytest.fixture(scope="session")
def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` of sklearn digits as 1x8x8 in [0, 1]."""
    return _digits()


@pytest.fixture(scope="session")
def digits_cnn(digits_arrays):
    """A :class:`~bastion.models.torch_model.TorchModel` trained on digits (~97% test)."""
    from bastion.models.torch_model import TorchModel

    x_tr, y_tr, _, _ = digits_arrays
    torch.manual_seed(0)
    net = SmallCNN()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[b]), yt[b]).backward()
            opt.step()
    return TorchModel(
        net, n_classes=10, input_shape=(1, 8, 8), bounds=(0.0, 1.0), name="digits-cnn"
    )


@pytest.fixture(scope="session")
def digits_eval(digits_arrays, digits_cnn):
    """The first 100 test points that ``digits_cnn`` classifies correctly: ``(x, y)``."""
    _, _, x_te, y_te = digits_arrays
    pred = digits_cnn.predict_proba(x_te).argmax(1)
    ok = np.flatnonzero(pred == y_te)[:100]
    return x_te[ok], y_te[ok]


@pytest.fixture(scope="session")
def mnist_npz() -> Path:
    """Path of the shared MNIST ``.npz`` (tests that need it fail loudly if it is absent)."""
    assert MNIST_NPZ.exists(), f"MNIST not found at {MNIST_NPZ}; set BASTION_SHARED"
    return MNIST_NPZ


class Receiver:
    """A real HTTP server on loopback that records every POST (path, headers, body) and
    answers with the next status of ``statuses`` (then 200), after ``delay_s``."""

    def __init__(self, statuses: list[int] | None = None, delay_s: float = 0.0) -> None:
        import http.server
        import threading

        self.posts: list[dict] = []
        self.statuses = list(statuses or [])
        self.delay_s = delay_s
        self.lock = threading.Lock()
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                import time

                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with rec.lock:
                    rec.posts.append({"path": self.path, "headers": dict(self.headers),
                                      "body": body})
                    code = rec.statuses.pop(0) if rec.statuses else 200
                time.sleep(rec.delay_s)
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:
                    pass

            def log_message(self, *a: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def json(self) -> list[dict]:
        import json

        with self.lock:
            return [json.loads(p["body"]) for p in self.posts]

    def wait(self, n: int, timeout_s: float = 10.0) -> list[dict]:
        """Wait for at least ``n`` posts; return the bodies."""
        import time

        end = time.monotonic() + timeout_s
        while time.monotonic() < end and len(self.posts) < n:
            time.sleep(0.02)
        return self.json()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver_factory():
    """``receiver_factory(statuses=None, delay_s=0) -> Receiver`` (closed at the end)."""
    made: list[Receiver] = []

    def make(statuses: list[int] | None = None, delay_s: float = 0.0) -> Receiver:
        r = Receiver(statuses, delay_s)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture()
def dead_url() -> str:
    """A loopback URL nobody listens on (a port bound and closed again)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"
