"""Exception handlers: every error is JSON ``{"detail": ...}``; client faults are 4xx, never 500.

A refusal for now (``Unavailable``) is a 503 with ``Retry-After`` and counts in
``bna_requests_refused_total{reason}``; a client that went away (``ClientLeft``) is logged at INFO and
answered 499 (to nobody: it is only what ``bna_requests_total`` records), never a 5xx.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from bna_gateway.models.decode import BadImage, ImageTooLarge
from bna_gateway.service.batching import BatcherClosed
from bna_gateway.service.errors import ClientError, ClientLeft, RequestTimeout, Unavailable
from bna_gateway.service.runtime import Runtime

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


async def _client_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ClientError)
    log.debug("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.detail)
    if isinstance(exc, RequestTimeout):
        _runtime(request).metrics.observe_client_abort("body_timeout")
        log.info("%s %s from %s: %s", request.method, request.url.path, _peer(request), exc.detail)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


async def _bad_image(request: Request, exc: Exception) -> JSONResponse:
    """The decoder refused an image: too many pixels (413), or not decodable (400)."""
    status = 413 if isinstance(exc, ImageTooLarge) else 400
    log.debug("%s %s -> %d: %s", request.method, request.url.path, status, exc)
    return JSONResponse({"detail": str(exc)}, status_code=status)


def unavailable_response(runtime: Runtime, reason: str, detail: str) -> JSONResponse:
    runtime.metrics.observe_refused(reason)
    retry_after = str(runtime.settings.retry_after_s)
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": retry_after})


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Unavailable)
    log.debug("%s %s -> 503 (%s): %s", request.method, request.url.path, exc.reason, exc.detail)
    return unavailable_response(_runtime(request), exc.reason, exc.detail)


async def _shutting_down(request: Request, exc: Exception) -> JSONResponse:
    return unavailable_response(_runtime(request), "draining", "the gateway is shutting down")


async def _client_left(request: Request, exc: Exception) -> Response:
    _runtime(request).metrics.observe_client_abort("disconnect")
    log.info("%s %s: %s (%s)", request.method, request.url.path, exc, _peer(request))
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def _peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown client"


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ClientError, _client_error)
    app.add_exception_handler(BadImage, _bad_image)
    app.add_exception_handler(Unavailable, _unavailable)
    app.add_exception_handler(BatcherClosed, _shutting_down)
    app.add_exception_handler(ClientLeft, _client_left)
    app.add_exception_handler(Exception, _unexpected)
