"""Prometheus metrics, named as docs/http.md fixes them (other tools depend on the names).

One process per device, hence one registry: ``Settings`` refuses ``workers != 1`` and ``bna serve``
runs a single uvicorn worker, so prometheus_client's multiprocess mode is not needed and every counter
seen on ``/metrics`` covers every request the gateway answered. (Several workers on one device would
also split the traffic that micro-batching needs to see in one queue.) To scale out, run one gateway
per GPU or container; Prometheus scrapes each and ``sum()`` adds them up.

Label values are bounded: ``endpoint`` is one of the app's route paths (anything else is ``other``),
``status`` an HTTP status code (499: the client left before its answer), ``target_class`` /
``corrected_class`` class ids of the bundle, ``reason`` one of a fixed list (``errors.REFUSAL_REASONS``,
``CLIENT_ABORT_REASONS``), ``result`` success or failure.
"""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from bna_gateway.service.errors import REFUSAL_REASONS

CLIENT_ABORT_REASONS = ("disconnect", "header_timeout", "body_timeout")
RELOAD_RESULTS = ("success", "failure")
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
        self.refused = Counter(
            "bna_requests_refused_total",
            "Requests answered 503 with Retry-After instead of being served, by reason",
            ["reason"],
            registry=r,
        )
        self.client_aborts = Counter(
            "bna_client_aborts_total",
            "Requests the client did not complete: it disconnected, or sent its head or body too slowly",
            ["reason"],
            registry=r,
        )
        self.queued_images = Gauge("bna_queued_images", "Images admitted and waiting for a batch", registry=r)
        self.open_connections = Gauge("bna_open_connections", "Open client connections", registry=r)
        self.bundle_reloads = Counter(
            "bna_bundle_reloads_total",
            "Bundle roll-outs (SIGHUP or a re-pointed bundle symlink): swapped in, or refused with the old one kept",
            ["result"],
            registry=r,
        )
        for reason in REFUSAL_REASONS:  # every series from zero, so rate() and alerts see them at once
            self.refused.labels(reason=reason)
        for reason in CLIENT_ABORT_REASONS:
            self.client_aborts.labels(reason=reason)
        for result in RELOAD_RESULTS:
            self.bundle_reloads.labels(result=result)

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

    def watch_queue(self, queued_images: Callable[[], float]) -> None:
        """``bna_queued_images`` reads the batcher's count at scrape time."""
        self.queued_images.set_function(queued_images)

    def observe_refused(self, reason: str) -> None:
        self.refused.labels(reason=reason).inc()

    def observe_client_abort(self, reason: str) -> None:
        self.client_aborts.labels(reason=reason).inc()

    def observe_reload(self, ok: bool) -> None:
        self.bundle_reloads.labels(result="success" if ok else "failure").inc()

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
