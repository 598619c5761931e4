"""Where Bastion's parallel work runs: on this process (``local``) or on a Ray cluster.

A ground-floor package (it imports nothing of Bastion but :mod:`bastion.errors`), so the
evaluator, the audits and the red team can all take an ``engine=``. Library code is the
same for both engines: it hands the engine a module-level function and a list of work
items, and gets the results back in order.

    from bastion.engine import get_engine
    eng = get_engine("ray", address="auto")        # or "ray://HOST:10001", "HOST:6379"
    out = eng.map(score_shard, shards, shared={"model": model})   # model sent once

The local engine never imports Ray: a local run works without Ray installed. The Ray
engine needs the ``ray`` extra (``pip install 'bastion[ray]'``); its address comes from
the argument, else ``BASTION_RAY_ADDRESS``, else ``auto`` (the cluster started on this
machine with ``ray start --head``).
"""

from __future__ import annotations

from bastion.engine.base import (
    ENGINES,
    Engine,
    EngineError,
    LocalEngine,
    TokenBucket,
    get_engine,
    resolve_engine,
)

__all__ = ["ENGINES", "Engine", "EngineError", "LocalEngine", "TokenBucket", "get_engine",
           "resolve_engine"]
