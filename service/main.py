"""Assembles the FastAPI app; ``create_app`` is also a uvicorn factory (``--factory bna_gateway.service.main:create_app``)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from bna_gateway.service.api.errors import install_error_handlers
from bna_gateway.service.api.middleware import RequestMetricsMiddleware
from bna_gateway.service.api.routes import api_router
from bna_gateway.service.config import Settings
from bna_gateway.service.runtime import Runtime


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime: Runtime = app.state.runtime
    await runtime.start()  # verify + load the bundle (a broken bundle fails startup), then warm in the background
    try:
        yield
    finally:
        await runtime.stop()  # after uvicorn has let in-flight requests finish


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="bna-gateway",
        summary="Serves an image classifier and its BNA twins: flags and corrects backdoor-triggered inputs.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.runtime = Runtime(settings)
    app.include_router(api_router)
    install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.runtime.metrics)
    return app
