"""Exception handlers: every error is JSON ``{"detail": ...}``; client faults are 4xx, never 500."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from bna_gateway.models.decode import BadImage, ImageTooLarge
from bna_gateway.service.batching import BatcherClosed
from bna_gateway.service.errors import ClientError

log = logging.getLogger(__name__)


async def _client_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ClientError)
    log.debug("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.detail)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


async def _bad_image(request: Request, exc: Exception) -> JSONResponse:
    """The decoder refused an image: too many pixels (413), or not decodable (400)."""
    status = 413 if isinstance(exc, ImageTooLarge) else 400
    log.debug("%s %s -> %d: %s", request.method, request.url.path, status, exc)
    return JSONResponse({"detail": str(exc)}, status_code=status)


async def _shutting_down(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": "the gateway is shutting down"}, status_code=503, headers={"Retry-After": "1"})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ClientError, _client_error)
    app.add_exception_handler(BadImage, _bad_image)
    app.add_exception_handler(BatcherClosed, _shutting_down)
    app.add_exception_handler(Exception, _unexpected)
