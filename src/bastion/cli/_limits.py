"""The CLI options of the HTTP limits, shared by ``bastion serve`` and ``bastion guard-llm``
(:class:`bastion.web.limits.HttpLimits`). Every option defaults to None (the config
file's or the library's value); a bad value is one line naming the option."""

from __future__ import annotations

from typing import Any

import typer

HeaderTimeoutOpt = typer.Option(
    None, "--header-timeout", help="Seconds a client may take to send a request head (408 after).")
BodyTimeoutOpt = typer.Option(
    None, "--body-timeout", help="Seconds a client may take to send a request body (408 after).")
KeepaliveTimeoutOpt = typer.Option(
    None, "--keepalive-timeout", help="Seconds an idle keep-alive connection stays open.")
MaxConnectionsOpt = typer.Option(
    None, "--max-connections",
    help="Open sockets at most (the oldest idle one is closed to make room).")
MaxInflightOpt = typer.Option(
    None, "--max-inflight", help="Requests handled at once; more get 503 with Retry-After.")
RateLimitOpt = typer.Option(
    None, "--rate-limit", help="Requests per second per client key (429 over it; 0: off).")
RateBurstOpt = typer.Option(None, "--rate-burst", help="Burst size of the per-key rate limit.")
RateDelayOpt = typer.Option(
    None, "--rate-delay", help="Seconds a limited client's 429 is held back (0: at once).")
DeadlineOpt = typer.Option(
    None, "--deadline",
    help="Seconds a whole request may take, its (streamed) answer included (504 after).")


def limit_fields(*, header_timeout: float | None, body_timeout: float | None,
                 keepalive_timeout: float | None, max_connections: int | None,
                 max_inflight: int | None, rate_limit: float | None, rate_burst: int | None,
                 deadline: float | None, rate_delay: float | None = None) -> dict[str, Any]:
    """The :class:`~bastion.web.limits.HttpLimits` fields given on the command line."""
    f = {"header_timeout_s": header_timeout, "body_timeout_s": body_timeout,
         "keepalive_timeout_s": keepalive_timeout, "max_connections": max_connections,
         "max_inflight": max_inflight, "rate_limit_per_s": rate_limit,
         "rate_limit_burst": rate_burst, "deadline_s": deadline,
         "rate_limit_delay_s": rate_delay}
    return {k: v for k, v in f.items() if v is not None}
