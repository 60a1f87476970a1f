"""Pure-ASGI middleware counting ``bna_requests_total{endpoint,status}`` for every HTTP request."""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bna_gateway.service.metrics import GatewayMetrics

OTHER = "other"


class RequestMetricsMiddleware:
    """``endpoint`` is the path template of the route that answered, else ``other`` (bounded)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")  # set by the router on the scope it was given, for matched routes only
            self.metrics.observe_request(getattr(route, "path", None) or OTHER, status)
