"""The guarded model as a Ray Serve deployment: ``bastion serve --engine ray --replicas N``.

Each replica runs the same FastAPI app as ``bastion serve`` (:func:`bastion.service.app.
create_app`, handed to Serve by ``serve.ingress``), behind Serve's HTTP proxy. What one
process kept to itself is shared, so N replicas act as one service:

- **events, keys, quarantine, traffic routing, the registry's aliases**: in the event
  store, which must be PostgreSQL (:func:`check_ray_config`: SQLite is one file on one
  machine, and its write lock does not scale across processes). Every answer is
  written durably before it is sent, so a replica that dies loses no acknowledged
  event. A replica re-reads the quarantine list at most a second after another changed
  it (the one that lifted a quarantine sees it at once).
- **per-key rate limits**: one token bucket per key in a named Ray actor
  (:class:`ClientState`); a replica *leases* a few tokens at a time
  (:class:`LeasedBuckets`) and spends them locally, so the cluster as a whole never
  grants more than ``rate * t + burst`` (tokens idle in a replica only make the limit
  stricter for a moment) and the actor is asked once per ``chunk`` requests, not per
  request.
- **query-pattern (extraction) tests**: one :class:`~bastion.service.core.
  ExtractionWatch` in the same actor (:class:`RemoteExtraction`), so a client whose
  queries are spread over replicas is tested on its whole stream.
- **the healing controller**: once per cluster, in a named actor (:class:`Healer`)
  running an ordinary service's background loop; the replicas run none and pick up its
  promotions by polling the aliases (``reload_interval_s``). The controller's lease in
  the store still makes a second one (``bastion heal`` elsewhere) wait its turn.

If the state actor dies, Ray restarts it empty (buckets full, extraction windows
restarted); meanwhile a replica falls back to its own bucket (``rate / replicas``) and
its own watch, logging it once, and keeps answering.

Serve's proxy owns the HTTP connections, so the connection-layer limits of
:mod:`bastion.web.limits` (header/body timeouts, connection cap) do not apply under Ray;
the request layer (rate limit, in-flight cap, deadline) does.

Ray is imported lazily: a local service never needs it (extra ``ray``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion._ray import NAMESPACE, connect
from bastion.errors import BastionError
from bastion.service.config import ServiceConfig

log = logging.getLogger("bastion.service.ray")

REPLICA_HEADER = b"x-bastion-replica"
#: how long a replica waits for the state actor before falling back to its own state
ACTOR_TIMEOUT_S = 5.0

__all__ = ["ClientState", "Healer", "LeasedBuckets", "RayService", "RemoteExtraction",
           "check_ray_config", "connect", "serve_on_ray"]


def check_ray_config(cfg: ServiceConfig) -> None:
    """Refuse what cannot work across processes or nodes: a SQLite event store."""
    scheme = cfg.events_url.split(":", 1)[0].lower()
    if not scheme.startswith("postgres"):
        raise BastionError(
            "--engine ray needs a PostgreSQL event store: SQLite cannot be shared across "
            "processes/nodes",
            hint="pass --events postgresql://USER:PASSWORD@HOST:PORT/DB (pip install "
            "'bastion[postgres]')")


def _import_ray() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        raise BastionError("--engine ray needs Ray Serve",
                           hint="pip install 'bastion[ray]'") from None
    return ray


def _cfg_json(cfg: ServiceConfig) -> str:
    """``cfg`` as JSON for the replicas and actors, the admin token included (a
    ``SecretStr`` dumps as stars; ``$BASTION_ADMIN_TOKEN`` of the driver does not reach
    processes the cluster started). It travels inside the deployment's definition, in
    the cluster's GCS, as Serve stores every deployment's arguments."""
    import json

    doc = json.loads(cfg.model_dump_json())
    tok = cfg.token()
    doc["admin_token"] = tok
    return json.dumps(doc)


def _names(app_name: str) -> tuple[str, str]:
    return f"bastion-clients:{app_name}", f"bastion-healer:{app_name}"


# -- shared per-client state ------------------------------------------------------------
class ClientState:
    """The per-client state every replica shares (run as a named Ray actor): the global
    token buckets and the extraction watch. Plain Python; :func:`serve_on_ray` makes it
    an actor."""

    def __init__(self, cfg_json: str) -> None:
        from bastion.service.core import ExtractionWatch

        cfg = ServiceConfig.model_validate_json(cfg_json)
        from bastion.web.limits import TokenBuckets

        lim = cfg.limits
        self.buckets = TokenBuckets(lim.rate_limit_per_s, lim.rate_limit_burst,
                                    max_keys=lim.max_keys)
        self.watch = ExtractionWatch(delta=cfg.extraction_delta,
                                     min_queries=cfg.extraction_min_queries,
                                     window=cfg.extraction_window)
        self.queries: dict[str, int] = {}

    def lease(self, key: str, n: int) -> tuple[int, float]:
        """Take up to ``n`` tokens of ``key``'s bucket (the cluster's one bucket a key):
        ``(granted, seconds until one more is there)``."""
        return self.buckets.lease(key, n)

    def observe_many(self, client_id: str, xs: Any) -> dict[str, Any]:
        self.queries[client_id] = self.queries.get(client_id, 0) + len(xs)
        return self.watch.observe_many(client_id, xs)

    def flagged(self) -> list[str]:
        return self.watch.flagged()

    def stats(self, client_id: str) -> dict[str, Any]:
        """How many queries of ``client_id`` the watch saw (over every replica)."""
        return {"queries": self.queries.get(client_id, 0),
                "flagged": client_id in self.watch.flagged()}


class _ActorLink:
    """A replica's handle on the state actor, looked up by name on first use and again
    after a failure; failures are logged once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._actor: Any = None
        self._warned = False
        self._lock = threading.Lock()

    def call(self, method: str, *args: Any) -> Any:
        import ray

        with self._lock:
            if self._actor is None:
                self._actor = ray.get_actor(self.name, namespace=NAMESPACE)
            actor = self._actor
        try:
            out = ray.get(getattr(actor, method).remote(*args), timeout=ACTOR_TIMEOUT_S)
            self._warned = False
            return out
        except Exception:
            with self._lock:
                self._actor = None
            raise

    def warn(self, what: str, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("the shared client state (%s) is unreachable (%s: %s): %s until it "
                        "is back", self.name, type(exc).__name__, exc, what)


class LeasedBuckets:
    """Token buckets backed by :class:`ClientState` (see the module docs): ``take`` has
    the contract of :meth:`bastion.web.limits.TokenBuckets.take`."""

    def __init__(self, link: _ActorLink, *, rate: float, burst: int, replicas: int,
                 max_keys: int = 100_000) -> None:
        from bastion.web.limits import TokenBuckets

        self.link = link
        self.rate = float(rate)
        # a few requests' worth per lease: at most a quarter of a burst per replica, and
        # about 50 ms of the rate
        self.chunk = max(1, min(int(burst) // (4 * max(replicas, 1)), int(rate * 0.05)))
        self.max_keys = int(max_keys)
        self._held: dict[str, int] = {}
        self._until: dict[str, float] = {}  # key -> no token before this (monotonic)
        self._lock = threading.Lock()
        self._fallback = TokenBuckets(rate / max(replicas, 1), max(1, burst // max(replicas, 1)),
                                      max_keys)

    def take(self, key: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            held = self._held.get(key, 0)
            if held >= 1:
                self._held[key] = held - 1
                return 0.0
            until = self._until.get(key)
            if until is not None and now < until:
                return until - now
        try:
            granted, wait = self.link.call("lease", key, self.chunk)
        except Exception as exc:
            self.link.warn("rate limits are per replica (rate / replicas)", exc)
            return self._fallback.take(key, now)
        with self._lock:
            if len(self._held) >= self.max_keys:
                self._held.pop(next(iter(self._held)))
                self._until.clear()
            if granted >= 1:
                self._held[key] = self._held.get(key, 0) + int(granted) - 1
                self._until.pop(key, None)
                return 0.0
            self._until[key] = now + float(wait)
            return float(wait)


class RemoteExtraction:
    """The extraction watch of :class:`ClientState`, with the interface the guard asks
    of an extraction detector (``observe_many``, ``threshold_``, ``flagged``)."""

    def __init__(self, link: _ActorLink, cfg: ServiceConfig) -> None:
        from bastion.service.core import ExtractionWatch

        self.link = link
        self.threshold_ = 1.0 - float(cfg.extraction_delta)
        self._local = ExtractionWatch(delta=cfg.extraction_delta,
                                      min_queries=cfg.extraction_min_queries,
                                      window=cfg.extraction_window)

    def observe_many(self, client_id: str, xs: Any) -> dict[str, Any]:
        import numpy as np

        try:
            return dict(self.link.call("observe_many", client_id,
                                       np.ascontiguousarray(xs, dtype=np.float32)))
        except Exception as exc:
            self.link.warn("extraction tests see this replica's queries only", exc)
            return self._local.observe_many(client_id, xs)

    def observe(self, client_id: str, x: Any) -> dict[str, Any]:
        import numpy as np

        return self.observe_many(client_id, np.asarray(x)[None])

    def flagged(self) -> list[str]:
        try:
            return list(self.link.call("flagged"))
        except Exception:
            return self._local.flagged()


# -- the healing controller, once per cluster -------------------------------------------
class Healer:
    """One service without HTTP whose background loop runs the healing controller every
    ``heal_interval_s`` (run as a named Ray actor: one per cluster and app)."""

    def __init__(self, cfg_json: str) -> None:
        from bastion.service.core import BastionService

        cfg = ServiceConfig.model_validate_json(cfg_json)
        self.service = BastionService(cfg)
        self.service.start()

    def status(self) -> dict[str, Any]:
        s = self.service
        return {"champion": s.champion_version, "last_error": s.last_error,
                "heal_interval_s": s.config.heal_interval_s}

    def heal_once(self) -> dict[str, Any]:
        rep = self.service.heal_once()
        return rep.model_dump(mode="json") if hasattr(rep, "model_dump") else {}

    def close(self) -> None:
        self.service.close()


# -- the replicas -----------------------------------------------------------------------
def _replica_app(cfg_json: str, app_name: str, replicas: int) -> Any:
    """The ASGI app of one replica: the service app with the shared state plugged in and
    an ``X-Bastion-Replica`` header naming the replica that answered."""
    from bastion.service.app import create_app
    from bastion.service.core import BastionService

    cfg = ServiceConfig.model_validate_json(cfg_json)
    link = _ActorLink(_names(app_name)[0])
    extraction = RemoteExtraction(link, cfg) if (cfg.extraction and cfg.guard) else None
    lim = cfg.limits
    buckets = LeasedBuckets(link, rate=lim.rate_limit_per_s, burst=lim.rate_limit_burst,
                            replicas=replicas, max_keys=lim.max_keys) \
        if lim.rate_limit_per_s > 0 else None
    service = BastionService(cfg, extraction=extraction)
    app = create_app(service=service, buckets=buckets)
    try:
        from ray import serve

        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:
        replica = f"pid{os.getpid()}"
    return _ReplicaHeader(app, replica)


class _ReplicaHeader:
    """Pure ASGI: adds ``X-Bastion-Replica`` to every answer (which replica answered:
    for operators and for the tests of shared state); other attributes pass through."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.replica = replica.encode()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_w(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REPLICA_HEADER, self.replica)]}
            await send(message)

        await self.app(scope, receive, send_w)


def _deployment(cfg_json: str, app_name: str, replicas: int, num_cpus: float,
                max_ongoing: int) -> Any:
    from ray import serve

    def build() -> Any:
        return _replica_app(cfg_json, app_name, replicas)

    @serve.ingress(build)
    class BastionReplica:
        pass

    return serve.deployment(BastionReplica, name="bastion", num_replicas=replicas,
                            max_ongoing_requests=max_ongoing,
                            ray_actor_options={"num_cpus": num_cpus})


# -- the driver -------------------------------------------------------------------------
def _prepare(cfg: ServiceConfig) -> ServiceConfig:
    """Resolve in the driver what every replica must agree on: absolute paths, the
    registered model and its champion (registered once here, not by N replicas at
    once), a reachable store. Returns the config the replicas get."""
    from bastion.data import load_data
    from bastion.registry.models import ModelRegistry
    from bastion.registry.tracking import default_tracking_uri
    from bastion.service.core import default_model_name, ensure_champion
    from bastion.store.events import EventStore

    check_ray_config(cfg)
    load_data(cfg.reference, seed=cfg.seed)  # a bad spec is one line here, not N tracebacks
    tracking = cfg.tracking_uri or default_tracking_uri()
    if tracking.startswith("sqlite:///") and not tracking.startswith("sqlite:////"):
        tracking = f"sqlite:///{Path(tracking[len('sqlite:///'):]).resolve()}"
    name = cfg.model_name or default_model_name(cfg.model)
    spec = cfg.model
    if not spec.startswith(("registry:", "builtin:")):
        spec = str(Path(spec).expanduser().resolve())
    reference = cfg.reference
    with EventStore(cfg.events_url) as store:
        ensure_champion(ModelRegistry(name, tracking_uri=tracking, store=store), spec)
    return cfg.model_copy(update={"model": f"registry:{name}", "model_name": name,
                                  "tracking_uri": tracking, "reference": reference})


def _proxy_address(ray: Any, host: str, port: int) -> tuple[str, int]:
    """The host and port Serve's HTTP proxy really listens on."""
    try:
        from ray.serve.context import _get_global_client

        client: Any = _get_global_client()
        cfg = ray.get(client._controller.get_http_config.remote(), timeout=10)
        if int(cfg.port) != int(port) or cfg.host != host:
            log.warning("Ray Serve runs on this cluster already, on %s:%s: the service is "
                        "there, not on %s:%s", cfg.host, cfg.port, host, port)
        return str(cfg.host), int(cfg.port)
    except Exception:  # an internal API: keep what was asked for
        return host, int(port)


@dataclass
class RayService:
    """A running deployment: its URL, the app's name; :meth:`stop` deletes it."""

    url: str
    app_name: str
    replicas: int
    model_name: str
    heal: bool
    #: the state actor's and the healer's handles: a named actor that is not detached
    #: lives as long as a handle on it does (this driver's)
    actors: tuple[Any, ...] = ()

    def state_actor(self) -> Any:
        import ray

        return ray.get_actor(_names(self.app_name)[0], namespace=NAMESPACE)

    def healer(self) -> Any:
        import ray

        return ray.get_actor(_names(self.app_name)[1], namespace=NAMESPACE)

    def replica_actors(self) -> list[Any]:
        """The replicas' Ray actor handles (to kill one in a test or a drill)."""
        import ray

        out = []
        for a in ray.util.list_named_actors(all_namespaces=True):
            if a["name"].startswith(f"SERVE_REPLICA::{self.app_name}#"):
                out.append(ray.get_actor(a["name"], namespace=a["namespace"]))
        return out

    def wait(self) -> None:
        """Block until interrupted (Ctrl-C), then stop."""
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.delete(self.app_name)
        except Exception as exc:  # the cluster may be gone already
            log.warning("could not delete the Serve app %s: %s", self.app_name, exc)
        for name in _names(self.app_name):
            try:
                a = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                continue
            if name.startswith("bastion-healer"):
                try:
                    ray.get(a.close.remote(), timeout=30)
                except Exception:  # noqa: S110 - killed below in any case
                    pass
            ray.kill(a)


def serve_on_ray(cfg: ServiceConfig, *, replicas: int = 2, address: str | None = None,
                 host: str = "127.0.0.1", port: int = 8000, app_name: str = "bastion",
                 num_cpus: float = 1.0) -> RayService:
    """Deploy the guarded service on the Ray cluster at ``address`` with ``replicas``
    replicas behind Serve's proxy on ``host:port``; return once every replica answers.

    Raises:
        BastionError: a SQLite event store, no Ray, an unreachable cluster, a bad model or
            reference (one line each, before anything is deployed).
    """
    from bastion.web.auth import check_admin_token

    if replicas < 1:
        raise BastionError(f"--replicas {replicas} is not allowed", hint="at least 1")
    check_ray_config(cfg)
    check_admin_token(cfg.token())
    ray = _import_ray()
    from ray import serve

    rcfg = _prepare(cfg)
    # the replicas run no controller: one Healer does, for the whole cluster
    replica_cfg = rcfg.model_copy(update={"heal_interval_s": 0.0})
    connect(address)
    state_name, healer_name = _names(app_name)
    opts = {"namespace": NAMESPACE, "get_if_exists": True, "num_cpus": 0,
            "max_restarts": -1}
    actors = [ray.remote(ClientState).options(name=state_name, **opts).remote(
        replica_cfg.model_dump_json())]  # no secret needed there
    heal = rcfg.heal_interval_s > 0
    if heal:
        h = ray.remote(Healer).options(name=healer_name, **opts).remote(_cfg_json(rcfg))
        ray.get(h.status.remote())
        actors.append(h)
    try:
        serve.start(http_options={"host": host, "port": int(port)})
        dep = _deployment(_cfg_json(replica_cfg), app_name, replicas, num_cpus,
                          max_ongoing=rcfg.limits.max_inflight)
        serve.run(dep.bind(), name=app_name, route_prefix="/")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BastionError(f"the Ray Serve deployment failed: {first}",
                           hint="see the replica logs under the cluster's temp dir "
                           "(session_latest/logs/serve)") from None
    # Serve's proxy is one per cluster: when Serve ran already, it keeps its own address
    host, port = _proxy_address(ray, host, port)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104
    return RayService(url=f"http://{shown}:{port}", app_name=app_name, replicas=replicas,
                      model_name=str(rcfg.model_name), heal=heal, actors=tuple(actors))
