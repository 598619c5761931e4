"""The engine interface, the local engine and the engine factory.

Nothing here imports Ray: :mod:`bastion.engine.ray` does, and only when a Ray engine is
asked for.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from bastion.errors import BastionError

ENGINES: tuple[str, ...] = ("local", "ray")
#: the environment variable naming the Ray cluster when no address is given
ADDRESS_ENV = "BASTION_RAY_ADDRESS"


class EngineError(BastionError):
    """An engine that cannot be used: an unknown name, a bad or unreachable address, Ray
    not installed. The CLI exits 2 on it (a configuration mistake, nothing ran)."""

    exit_code = 2


@runtime_checkable
class Engine(Protocol):
    """Where a job's parallel parts run.

    ``map`` is the one call library code needs: ``fn(item, **shared)`` for every item, the
    results in the order of ``items``. ``fn`` must be a module-level function (it is sent
    by reference to remote workers); ``shared`` objects (a model, the data) go once into
    the engine's object store and every call gets them by reference.
    """

    name: str

    @property
    def workers(self) -> int:
        """How many items run at once (CPUs of the cluster; 1 locally)."""
        ...

    def share(self, **objects: Any) -> dict[str, Any]:
        """Put objects into the object store once; the result is a ``shared`` mapping to
        pass to several ``map`` calls."""
        ...

    def map(self, fn: Callable[..., Any], items: Sequence[Any], *,
            shared: Mapping[str, Any] | None = None) -> list[Any]:
        """``[fn(item, **shared) for item in items]``, in order."""
        ...

    def imap_unordered(self, fn: Callable[..., Any], items: Sequence[Any], *,
                       shared: Mapping[str, Any] | None = None,
                       actors: int | None = None) -> Iterator[tuple[int, Any]]:
        """``(index, fn(item, **shared))`` as each item finishes (on ``actors``
        long-lived workers on Ray), so the caller can record results as they come."""
        ...

    def map_batches(self, fn: Callable[..., Mapping[str, Any]], paths: Sequence[str], *,
                    columns: Sequence[str] | None = None, batch_size: int = 1024,
                    shared: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Stream the rows of Parquet files through ``fn(batch, **shared)`` (``batch``: a
        dict of NumPy columns, at most ``batch_size`` rows) and concatenate the returned
        columns in row order. Memory holds one batch of input per worker."""
        ...

    def rate_gate(self, rate: float | None) -> Any:
        """A gate with ``async wait()`` letting at most ``rate`` calls a second through,
        across every worker of the engine (``None``: no limit)."""
        ...


class TokenBucket:
    """A reservation token bucket: ``reserve()`` books the next free slot (``1/rate``
    seconds apart, bursts of ``burst``) and returns how long the caller must wait."""

    def __init__(self, rate: float, burst: int = 1) -> None:
        if not rate or rate <= 0:
            raise BastionError(f"the rate limit must be > 0 requests a second, got {rate}")
        self.interval = 1.0 / float(rate)
        self.burst = max(1, int(burst))
        self._next = 0.0
        self._lock = threading.Lock()

    def reserve(self) -> float:
        with self._lock:
            now = time.monotonic()
            # up to `burst` slots may be in the past (saved-up tokens)
            start = max(self._next, now - (self.burst - 1) * self.interval)
            self._next = start + self.interval
            return max(0.0, start - now)


class _LocalGate:
    def __init__(self, bucket: TokenBucket | None) -> None:
        self.bucket = bucket

    async def wait(self) -> None:
        if self.bucket is not None:
            delay = self.bucket.reserve()
            if delay > 0:
                await asyncio.sleep(delay)


def _concat(parts: list[Mapping[str, Any]]) -> dict[str, Any]:
    import numpy as np

    if not parts:
        return {}
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


def iter_parquet_batches(paths: Sequence[str], columns: Sequence[str] | None,
                         batch_size: int) -> Iterator[dict[str, Any]]:
    """The rows of Parquet files, ``batch_size`` at a time, as dicts of NumPy columns."""
    import pyarrow.parquet as pq

    for p in paths:
        f = pq.ParquetFile(p)
        for rb in f.iter_batches(batch_size=batch_size,
                                 columns=list(columns) if columns else None):
            yield {name: rb.column(i).to_numpy(zero_copy_only=False)
                   for i, name in enumerate(rb.schema.names)}


