"""What the app holds between requests: the loaded bundle, decoder, batcher, metrics, quarantine, state.

``start`` (called by the lifespan) verifies and loads the bundle, then warms the model in the
background; the gateway is *live* as soon as the HTTP server runs and *ready* (Triton's meaning: f
and every twin loaded and warmed) once warm-up has finished. ``begin_drain`` (SIGTERM) turns
readiness off so load balancers stop sending traffic while in-flight requests finish; ``stop``
finishes the queued batches and releases the inference thread.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import sys

import torch

from bna_gateway.models.bundle import LoadedBundle, load_bundle
from bna_gateway.service.batching import MicroBatcher
from bna_gateway.service.config import Settings
from bna_gateway.models.decode import ImageDecoder, configure_pillow
from bna_gateway.service.metrics import GatewayMetrics
from bna_gateway.service.predict import Predictor
from bna_gateway.service.quarantine import Quarantine

log = logging.getLogger(__name__)


class State(str, enum.Enum):
    STARTING = "starting"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics(settings.max_batch_size)
        self.state = State.STARTING
        self.device = settings.torch_device
        self.bundle: LoadedBundle | None = None
        self.decoder: ImageDecoder | None = None
        self.batcher: MicroBatcher | None = None
        self.quarantine: Quarantine | None = None
        self._warmup_task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def live(self) -> bool:
        return self.state is not State.FAILED

    async def start(self) -> None:
        s = self.settings
        if s.bundle is None:
            raise RuntimeError("no bundle to serve: pass BUNDLE to 'bna serve' or set BNA_BUNDLE")
        configure_pillow(s.max_image_pixels)
        sys.setswitchinterval(s.gil_switch_interval_ms / 1000.0)
        if s.torch_threads is not None:
            torch.set_num_threads(s.torch_threads)
        torch.backends.cudnn.benchmark = False  # no per-shape autotuning at request time
        log.info("loading bundle %s onto %s", s.bundle, self.device)
        bundle = await asyncio.to_thread(load_bundle, s.bundle, self.device)
        manifest = bundle.manifest
        self.bundle = bundle
        self.decoder = ImageDecoder.for_input(manifest.model.input, s.max_image_pixels)
        predictor = Predictor(bundle, self.device, self.metrics)
        self.batcher = MicroBatcher(predictor, s.max_batch_size, s.max_batch_wait_s)
        if s.quarantine_dir is not None:
            self.quarantine = Quarantine(s.quarantine_dir, s.quarantine_max_files, manifest.bundle_version)
            log.info("quarantine on: flagged images go to %s (at most %d)", s.quarantine_dir, s.quarantine_max_files)
        self.metrics.set_bundle(
            manifest.bundle_version,
            manifest.model.arch,
            str(self.device),
            bundle.router.targets,
            {t.target: t.sources for t in manifest.twins},
        )
        log.info(
            "bundle %s: %s, %d classes, twins for targets %s",
            manifest.bundle_version, manifest.model.arch, manifest.model.num_classes, bundle.router.targets,
        )
        self.batcher.start()
        self.state = State.WARMING
        self._warmup_task = asyncio.create_task(self._warm(predictor), name="bna-warmup")

    async def _warm(self, predictor: Predictor) -> None:
        sizes = self.settings.warmup_batch_sizes()
        try:
            await asyncio.to_thread(predictor.warmup, sizes)
        except Exception:
            log.exception("warm-up failed; the gateway will not become ready")
            self.state = State.FAILED
            return
        if self.state is State.WARMING:
            self.state = State.READY
            log.info("ready: serving bundle %s", self.bundle.manifest.bundle_version if self.bundle else "?")

    def begin_drain(self) -> None:
        """Stop reporting ready (shutdown has begun); requests already accepted still complete."""
        if self.state in (State.READY, State.WARMING):
            self.state = State.DRAINING
            log.info("draining: no longer ready, finishing in-flight requests")

    async def stop(self) -> None:
        self.begin_drain()
        if self._warmup_task is not None and not self._warmup_task.done():
            await self._warmup_task
        if self.batcher is not None:
            await self.batcher.stop()
        log.info("stopped")
