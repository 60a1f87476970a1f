"""``bna serve``: one uvicorn worker per device, graceful shutdown that finishes in-flight requests."""
from __future__ import annotations

import logging
from pathlib import Path
from types import FrameType

import uvicorn

from bna_gateway.models.bundle import verify_bundle
from bna_gateway.service.config import Settings
from bna_gateway.service.main import create_app
from bna_gateway.service.runtime import Runtime

log = logging.getLogger(__name__)


class GatewayServer(uvicorn.Server):
    """uvicorn's server, telling the runtime to stop reporting ready as soon as shutdown begins.

    On SIGTERM/SIGINT uvicorn stops accepting connections, waits (up to ``shutdown_timeout_s``) for
    requests already received to be answered, and only then runs the lifespan shutdown, which drains
    the batcher.
    """

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.runtime.begin_drain()
        super().handle_exit(sig, frame)


def run_server(
    bundle_dir: str | Path | None,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
) -> None:
    """Serve a bundle until SIGTERM/SIGINT. ``None`` arguments come from ``Settings`` (``BNA_*``)."""
    overrides = {"bundle": bundle_dir, "host": host, "port": port, "workers": workers}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    if settings.bundle is None:
        raise ValueError("no bundle given: pass BUNDLE or set BNA_BUNDLE")
    manifest = verify_bundle(settings.bundle)  # fail fast, with the bundle's own message, before binding
    log.info("bundle %s verified (%d files)", manifest.bundle_version, len(manifest.files))
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(round(settings.shutdown_timeout_s)),
        log_config=None,
    )
    server = GatewayServer(config, app.state.runtime)
    server.run()
    if not server.started:
        raise RuntimeError("the gateway did not start (see the log above)")
