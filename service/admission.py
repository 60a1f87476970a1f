"""Admission control: under overload some clients get a fast "busy" instead of every client a timeout.

Three checks, each a 503 with ``Retry-After`` (``errors.Unavailable``, counted in
``bna_requests_refused_total{reason}``):

- ``queue_full`` before the body is read, when the queue already holds ``max_queued_images``
  (nothing is read or decoded for a request that could not be queued), and again when the decoded
  images would pass the bound;
- ``deadline`` when a request's images have not been classified ``request_timeout_s`` after its body
  was in: it leaves the queue (the model never sees it) and is answered at once.

The bound keeps the wait short (at most ``max_queued_images`` images ahead of anyone) and memory flat;
the deadline caps the answer time when the model slows down (a roll-out warming beside it, a
neighbour on the same CPU).
"""
from __future__ import annotations

import asyncio
import time

import torch

from bna_gateway.service.batching import Job, MicroBatcher, PredictFn, QueueFull
from bna_gateway.service.errors import Unavailable
from bna_gateway.service.predict import BatchOutcome


class Admission:
    """The deadline of one request, from the moment its body is in."""

    def __init__(self, batcher: MicroBatcher, timeout_s: float) -> None:
        self.batcher = batcher
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    @staticmethod
    def check_room(batcher: MicroBatcher) -> None:
        if not batcher.has_room():
            raise Unavailable("queue_full", f"the gateway is busy: {batcher.queued_images} images are queued")

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self._late()
        return left

    def admit(self, images: torch.Tensor, predict: PredictFn) -> Job:
        try:
            return self.batcher.enqueue(images, predict, self.remaining())
        except QueueFull as exc:
            raise Unavailable("queue_full", f"the gateway is busy: {exc}") from None

    async def outcome(self, job: Job) -> BatchOutcome:
        """The job's outcome, or ``deadline`` (the job is withdrawn) when it is not there in time."""
        try:
            await asyncio.wait((job.future,), timeout=self.remaining())  # leaves the future alone on timeout
        finally:
            if not job.future.done():  # late, or this request was cancelled: its images leave the queue
                self.batcher.withdraw(job)
        if job.future.cancelled():
            raise self._late()
        return job.future.result()

    def _late(self) -> Unavailable:
        return Unavailable("deadline", f"not classified within the deadline of {self.timeout_s:g} s; the gateway is busy")
