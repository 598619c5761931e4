"""The service's routers, one per concern; :func:`bastion.service.app.create_app`
assembles them. Routes reach the service through ``request.app.state`` (the
:func:`~bastion.service.deps.get_service` dependency) and the caller's identity through
:func:`~bastion.web.auth.require_role`, never through a factory's closure."""

from __future__ import annotations

from bastion.service.routes import clients, dashboard, events, feedback, health, models, predict

ROUTERS = (predict.router, feedback.router, models.router, clients.router, events.router,
           dashboard.router, health.router)

__all__ = ["ROUTERS"]
