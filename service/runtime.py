"""What the app holds between requests: the bundle being served, the batcher, metrics, quarantine, state.

``start`` (called by the lifespan) loads the bundle (unless ``bna serve`` already did), then warms the
model in the background; the gateway is *live* as soon as the HTTP server runs and *ready* (Triton's
meaning: f and every twin loaded and warmed) once warm-up has finished. From then on ``rollout`` may
swap in a new bundle (SIGHUP, or a re-pointed bundle symlink) without leaving the ready state.
``begin_drain`` (SIGTERM) turns readiness off so load balancers stop sending traffic while in-flight
requests finish; ``stop`` finishes the queued batches and releases the inference thread.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import sys
from pathlib import Path

import torch

from bna_gateway.models.bundle import LoadedBundle
from bna_gateway.models.decode import configure_pillow
from bna_gateway.service.batching import MicroBatcher
from bna_gateway.service.bundles import ServedBundle, load_checked, resolve
from bna_gateway.service.config import Settings
from bna_gateway.service.metrics import GatewayMetrics
from bna_gateway.service.quarantine import Quarantine
from bna_gateway.service.rollout import BundleRollout

log = logging.getLogger(__name__)


class State(str, enum.Enum):
    STARTING = "starting"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class Runtime:
    def __init__(self, settings: Settings, bundle: LoadedBundle | None = None) -> None:
        """``bundle``: already loaded from ``settings.bundle`` (``bna serve`` loads it before binding so
        that a bundle that cannot load is reported as an error, not a failed start-up)."""
        s = settings
        self.settings = s
        self.metrics = GatewayMetrics(s.max_batch_size)
        self.state = State.STARTING
        self.device = s.torch_device
        self.current: ServedBundle | None = None
        self.batcher = MicroBatcher(s.max_batch_size, s.max_batch_wait_s, s.max_queued_images)
        self.metrics.watch_queue(lambda: self.batcher.queued_images)
        self.quarantine: Quarantine | None = None
        self.rollout: BundleRollout | None = None
        self._preloaded = bundle
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
        path = resolve(s.bundle)
        bundle = self._preloaded
        if bundle is None:
            log.info("loading bundle %s onto %s", path, self.device)
            bundle = await asyncio.to_thread(load_checked, path, self.device)
        self._preloaded = None
        served = self._build(bundle, path)
        self._publish(served)
        if s.quarantine_dir is not None:
            self.quarantine = Quarantine(s.quarantine_dir, s.quarantine_max_files)
            log.info("quarantine on: flagged images go to %s (at most %d)", s.quarantine_dir, s.quarantine_max_files)
        self.batcher.start()
        self.state = State.WARMING
        self._warmup_task = asyncio.create_task(self._warm_first(served), name="bna-warmup")

    def _build(self, bundle: LoadedBundle, path: Path) -> ServedBundle:
        s = self.settings
        return ServedBundle.build(bundle, path, self.device, self.metrics, s.max_image_pixels, s.inference_graph)

    def _publish(self, served: ServedBundle) -> None:
        self.current = served
        served.publish(self.metrics, self.device)
        log.info("serving %s", served.describe())

    async def warm(self, served: ServedBundle) -> float:
        """Run f and every twin of ``served`` at each warm-up batch size (in a worker thread)."""
        return await asyncio.to_thread(served.predictor.warmup, self.settings.warmup_batch_sizes())

    async def _warm_first(self, served: ServedBundle) -> None:
        try:
            await self.warm(served)
        except Exception:
            log.exception("warm-up failed; the gateway will not become ready")
            self.state = State.FAILED
            return
        if self.state is State.WARMING:
            self.state = State.READY
            log.info("ready: serving bundle %s", served.version)
            self._start_rollout(served)

    def _start_rollout(self, served: ServedBundle) -> None:
        assert self.settings.bundle is not None
        self.rollout = BundleRollout(
            self.settings.bundle,
            current=lambda: self.current or served,
            warm=self.warm,
            swap=self._publish,
            build=self._build,
            device=self.device,
            metrics=self.metrics,
            watch_interval_s=self.settings.bundle_watch_interval_s,
        )
        self.rollout.start()

    def request_reload(self, why: str) -> None:
        """SIGHUP: roll out what the bundle path names now (ignored until the first bundle is ready)."""
        if self.rollout is None or self.state is not State.READY:
            log.warning("%s ignored: the gateway is %s", why, self.state.value)
            return
        self.rollout.request(why)

    def begin_drain(self) -> None:
        """Stop reporting ready (shutdown has begun); requests already accepted still complete."""
        if self.state in (State.READY, State.WARMING):
            self.state = State.DRAINING
            log.info("draining: no longer ready, finishing in-flight requests")

    async def stop(self) -> None:
        self.begin_drain()
        if self._warmup_task is not None and not self._warmup_task.done():
            await self._warmup_task
        if self.rollout is not None:
            await self.rollout.stop()
        await self.batcher.stop()
        log.info("stopped")
