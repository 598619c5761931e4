"""The HTTP face that `bastion serve` and `bastion guard-llm` share.

One place for what every Bastion HTTP app needs: identity and roles (API keys), one
error mapping, limits and timeouts (per-key rate limits, load shedding, deadlines), and
the metrics helpers. Both apps are assembled from these parts. This package sits low in
the layers: it imports only the standard library, FastAPI/Starlette, pydantic and the
event store, never ``service`` or ``llm``.

- :mod:`bastion.web.errors`: ``ApiError``, the error shape, ``install_error_handlers``;
- :mod:`bastion.web.keys`: API keys hashed at rest (``KeyStore``, the ``api_keys`` table);
- :mod:`bastion.web.auth`: ``Authenticator`` (keys, admin token, open mode),
  ``AuthMiddleware`` (the role check before the body is read), ``require_role``;
- :mod:`bastion.web.redact`: what a reader may see of an event (no client data or text);
- :mod:`bastion.web.metrics`: the Prometheus helpers;
- :mod:`bastion.web.limits`: rate limits, timeouts, load shedding (keyed by
  ``Authenticator.key_fn``).
"""
