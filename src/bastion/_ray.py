"""Connecting to a Ray cluster, for the code that runs on Ray (the Serve deployment,
training on Ray Train). Ray is imported only here and only when called: a local run
needs no Ray installed (extra ``ray``)."""

from __future__ import annotations

import os
from typing import Any

from bastion.errors import BastionError

#: where ``--ray-address`` defaults from
ADDRESS_ENV = "BASTION_RAY_ADDRESS"
#: the namespace of Bastion's named actors
NAMESPACE = "bastion"


def import_ray(what: str = "--engine ray") -> Any:
    try:
        import ray
    except ImportError:
        raise BastionError(f"{what} needs Ray", hint="pip install 'bastion[ray]'") from None
    return ray


def connect(address: str | None = None) -> Any:
    """Connect this process to the Ray cluster at ``address`` (``auto``, ``HOST:PORT``,
    ``ray://HOST:PORT``; default ``$BASTION_RAY_ADDRESS``, else ``auto``); return the
    ``ray`` module. The engine's connection (:func:`bastion.engine._ray._connect`): a bad
    address, an unreachable cluster (a 3 s probe) or one that does not answer within
    30 s is one :class:`~bastion.engine.EngineError` line."""
    import_ray()
    from bastion.engine import _ray as ray_engine
    from bastion.engine.base import check_address

    ray_engine._connect(check_address(address or os.environ.get(ADDRESS_ENV) or "auto"))
    return ray_engine.ray
