"""Prometheus helpers both HTTP apps share: a private registry per app (two apps in one
process never share counters), cached label children for the request path, and the
``/metrics`` answer."""

from __future__ import annotations

from typing import Any

from fastapi.responses import Response

__all__ = ["ChildCache", "metrics_response"]


class ChildCache:
    """Children of labelled metrics by label values (``metric.labels()`` validates and
    locks on every call; the request path asks for the same few children again and
    again)."""

    def __init__(self) -> None:
        self._children: dict[tuple[str, ...], Any] = {}

    def child(self, metric: Any, *values: str) -> Any:
        key = (metric._name, *values)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*values)
        return c


def metrics_response(registry: Any) -> Response:
    """The Prometheus text exposition of ``registry``."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
