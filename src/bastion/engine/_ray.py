"""The Ray engine: tasks for ``map``, long-lived actors for ``imap_unordered``, Ray Data
for ``map_batches``, an actor token bucket for ``rate_gate``.

Imported only when a Ray engine is asked for (``get_engine("ray")``). The cluster's
workers import Bastion themselves: install it (same version) on every node, or start the
nodes with ``PYTHONPATH`` pointing at its sources.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ray

from bastion.engine.base import EngineError, TokenBucket, _concat, probe_address
from bastion.errors import BastionError

#: seconds to wait for a TCP answer from the address before calling it unreachable
PROBE_TIMEOUT_S = 3.0
#: seconds ``ray.init`` may take before the address is called unusable
INIT_TIMEOUT_S = 30.0


def _call(fn: Callable[..., Any], item: Any, **shared: Any) -> Any:
    return fn(item, **shared)


_remote_call = ray.remote(num_cpus=1, max_retries=0)(_call)


@ray.remote(num_cpus=1)
class _Worker:
    def run(self, fn: Callable[..., Any], item: Any, **shared: Any) -> Any:
        return fn(item, **shared)


@ray.remote(num_cpus=0)
class _Bucket:
    def __init__(self, rate: float) -> None:
        self.bucket = TokenBucket(rate)

    def reserve(self) -> float:
        return self.bucket.reserve()


class _RayGate:
    """One global rate limit for every worker: an actor books the slots."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def wait(self) -> None:
        delay = await self.handle.reserve.remote()
        if delay > 0:
            await asyncio.sleep(delay)


class _NoGate:
    async def wait(self) -> None:
        return None


_CACHE: dict[str, Any] = {}


def _resolve(v: Any) -> Any:
    if isinstance(v, ray.ObjectRef):
        key = v.hex()
        if key not in _CACHE:
            if len(_CACHE) > 8:
                _CACHE.clear()
            _CACHE[key] = ray.get(v)
        return _CACHE[key]
    return v


def _batch_call(batch: dict[str, Any], *, fn: Callable[..., Any],
                refs: Mapping[str, Any]) -> dict[str, Any]:
    return dict(fn(batch, **{k: _resolve(v) for k, v in refs.items()}))


def _connect(address: str) -> None:
    if ray.is_initialized():
        return
    # no usage statistics from Bastion's runs unless the user opted in (Ray Data would
    # otherwise also poll a Prometheus server on localhost:9090 and log its absence)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address not in ("auto", "local"):
        probe_address(address, PROBE_TIMEOUT_S)
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False,
                              "ignore_reinit_error": True}
    if address == "local":
        kwargs["include_dashboard"] = False
    else:
        kwargs["address"] = address
    box: dict[str, BaseException] = {}

    def init() -> None:
        try:
            ray.init(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            box["error"] = exc

    t = threading.Thread(target=init, name="bastion-ray-init", daemon=True)
    t.start()
    t.join(INIT_TIMEOUT_S)
    if t.is_alive():
        raise EngineError(f"Ray did not connect to {address} within {INIT_TIMEOUT_S:.0f} s",
                          hint="check that the address is a Ray head node's GCS port "
                               "(or ray:// for Ray Client) and that the cluster is healthy")
    if "error" in box:
        exc = box["error"]
        text = " ".join(str(exc).split())[:300]
        if address == "auto":
            raise EngineError(f"no Ray cluster found on this machine ({text})",
                              hint="start one with `ray start --head`, or give "
                                   "--ray-address HOST:PORT / BASTION_RAY_ADDRESS") from None
        raise EngineError(f"cannot connect to the Ray cluster at {address}: "
                          f"{type(exc).__name__}: {text}",
                          hint="check --ray-address / BASTION_RAY_ADDRESS, and that this "
                               "Python's Ray version matches the cluster's") from None


def _get(refs: Any) -> Any:
    """``ray.get`` that re-raises a task's own error (a BastionError stays one) and turns
    a lost worker or node into one line."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise
    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError) as exc:
        raise EngineError(f"a Ray worker was lost: {type(exc).__name__}",
                          hint="rerun; check the cluster's memory and logs "
                               "(ray status)") from None


class RayEngine:
    """Work on a Ray cluster (see :func:`bastion.engine.get_engine`)."""

    name = "ray"

    def __init__(self, address: str = "auto") -> None:
        self.address = address
        _connect(address)
        self._gates: list[Any] = []

    @property
    def workers(self) -> int:
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def share(self, **objects: Any) -> dict[str, Any]:
        return {k: v if isinstance(v, ray.ObjectRef) else ray.put(v)
                for k, v in objects.items()}

    def map(self, fn: Callable[..., Any], items: Sequence[Any], *,
            shared: Mapping[str, Any] | None = None) -> list[Any]:
        refs = self.share(**dict(shared or {}))
        return list(_get([_remote_call.remote(fn, item, **refs) for item in items]))

    def imap_unordered(self, fn: Callable[..., Any], items: Sequence[Any], *,
                       shared: Mapping[str, Any] | None = None,
                       actors: int | None = None) -> Iterator[tuple[int, Any]]:
        refs = self.share(**dict(shared or {}))
        items = list(items)
        k = max(1, min(len(items), int(actors or self.workers)))
        pool = [_Worker.remote() for _ in range(k)]  # type: ignore[attr-defined]
        try:
            free, pending = list(pool), {}
            todo = iter(enumerate(items))
            while True:
                while free:
                    nxt = next(todo, None)
                    if nxt is None:
                        break
                    actor = free.pop()
                    pending[actor.run.remote(fn, nxt[1], **refs)] = (nxt[0], actor)
                if not pending:
                    return
                done, _ = ray.wait(list(pending), num_returns=1)
                i, actor = pending.pop(done[0])
                free.append(actor)
                yield i, _get(done[0])
        finally:
            for a in pool:
                ray.kill(a)

    def map_batches(self, fn: Callable[..., Mapping[str, Any]], paths: Sequence[str], *,
                    columns: Sequence[str] | None = None, batch_size: int = 1024,
                    shared: Mapping[str, Any] | None = None) -> dict[str, Any]:
        import ray.data

        # Ray Data's INFO lines (execution plans, log paths) are not for Bastion's users
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows come back in file order
        ctx.enable_progress_bars = False
        refs = self.share(**dict(shared or {}))
        ds = ray.data.read_parquet(list(paths))
        if columns:
            ds = ds.select_columns(list(columns))
        ds = ds.map_batches(_batch_call,  # type: ignore[arg-type]
                            batch_size=batch_size, batch_format="numpy",
                            fn_kwargs={"fn": fn, "refs": refs})
        try:
            parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            while cause is not None and not isinstance(cause, BastionError):
                cause = getattr(cause, "cause", None) or cause.__cause__
            if isinstance(cause, BastionError):
                raise cause from None
            raise
        return _concat(parts)

    def rate_gate(self, rate: float | None) -> Any:
        if not rate:
            return _NoGate()
        gate = _RayGate(_Bucket.remote(float(rate)))  # type: ignore[attr-defined]
        self._gates.append(gate)  # keep the actor alive while the engine is
        return gate

    def close(self) -> None:
        for g in self._gates:
            ray.kill(g.handle)
        self._gates.clear()

    def __repr__(self) -> str:
        return f"RayEngine(address={self.address!r})"
