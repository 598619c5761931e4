"""Model versions and aliases in the MLflow model registry, with their history.

:class:`ModelRegistry` registers a Bastion model folder as a new version of one
registered model (the folder is logged as the artifacts of an MLflow run, then a model
version points at them), and moves the aliases Bastion uses:

- ``champion``: the version that answers traffic;
- ``previous``: the champion before the last promotion (the default rollback target);
- ``fallback``: the model a guard uses for flagged traffic (e.g. a hardened one); kept
  as it is by promotions and rollbacks.

MLflow stores only where an alias points *now*. Bastion keeps the history itself: each
move is a ``model_change`` event (alias, version, from_version, at, reason, actor) in
``bastion-registry.db``, an :class:`~bastion.store.events.EventStore` beside the MLflow
SQLite file (in the working folder for a remote MLflow), so every process that opens the
same registry sees the same history. With ``store``, each move is also copied there
(so it sits in the service's timeline).

The tracking URI defaults as in :mod:`bastion.registry.tracking`: the argument,
``$MLFLOW_TRACKING_URI``, then ``./mlflow.db``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.errors import BastionError, ModelError
from bastion.registry.tracking import DEFAULT_EXPERIMENT, _redact, default_tracking_uri

if TYPE_CHECKING:
    from bastion.store.events import EventStore

CHAMPION = "champion"
PREVIOUS = "previous"
FALLBACK = "fallback"
ALIASES: tuple[str, ...] = (CHAMPION, PREVIOUS, FALLBACK)

_ALIAS_EVENT = "alias"


class RegistryError(BastionError):
    """An unknown version or alias, or a registry that cannot be reached."""


@dataclass
class ModelVersionInfo:
    """One registered version."""

    version: int
    run_id: str | None
    source: str
    created_at: float
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "run_id": self.run_id, "source": self.source,
                "created_at": self.created_at, "aliases": list(self.aliases),
                "tags": dict(self.tags), "metrics": dict(self.metrics)}


@dataclass
class AliasMove:
    """One entry of the alias history. ``from_version`` is None when the alias was new."""

    alias: str
    version: int
    from_version: int | None
    at: str
    ts: float
    reason: str
    actor: str
    event_id: int

    def as_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "version": self.version,
                "from_version": self.from_version, "at": self.at, "ts": self.ts,
                "reason": self.reason, "actor": self.actor, "event_id": self.event_id}


def _history_url(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).expanduser()
        return f"sqlite:///{db.parent.resolve() / 'bastion-registry.db'}"
    return f"sqlite:///{Path.cwd() / 'bastion-registry.db'}"


def _artifact_location(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).expanduser()
        return (db.parent.resolve() / "mlartifacts").as_uri()
    return None


class ModelRegistry:
    """Versions and aliases of the registered model ``name``; see the module docs.

    Args:
        name: the registered model's name (created on first :meth:`register`).
        tracking_uri: MLflow tracking and registry URI (default: as in tracking.py).
        store: an event store that also receives each alias move (the timeline).
    """

    def __init__(self, name: str, *, tracking_uri: str | None = None,
                 store: EventStore | None = None) -> None:
        if not name or not str(name).strip():
            raise RegistryError("a registered model needs a name")
        self.name = str(name)
        self.tracking_uri = tracking_uri or default_tracking_uri()
        if self.tracking_uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from bastion.store.events import EventStore

        self.history_store = EventStore(_history_url(self.tracking_uri))
        self.store = store
        self._lock = threading.RLock()
        self._client_: Any = None

    def __repr__(self) -> str:
        return f"ModelRegistry({self.name!r}, tracking_uri={_redact(self.tracking_uri)!r})"

    # -- plumbing -------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The underlying ``mlflow.MlflowClient``."""
        if self._client_ is None:
            try:
                from mlflow import MlflowClient

                from bastion.registry.tracking import store_init_lock

                client = MlflowClient(tracking_uri=self.tracking_uri,
                                      registry_uri=self.tracking_uri)
                with store_init_lock(self.tracking_uri):  # creates/migrates the store
                    client.get_experiment_by_name(DEFAULT_EXPERIMENT)
                self._client_ = client
            except Exception as exc:
                raise RegistryError(
                    f"cannot open the MLflow registry at {_redact(self.tracking_uri)}: "
                    f"{type(exc).__name__}: {exc}",
                    hint="check --tracking-uri / MLFLOW_TRACKING_URI") from None
        return self._client_

    def _experiment_id(self) -> str:
        c = self.client
        exp = c.get_experiment_by_name(DEFAULT_EXPERIMENT)
        if exp is not None:
            return str(exp.experiment_id)
        loc = _artifact_location(self.tracking_uri)
        try:
            return str(c.create_experiment(DEFAULT_EXPERIMENT, artifact_location=loc))
        except Exception:  # created meanwhile by another process
            exp = c.get_experiment_by_name(DEFAULT_EXPERIMENT)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    self.name, tags={"bastion": "true"},
                    description="Registered by Bastion; aliases champion/previous/fallback.")
            except MlflowException:
                self.client.get_registered_model(self.name)  # created meanwhile

    def _check_version(self, version: int | str) -> int:
        from mlflow.exceptions import MlflowException

        try:
            v = int(version)
        except (TypeError, ValueError):
            raise RegistryError(f"version must be an integer, got {version!r}") from None
        try:
            self.client.get_model_version(self.name, str(v))
        except MlflowException:
            known = [m.version for m in self.versions()]
            raise RegistryError(
                f"model {self.name!r} has no version {v}",
                hint=f"known versions: {known}" if known else "register a model first",
            ) from None
        return v

    # -- versions -------------------------------------------------------------------
    def register(self, model_dir: str | os.PathLike[str], *,
                 tags: dict[str, Any] | None = None,
                 metrics: dict[str, float] | None = None,
                 description: str | None = None) -> int:
        """Log the Bastion model folder ``model_dir`` as run artifacts and create a new
        version from them; return the version number. No alias moves."""
        from bastion._util import copy_folder_safely
        from bastion.models.persist import check_model_folder
        from bastion.models.text import check_text_folder, is_text_folder

        d = Path(model_dir).expanduser()
        # a model folder with no link in it, whose skops file (if any) passes the
        # allowlist: nothing outside the folder, and no refused model, reaches MLflow
        # (a text model folder: safetensors weights only, see check_text_folder)
        meta = check_text_folder(d) if is_text_folder(d) else check_model_folder(d)
        staging = Path(tempfile.mkdtemp(prefix="bastion-register-"))
        try:
            copy_folder_safely(d, staging / "model")
            return self._register_copy(staging / "model", d, meta, tags=tags, metrics=metrics,
                                       description=description)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _register_copy(self, copy: Path, d: Path, meta: dict[str, Any], *,
                       tags: dict[str, Any] | None, metrics: dict[str, float] | None,
                       description: str | None) -> int:
        with self._lock:
            try:
                c = self.client
                exp_id = self._experiment_id()
                run = c.create_run(exp_id, run_name=f"register {self.name}",
                                   tags={"bastion.command": "register",
                                         "bastion.model": self.name})
                run_id = run.info.run_id
                try:
                    c.log_artifacts(run_id, str(copy), artifact_path="model")
                    for k, val in (metrics or {}).items():
                        c.log_metric(run_id, str(k), float(val))
                    c.log_param(run_id, "arch", str(meta.get("arch")))
                    c.set_terminated(run_id, "FINISHED")
                except Exception:
                    c.set_terminated(run_id, "FAILED")
                    raise
                self._ensure_registered_model()
                source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/model"
                vtags = {str(k): str(v) for k, v in (tags or {}).items()}
                vtags.setdefault("bastion.arch", str(meta.get("arch")))
                mv = c.create_model_version(self.name, source=source, run_id=run_id,
                                            tags=vtags, description=description)
            except BastionError:
                raise
            except Exception as exc:
                raise RegistryError(
                    f"cannot register {d} in {_redact(self.tracking_uri)}: "
                    f"{type(exc).__name__}: {exc}", hint="check the MLflow store") from None
        return int(mv.version)

    def versions(self) -> list[ModelVersionInfo]:
        """Every version of the model, oldest first, with its current aliases."""
        from mlflow.exceptions import MlflowException

        try:
            rm = self.client.get_registered_model(self.name)
        except MlflowException:
            return []
        by_version: dict[int, list[str]] = {}
        for alias, v in (getattr(rm, "aliases", None) or {}).items():
            by_version.setdefault(int(v), []).append(str(alias))
        out = []
        for mv in self.client.search_model_versions(f"name = '{self.name}'"):
            v = int(mv.version)
            metrics: dict[str, float] = {}
            if mv.run_id:
                try:
                    metrics = dict(self.client.get_run(mv.run_id).data.metrics)
                except MlflowException:
                    pass
            out.append(ModelVersionInfo(
                version=v, run_id=mv.run_id, source=str(mv.source),
                created_at=float(mv.creation_timestamp or 0) / 1000.0,
                aliases=sorted(by_version.get(v, [])), tags=dict(mv.tags or {}),
                metrics=metrics))
        return sorted(out, key=lambda m: m.version)

    def aliases(self) -> dict[str, int]:
        """Where each alias points now."""
        from mlflow.exceptions import MlflowException

        try:
            rm = self.client.get_registered_model(self.name)
        except MlflowException:
            return {}
        return {str(a): int(v) for a, v in (getattr(rm, "aliases", None) or {}).items()}

    # -- aliases --------------------------------------------------------------------
    def get_alias(self, alias: str) -> int | None:
        """The version ``alias`` points at, or None when it is not set."""
        return self.aliases().get(str(alias))

    def set_alias(self, alias: str, version: int | str, *, reason: str, actor: str) -> int:
        """Point ``alias`` at ``version`` and record the move; return the history event id."""
        alias = str(alias).strip()
        if not alias or alias.isdigit():
            raise RegistryError(f"bad alias {alias!r}",
                                hint="an alias is a name such as champion or fallback")
        with self._lock:
            v = self._check_version(version)
            old = self.get_alias(alias)
            try:
                self.client.set_registered_model_alias(self.name, alias, str(v))
            except Exception as exc:
                raise RegistryError(f"cannot set alias {alias!r}: {type(exc).__name__}: {exc}"
                                    ) from None
            return self._record(alias, v, old, reason=reason, actor=actor)

    def _record(self, alias: str, version: int, old: int | None, *, reason: str,
                actor: str) -> int:
        from bastion.store.events import MODEL_CHANGE

        payload = {"type": _ALIAS_EVENT, "model": self.name, "alias": alias,
                   "version": version, "from_version": old, "reason": str(reason),
                   "actor": str(actor)}
        eid = self.history_store.append(MODEL_CHANGE, payload, model_version=str(version))
        if self.store is not None and self.store.path != self.history_store.path:
            self.store.append(MODEL_CHANGE, payload, model_version=str(version))
        return eid

    def promote(self, version: int | str, *, reason: str, actor: str) -> int:
        """Make ``version`` the champion; the old champion becomes ``previous``;
        ``fallback`` stays. Returns the version."""
        with self._lock:
            v = self._check_version(version)
            old = self.get_alias(CHAMPION)
            if old == v:
                raise RegistryError(f"version {v} is already the champion",
                                    hint="promote another version")
            if old is not None:
                self.set_alias(PREVIOUS, old, reason=f"replaced by v{v}: {reason}",
                               actor=actor)
            self.set_alias(CHAMPION, v, reason=reason, actor=actor)
        return v

    def rollback(self, to_version: int | str | None = None, *, reason: str,
                 actor: str) -> int:
        """Make ``to_version`` (default: the ``previous`` alias) the champion again; the
        replaced champion becomes ``previous``. Returns the new champion's version."""
        with self._lock:
            if to_version is None:
                target = self.get_alias(PREVIOUS)
                if target is None:
                    raise RegistryError(f"model {self.name!r} has no 'previous' version",
                                        hint="name the version to roll back to")
            else:
                target = self._check_version(to_version)
            current = self.get_alias(CHAMPION)
            if current == target:
                raise RegistryError(f"version {target} is already the champion",
                                    hint="name another version")
            self.set_alias(CHAMPION, target, reason=f"rollback: {reason}", actor=actor)
            if current is not None:
                self.set_alias(PREVIOUS, current, reason=f"rolled back to v{target}: {reason}",
                               actor=actor)
        return target

    def alias_history(self, alias: str | None = None) -> list[AliasMove]:
        """Every recorded alias move of this model, oldest first (optionally one alias)."""
        from bastion.store.events import MODEL_CHANGE

        out = []
        for e in self.history_store.query(kinds=MODEL_CHANGE, limit=None):
            p = e.payload
            if p.get("type") != _ALIAS_EVENT or p.get("model") != self.name:
                continue
            if alias is not None and p.get("alias") != alias:
                continue
            fv = p.get("from_version")
            out.append(AliasMove(alias=str(p["alias"]), version=int(p["version"]),
                                 from_version=None if fv is None else int(fv), at=e.at,
                                 ts=e.ts, reason=str(p.get("reason", "")),
                                 actor=str(p.get("actor", "")), event_id=e.id))
        return out

    # -- getting models back ----------------------------------------------------------
    def resolve(self, ref: int | str) -> int:
        """A version number from a version (``3``, ``"3"``, ``"v3"``) or an alias."""
        if isinstance(ref, int) or (isinstance(ref, str) and ref.lstrip("v").isdigit()):
            return self._check_version(str(ref).lstrip("v"))
        v = self.get_alias(str(ref))
        if v is None:
            raise RegistryError(f"model {self.name!r} has no alias {ref!r}",
                                hint=f"aliases set: {sorted(self.aliases())}")
        return v

    def download(self, ref: int | str, dst: str | os.PathLike[str] | None = None) -> Path:
        """Download version or alias ``ref`` as a Bastion model folder; return its path
        (``dst``, or a new temporary folder). Load it with
        :func:`bastion.models.persist.load_model`."""
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        v = self.resolve(ref)
        mv = self.client.get_model_version(self.name, str(v))
        target = Path(dst) if dst is not None else Path(
            tempfile.mkdtemp(prefix=f"bastion-{self.name}-v{v}-"))
        target.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=target))
        try:
            if mv.run_id:
                local = self.client.download_artifacts(mv.run_id, "model", str(tmp))
            else:
                import mlflow.artifacts

                local = mlflow.artifacts.download_artifacts(artifact_uri=mv.source,
                                                            dst_path=str(tmp))
            for item in Path(local).iterdir():
                dest = target / item.name
                if dest.exists():
                    shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
                os.replace(item, dest)
        except Exception as exc:
            raise RegistryError(f"cannot download {self.name} v{v}: {type(exc).__name__}: "
                                f"{exc}", hint="check the MLflow artifact store") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def load(self, ref: int | str) -> Any:
        """Download and load version or alias ``ref`` (a TorchModel or SklearnModel, or a
        text model for a text model folder)."""
        from bastion.models.persist import load_model
        from bastion.models.text import is_text_folder, load_text_folder

        path = self.download(ref)
        try:
            return load_text_folder(path) if is_text_folder(path) else load_model(path)
        except ModelError:
            raise
        finally:
            shutil.rmtree(path, ignore_errors=True)
