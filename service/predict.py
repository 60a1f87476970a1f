"""The *predict* stage: one routed model call (f, then one twin pass per detected target) per batch.

Runs in the batcher's single inference thread, never on the event loop. Takes the decoded ``uint8``
batch, moves it to the device, scales it to [0, 1] (the classifier normalises), applies the twin
routing rule of :class:`bna_gateway.models.twins.TwinRouter`, records the batch's metrics and hands back plain
Python lists for the *unbatch* stage.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields
from itertools import chain
from typing import Literal

import torch

from bna_gateway.models.bundle import LoadedBundle
from bna_gateway.models.twins import RoutedBatch
from bna_gateway.service.metrics import GatewayMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOutcome:
    """Per-image routing outcome of one batch (or of a slice of it), as Python values."""

    label: list[int]
    original_label: list[int]
    checked_by_twin: list[bool]
    trigger_detected: list[bool]
    confidence: list[float]

    def __len__(self) -> int:
        return len(self.label)

    def slice(self, start: int, stop: int) -> "BatchOutcome":
        return BatchOutcome(
            self.label[start:stop],
            self.original_label[start:stop],
            self.checked_by_twin[start:stop],
            self.trigger_detected[start:stop],
            self.confidence[start:stop],
        )

    @staticmethod
    def concat(parts: list["BatchOutcome"]) -> "BatchOutcome":
        if len(parts) == 1:
            return parts[0]
        return BatchOutcome(*(list(chain.from_iterable(getattr(p, f.name) for p in parts)) for f in fields(BatchOutcome)))


class Predictor:
    """Callable ``uint8 [N, C, H, W] -> BatchOutcome`` around a loaded bundle's ``TwinRouter``."""

    def __init__(
        self,
        bundle: LoadedBundle,
        device: torch.device,
        metrics: GatewayMetrics | None = None,
        graph: Literal["frozen", "eager"] = "eager",
    ) -> None:
        self.bundle = bundle
        self.router = bundle.router
        self.device = device
        self.metrics = metrics
        self.graph = graph
        self.num_classes = bundle.manifest.model.num_classes

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> BatchOutcome:
        start = time.perf_counter()
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        routed = self.router(x)
        seconds = time.perf_counter() - start  # router outputs are on the CPU, so the device is done
        if self.metrics is not None:
            self.metrics.observe_batch(len(routed), seconds, *self._tallies(routed))
        return BatchOutcome(
            routed.label.tolist(),
            routed.original_label.tolist(),
            routed.checked_by_twin.tolist(),
            routed.trigger_detected.tolist(),
            routed.confidence.tolist(),
        )

    def _tallies(self, routed: RoutedBatch) -> tuple[dict[int, int], dict[tuple[int, int], int]]:
        """Twin checks per target and detections per (target, corrected) pair, counted with bincount."""
        k = self.num_classes
        checks = torch.bincount(routed.original_label[routed.checked_by_twin], minlength=k)
        flagged = routed.trigger_detected
        pairs = torch.bincount(routed.original_label[flagged] * k + routed.label[flagged], minlength=k * k)
        return (
            {int(t): int(checks[t]) for t in checks.nonzero().flatten()},
            {(int(p) // k, int(p) % k): int(pairs[p]) for p in pairs.nonzero().flatten()},
        )

    def freeze(self) -> None:
        """With ``graph="frozen"``: f and every twin from frozen graphs, each checked against its eager
        module (``bna_gateway.models.frozen``); one that fails the check stays eager, said in the log."""
        if self.graph != "frozen":
            return
        start = time.perf_counter()
        eager = self.router.freeze_graphs(tuple(self.bundle.manifest.model.input.shape))
        for name, reason in eager.items():
            log.warning("%s is served eagerly: %s", name, reason)
        total = 1 + len(self.router.targets)
        log.info("froze %d of %d graphs (f and twins) in %.2f s", total - len(eager), total, time.perf_counter() - start)

    def warmup(self, batch_sizes: list[int]) -> float:
        """Freeze the graphs (see :meth:`freeze`), then run f and every twin once at each batch size
        (uncounted); returns the seconds it took."""
        start = time.perf_counter()
        self.freeze()
        with torch.inference_mode():
            self._warm(batch_sizes)
        seconds = time.perf_counter() - start
        log.info("warmed batch sizes %s on %s in %.2f s", batch_sizes, self.device, seconds)
        return seconds

    def _warm(self, batch_sizes: list[int]) -> None:
        c, h, w = self.bundle.manifest.model.input.shape
        generator = torch.Generator().manual_seed(0)
        for size in batch_sizes:
            x = torch.rand(size, c, h, w, generator=generator).to(self.device)
            self.router.logits(x)
            for target in self.router.targets:
                self.router.twin_logits(x, target)
            self.router(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
