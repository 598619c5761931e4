"""The HTTP face that `bastion serve` and `bastion guard-llm` share.

One place for what every Bastion HTTP app needs: identity and roles (API keys), one
error mapping, limits and timeouts (per-key rate limits, load shedding, deadlines), and
the metrics helpers. Both apps are assembled from these parts. This package sits low in
the layers: it imports only the standard library, FastAPI/Starlette, pydantic and the
event store, never ``service`` or ``llm``.
"""
