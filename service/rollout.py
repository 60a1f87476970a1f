"""Zero-downtime bundle roll-out: a new bundle is verified, loaded and warmed beside the one being served,
then swapped in between two batches.

Two triggers, one procedure (:meth:`BundleRollout.reload`):

- **SIGHUP**: reload whatever the bundle path names now (a copied-over directory, or a re-pointed link);
- **a re-pointed symlink**: every ``bundle_watch_interval_s`` the path the gateway was given is resolved;
  when it names another directory (``ln -sfn releases/new current.tmp && mv -T current.tmp current``
  re-points ``current`` atomically), that directory is rolled out.

While the new bundle loads and warms, the old one keeps answering; requests admitted before the swap
finish on the old one (``batching``: a batch never mixes bundles), those admitted after it run on the
new one, and answers and ``bna_bundle_info`` carry the new ``bundle_version``. A bundle that fails to
verify, load or warm is refused: the old one keeps serving, the reason is logged at ERROR and
``bna_bundle_reloads_total{result="failure"}`` counts it; the watcher does not retry that directory
until the link moves again (SIGHUP retries at once). A bundle with the version already served is not
loaded twice.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Awaitable, Callable

import torch

from bna_gateway.models.bundle import BundleError, LoadedBundle, read_manifest
from bna_gateway.service.bundles import ServedBundle, load_checked, resolve
from bna_gateway.service.metrics import GatewayMetrics

log = logging.getLogger(__name__)

Warm = Callable[[ServedBundle], Awaitable[float]]
Swap = Callable[[ServedBundle], None]


class BundleRollout:
    """Watches the bundle path and rolls out what it names; one reload at a time."""

    def __init__(
        self,
        path: Path,
        current: Callable[[], ServedBundle],
        warm: Warm,
        swap: Swap,
        build: Callable[[LoadedBundle, Path], ServedBundle],
        device: torch.device,
        metrics: GatewayMetrics,
        watch_interval_s: float,
    ) -> None:
        self.path = Path(path)
        self._current = current
        self._warm = warm
        self._swap = swap
        self.device = device
        self.metrics = metrics
        self._build = build
        self.watch_interval_s = watch_interval_s
        self._lock = asyncio.Lock()
        self._seen = current().path  # the directory the watcher last acted on
        self._tasks: set[asyncio.Task[bool]] = set()
        self._watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.watch_interval_s > 0:
            self._watcher = asyncio.create_task(self._watch(), name="bna-bundle-watch")

    async def stop(self) -> None:
        """Stop watching and wait for a reload in progress (its worker thread cannot be interrupted)."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def request(self, why: str) -> None:
        """Schedule a reload (from a signal handler on the event loop's thread)."""
        task = asyncio.get_running_loop().create_task(self.reload(why), name="bna-bundle-reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval_s)
            target = resolve(self.path)
            if target != self._seen:
                self._seen = target
                await self.reload(f"{self.path} now points to {target}")

    async def reload(self, why: str) -> bool:
        """Roll out the bundle the path names now; True when it was swapped in."""
        async with self._lock:
            target = resolve(self.path)
            old = self._current()
            log.info("bundle roll-out (%s): checking %s", why, target)
            try:
                manifest = await asyncio.to_thread(read_manifest, target)
                if manifest.bundle_version == old.version:
                    log.info("bundle %s at %s is already being served; nothing to roll out", old.version, target)
                    return False
                bundle = await asyncio.to_thread(load_checked, target, self.device)
                new = self._build(bundle, target)
                seconds = await self._warm(new)
            except Exception as exc:  # noqa: BLE001 - whatever breaks the new bundle, the old one keeps serving
                reason = str(exc) if isinstance(exc, BundleError) else f"{type(exc).__name__}: {exc}"
                log.error("bundle at %s refused, still serving %s: %s", target, old.version, reason)
                self.metrics.observe_reload(False)
                return False
            self._seen = target
            self._swap(new)
            self.metrics.observe_reload(True)
            log.info("rolled out %s (warmed in %.2f s); %s retired", new.describe(), seconds, old.version)
            return True
