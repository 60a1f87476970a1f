"""``bna serve``: one uvicorn worker per device, graceful shutdown that finishes in-flight requests,
SIGHUP for a bundle roll-out, and the connection guards of ``connections``."""
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import uvicorn

from bna_gateway.service.bundles import load_checked, resolve
from bna_gateway.service.config import Settings
from bna_gateway.service.connections import ConnectionGuard, guarded_protocol
from bna_gateway.service.main import create_app
from bna_gateway.service.runtime import Runtime

log = logging.getLogger(__name__)


class GatewayServer(uvicorn.Server):
    """uvicorn's server, telling the runtime to stop reporting ready as soon as shutdown begins, and
    turning SIGHUP into a bundle roll-out.

    On SIGTERM/SIGINT uvicorn stops accepting connections, waits (up to ``shutdown_timeout_s``) for
    requests already received to be answered, and only then runs the lifespan shutdown, which drains
    the batcher.
    """

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        previous = signal.signal(signal.SIGHUP, self.handle_hangup)  # installed before the bundle loads
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(signal.SIGHUP, previous)

    def handle_hangup(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.runtime.request_reload, "SIGHUP")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.runtime.begin_drain()
        super().handle_exit(sig, frame)


def run_server(
    bundle_dir: str | Path | None,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
) -> None:
    """Serve a bundle until SIGTERM/SIGINT. ``None`` arguments come from ``Settings`` (``BNA_*``).

    The bundle is verified and loaded before the port is bound: one that cannot be served stops
    ``bna serve`` with its reason (a ``BundleError``), not a failed start-up with a traceback."""
    overrides = {"bundle": bundle_dir, "host": host, "port": port, "workers": workers}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    if settings.bundle is None:
        raise ValueError("no bundle given: pass BUNDLE or set BNA_BUNDLE")
    path = resolve(settings.bundle)
    bundle = load_checked(path, settings.torch_device)
    log.info("bundle %s verified and loaded from %s", bundle.manifest.bundle_version, path)
    app = create_app(settings, bundle)
    runtime: Runtime = app.state.runtime
    guard = ConnectionGuard(runtime.metrics, settings.header_timeout_s, settings.max_connections, settings.retry_after_s)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(guard),
        lifespan="on",
        access_log=settings.access_log,
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # call_later takes a float
        timeout_graceful_shutdown=int(round(settings.shutdown_timeout_s)),
        backlog=max(2048, settings.max_connections),
        log_config=None,
    )
    server = GatewayServer(config, runtime)
    server.run()
    if not server.started:
        raise RuntimeError("the gateway did not start (see the log above)")
