"""Assembles the FastAPI app; ``create_app`` is also a uvicorn factory (``--factory bna_gateway.service.main:create_app``)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from bna_gateway.models.bundle import LoadedBundle
from bna_gateway.service.api.errors import install_error_handlers
from bna_gateway.service.api.middleware import RequestMetricsMiddleware, UnreadBodyMiddleware
from bna_gateway.service.api.routes import api_router
from bna_gateway.service.config import Settings
from bna_gateway.service.runtime import Runtime


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime: Runtime = app.state.runtime
    await runtime.start()  # load the bundle unless given (a broken bundle fails startup), then warm in the background
    try:
        yield
    finally:
        await runtime.stop()  # after uvicorn has let in-flight requests finish


def create_app(settings: Settings | None = None, bundle: LoadedBundle | None = None) -> FastAPI:
    """``bundle``: already loaded from ``settings.bundle`` (``bna serve`` loads it before binding)."""
    settings = settings or Settings()
    docs = settings.docs_enabled
    app = FastAPI(
        title="bna-gateway",
        summary="Serves an image classifier and its BNA twins: flags and corrects backdoor-triggered inputs.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.runtime = Runtime(settings, bundle)
    app.include_router(api_router)
    install_error_handlers(app)
    app.add_middleware(UnreadBodyMiddleware)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.runtime.metrics)
    return app
