"""Prometheus metrics, named as docs/http.md fixes them (other tools depend on the names).

One process per device, hence one registry: ``Settings`` refuses ``workers != 1`` and ``bna serve``
runs a single uvicorn worker, so prometheus_client's multiprocess mode is not needed and every counter
seen on ``/metrics`` covers every request the gateway answered. (Several workers on one device would
also split the traffic that micro-batching needs to see in one queue.) To scale out, run one gateway
per GPU or container; Prometheus scrapes each and ``sum()`` adds them up.

Label values are bounded: ``endpoint`` is one of the app's route paths (anything else is ``other``),
``status`` an HTTP status code, ``target_class`` / ``corrected_class`` class ids of the bundle.
"""
from __future__ import annotations

from typing import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

INFERENCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to the largest batch, so the histogram tells single-image batches apart."""
    edges = [1.0]
    while edges[-1] < max_batch_size:
        edges.append(edges[-1] * 2)
    if edges[-1] != max_batch_size:
        edges[-1] = float(max_batch_size)
    return tuple(edges)


class GatewayMetrics:
    """The gateway's metrics in their own registry (so several apps in one process never collide)."""

    def __init__(self, max_batch_size: int, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # no *_created series: they double the exposition and no query needs them
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "bna_requests_total", "HTTP requests answered, by route and status code", ["endpoint", "status"], registry=r
        )
        self.images = Counter("bna_images_total", "Images classified", registry=r)
        self.twin_checks = Counter(
            "bna_twin_checks_total",
            "Images that f assigned to a detected target class and that its twin re-examined",
            ["target_class"],
            registry=r,
        )
        self.triggers = Counter(
            "bna_triggers_detected_total",
            "Images flagged as carrying a trigger: f's label (target_class) and the twin's (corrected_class)",
            ["target_class", "corrected_class"],
            registry=r,
        )
        self.inference_seconds = Histogram(
            "bna_inference_seconds",
            "Time of one batched model call (f plus the twins it needed), including host-device copies",
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "bna_batch_size", "Images per model call", buckets=batch_size_buckets(max_batch_size), registry=r
        )
        self.bundle = Info("bna_bundle", "The bundle being served (value is always 1)", registry=r)

    def set_bundle(self, version: str, arch: str, device: str, targets: Iterable[int], sources: dict[int, list[int]]) -> None:
        """Publish ``bna_bundle_info`` and start the per-target series at zero so rate() sees them at once."""
        targets = sorted(targets)
        self.bundle.info(
            {"version": version, "arch": arch, "device": device, "detected_targets": ",".join(map(str, targets))}
        )
        for t in targets:
            self.twin_checks.labels(target_class=str(t))
            for s in sources.get(t, []):
                self.triggers.labels(target_class=str(t), corrected_class=str(s))

    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_batch(
        self,
        size: int,
        seconds: float,
        twin_checks: dict[int, int],
        triggers: dict[tuple[int, int], int],
    ) -> None:
        self.images.inc(size)
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)
        for target, n in twin_checks.items():
            self.twin_checks.labels(target_class=str(target)).inc(n)
        for (target, corrected), n in triggers.items():
            self.triggers.labels(target_class=str(target), corrected_class=str(corrected)).inc(n)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
