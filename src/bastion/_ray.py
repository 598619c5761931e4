"""Connecting to a Ray cluster, for the code that runs on Ray (the Serve deployment,
training on Ray Train). Ray is imported only here and only when called: a local run
needs no Ray installed (extra ``ray``)."""

from __future__ import annotations

import logging
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
    ``ray`` module. An unreachable cluster is one :class:`BastionError` line."""
    ray = import_ray()
    addr = address or os.environ.get(ADDRESS_ENV) or "auto"
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=addr, namespace=NAMESPACE, log_to_driver=False,
                 logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise BastionError(f"cannot connect to the Ray cluster at {addr}: {first}",
                           hint="start one with `ray start --head` and pass --ray-address "
                           "HOST:PORT (or ray://HOST:10001), or set $BASTION_RAY_ADDRESS"
                           ) from None
    return ray
