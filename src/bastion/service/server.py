"""Run the service with uvicorn: :func:`serve` (blocking, for ``bastion serve``) and
:class:`ServiceThread` (on a free loopback port in a background thread, for the demo,
the tests and the benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from bastion.errors import BastionError


def _limit_options(app: Any) -> dict[str, Any]:
    """uvicorn options for the connection limits of ``app`` (its ``state.limits``, set by
    ``create_app``; the defaults otherwise)."""
    from bastion.web.limits import HttpLimits, server_options

    state = getattr(app, "state", None)
    limits = getattr(state, "limits", None) or HttpLimits()
    return server_options(limits, on_reject=getattr(state, "on_limit", None))


def serve(app: Any, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "warning", ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None) -> None:
    """Serve ``app`` until interrupted.

    NumPy's BLAS is limited to one thread first: the request path multiplies small
    matrices (a batch of inputs against the outlier detector's references), where waking
    BLAS threads costs more than the product (on 2 cores, 7 ms instead of 0.3 ms for a
    batch of 32) and competes with the model's own threads."""
    import uvicorn
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    tls: dict[str, Any] = {}
    if ssl_certfile or ssl_keyfile:
        from pathlib import Path

        for opt, f in (("--ssl-certfile", ssl_certfile), ("--ssl-keyfile", ssl_keyfile)):
            if not f or not Path(f).is_file():
                raise BastionError(f"{opt} {f or '(missing)'} is not a file",
                                   hint="TLS needs both a PEM certificate and its key")
        tls = {"ssl_certfile": str(ssl_certfile), "ssl_keyfile": str(ssl_keyfile)}

    uvicorn.run(app, host=host, port=int(port), log_level=log_level, access_log=False, **tls,
                **_limit_options(app))


class ServiceThread:
    """uvicorn serving ``app`` on ``host`` (a free port unless given) in a daemon thread.

    Use as a context manager; ``url`` is ``http://host:port``. The socket is bound
    before the thread starts, so there is no race for the port.
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning", startup_timeout: float = 60.0) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, int(port)))
        self.host, self.port = host, int(self.sock.getsockname()[1])
        cfg = uvicorn.Config(app, host=host, port=self.port, log_level=log_level,
                             access_log=False, lifespan="on", **_limit_options(app))
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"uvicorn-{self.port}", daemon=True)
        self.startup_timeout = float(startup_timeout)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServiceThread:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise BastionError("the service stopped during start-up")
            if time.monotonic() > deadline:
                raise BastionError("the service did not start in time")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> ServiceThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
