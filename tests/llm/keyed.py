"""Requests that present a test API key to a guard proxy started by the tests'
``UvicornThread`` (``KEYS`` by server origin; the key is real and checked by the
proxy)."""

from __future__ import annotations

from typing import Any

#: Authorization headers by server origin (``http://127.0.0.1:PORT``): the key a
#: test's ``authed_*`` requests present to a guard proxy (see :meth:`UvicornThread.key`)
KEYS: dict[str, dict[str, str]] = {}


def _origin(url: str) -> str:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc}"


def _with_key(url: str, kw: dict[str, Any]) -> dict[str, Any]:
    headers = dict(kw.pop("headers", None) or {})
    if not any(k.lower() in ("authorization", "x-api-key") for k in headers):
        headers.update(KEYS.get(_origin(url), {}))
    return {**kw, "headers": headers}


def authed_get(url: str, **kw: Any) -> Any:
    """``httpx.get`` with the server's test key (unless the caller sends its own)."""
    import httpx

    return httpx.get(url, **_with_key(url, kw))


def authed_post(url: str, **kw: Any) -> Any:
    import httpx

    return httpx.post(url, **_with_key(url, kw))


def authed_stream(method: str, url: str, **kw: Any) -> Any:
    import httpx

    return httpx.stream(method, url, **_with_key(url, kw))
