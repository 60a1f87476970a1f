"""Pure-ASGI middleware: request counting, and closing connections whose request body was refused.

``RequestMetricsMiddleware`` counts ``bna_requests_total{endpoint,status}`` for every HTTP request.

``UnreadBodyMiddleware``: when an answer starts before the request body has been read to its end (a
refusal: 401, 413, 415, 503 ...), it reads and throws away at most ``DRAIN_BYTES`` more for at most
``DRAIN_SECONDS`` (a small body that is already in costs nothing and keeps the connection alive); if the
body is still not over, the answer says ``Connection: close`` and the connection is closed after it
(with a bounded lingering close, see ``service.connections``) instead of the server reading, say, the
rest of a 1 GiB upload to keep the connection alive.
"""
from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bna_gateway.service.metrics import GatewayMetrics

OTHER = "other"
DRAIN_BYTES = 64 * 1024
DRAIN_SECONDS = 0.25


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


def _announces_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


class UnreadBodyMiddleware:
    """Bounded drain, then ``Connection: close``, for answers given before the body was read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _announces_body(scope):
            await self.app(scope, receive, send)
            return
        body_over = False

        async def tracked_receive() -> Message:
            nonlocal body_over
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_over = True  # the last chunk, or a disconnect: nothing more will come
            return message

        async def drain() -> None:
            drained = 0
            while not body_over and drained <= DRAIN_BYTES:
                drained += len((await tracked_receive()).get("body", b""))

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_over:
                try:
                    await asyncio.wait_for(drain(), DRAIN_SECONDS)
                except asyncio.TimeoutError:
                    pass
                if not body_over:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, tracked_receive, guarded_send)