class LocalEngine:
    """Everything in this process, one item after the other. Imports no Ray."""

    name = "local"

    @property
    def workers(self) -> int:
        return 1

    def share(self, **objects: Any) -> dict[str, Any]:
        return dict(objects)

    def map(self, fn: Callable[..., Any], items: Sequence[Any], *,
            shared: Mapping[str, Any] | None = None) -> list[Any]:
        kw = dict(shared or {})
        return [fn(item, **kw) for item in items]

    def imap_unordered(self, fn: Callable[..., Any], items: Sequence[Any], *,
                       shared: Mapping[str, Any] | None = None,
                       actors: int | None = None) -> Iterator[tuple[int, Any]]:
        kw = dict(shared or {})
        for i, item in enumerate(items):
            yield i, fn(item, **kw)

    def map_batches(self, fn: Callable[..., Mapping[str, Any]], paths: Sequence[str], *,
                    columns: Sequence[str] | None = None, batch_size: int = 1024,
                    shared: Mapping[str, Any] | None = None) -> dict[str, Any]:
        kw = dict(shared or {})
        return _concat([fn(b, **kw) for b in iter_parquet_batches(paths, columns, batch_size)])

    def rate_gate(self, rate: float | None) -> Any:
        return _LocalGate(TokenBucket(rate) if rate else None)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return "LocalEngine()"


def check_address(address: str) -> str:
    """``auto``, ``ray://HOST:PORT`` or ``HOST:PORT``; anything else is an
    :class:`EngineError` naming the accepted forms."""
    a = str(address).strip()
    if a in ("auto", "local"):
        return a
    rest = a[len("ray://"):] if a.startswith("ray://") else a
    host, sep, port = rest.rpartition(":")
    if not sep or not host or "/" in rest or not port.isdigit() or not 0 < int(port) < 65536:
        raise EngineError(
            f"--ray-address {address!r} is not a Ray address",
            hint="use auto, HOST:PORT (the GCS port of `ray start --head`, e.g. "
                 "127.0.0.1:6379) or ray://HOST:PORT (Ray Client, port 10001)")
    return a


def probe_address(address: str, timeout: float = 3.0) -> None:
    """A TCP connection to ``HOST:PORT`` / ``ray://HOST:PORT`` within ``timeout`` seconds,
    else an :class:`EngineError` (an unreachable cluster fails fast, not after Ray's own
    minute of retries)."""
    import socket

    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = rest.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise EngineError(
            f"no Ray cluster answers at {address} ({type(exc).__name__}: "
            f"{exc.strerror or exc})",
            hint="start one with `ray start --head` (see the README) or fix --ray-address "
                 "/ BASTION_RAY_ADDRESS") from None


def check_engine(name: str | None, address: str | None = None) -> None:
    """Everything :func:`get_engine` would refuse, without connecting to Ray: the name,
    the address form, Ray being installed and the address answering. For a command line
    to fail before it creates anything."""
    if name is None and not address:
        return
    key = str(name or "ray").strip().lower()
    if key == "local":
        if address:
            raise EngineError("--ray-address is only for --engine ray",
                              hint="add --engine ray, or drop --ray-address")
        return
    if key != "ray":
        raise EngineError(f"unknown engine {name!r}", hint=f"use one of: {', '.join(ENGINES)}")
    addr = check_address(address or os.environ.get(ADDRESS_ENV) or "auto")
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise EngineError("the Ray engine needs Ray, which is not installed",
                          hint="pip install 'bastion[ray]'")
    if addr not in ("auto", "local"):
        probe_address(addr)


def get_engine(name: str = "local", address: str | None = None) -> Engine:
    """The engine called ``name`` (``local`` or ``ray``).

    ``address`` (Ray only): ``auto`` (the cluster started on this machine), ``HOST:PORT``
    or ``ray://HOST:PORT``; default ``$BASTION_RAY_ADDRESS``, else ``auto``. A bad or
    unreachable address raises :class:`EngineError` within seconds.
    """
    key = str(name or "local").strip().lower()
    if key == "local":
        if address:
            raise EngineError("--ray-address is only for --engine ray",
                              hint="add --engine ray, or drop --ray-address")
        return LocalEngine()
    if key != "ray":
        raise EngineError(f"unknown engine {name!r}", hint=f"use one of: {', '.join(ENGINES)}")
    addr = check_address(address or os.environ.get(ADDRESS_ENV) or "auto")
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise EngineError("the Ray engine needs Ray, which is not installed",
                          hint="pip install 'bastion[ray]'") from exc
    from bastion.engine._ray import RayEngine

    return RayEngine(addr)


def resolve_engine(engine: Any = None, address: str | None = None) -> Any:
    """An engine from what a caller passed: ``None`` (and no address) stays None (the
    caller's own in-process path), a name goes through :func:`get_engine`, an engine
    object is returned as it is."""
    if engine is None and not address:
        return None
    if engine is None or isinstance(engine, str):
        return get_engine(engine or "ray", address)
    if address:
        raise EngineError("give either an engine object or a Ray address, not both")
    return engine
