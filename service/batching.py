"""Dynamic micro-batching across concurrent requests: the *batch* and *unbatch* stages.

Each request's decoded images are one job in a FIFO queue shared by the event loop and one inference
thread. The inference thread forms a batch of at most ``max_batch_size`` images (a job larger than the
room left is split across batches), makes one *predict* call for it (never on the event loop), and
hands each job its slice of the result back on the event loop.

When to dispatch: as soon as the batch is full; otherwise the thread waits for more images only while
some request is already on its way in (its body is in and its images are being decoded, see
:meth:`MicroBatcher.incoming`; a slow upload does not hold batches back), and never longer than ``max_wait_s`` after the oldest queued job
arrived. A lone request therefore goes straight to the model, requests arriving together share a
batch, and because the thread takes what is queued the moment it is free, the event loop keeps
reading and decoding the next requests while the model runs (the two overlap instead of taking turns).

Admission: at most ``max_queued_images`` images wait for a batch; :meth:`MicroBatcher.enqueue` refuses
a job that would pass the bound (:class:`QueueFull`) rather than letting the queue, and every client's
wait, grow without end. A job carries a deadline: one still waiting when it passes is never given to the
model, and its request withdraws it (:meth:`MicroBatcher.withdraw`).

Bundle roll-out: each job carries the predict function it was admitted with, and a batch only ever
holds jobs of one predict function, so a new bundle takes over *between* batches while the requests
admitted before the swap finish on the old one.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from bna_gateway.service.predict import BatchOutcome

log = logging.getLogger(__name__)

PredictFn = Callable[[torch.Tensor], BatchOutcome]


class BatcherClosed(RuntimeError):
    """The gateway is shutting down and takes no new work."""


class QueueFull(RuntimeError):
    """Admitting the job would pass ``max_queued_images``."""


@dataclass(eq=False)
class Job:
    """One request's images in the queue; ``future`` gives their outcomes, in order."""

    images: torch.Tensor
    future: asyncio.Future[BatchOutcome]
    predict: PredictFn
    enqueued: float
    deadline: float
    scheduled: int = 0  # images handed to a batch (inference thread, under the lock)
    finished: int = 0  # images with outcomes (event loop)
    pieces: list[BatchOutcome] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    @property
    def unscheduled(self) -> int:
        return self.size - self.scheduled


_Part = tuple[Job, int, int]  # job, first image, one past the last image


class MicroBatcher:
    """Queue + inference thread that turn concurrent requests into batched ``predict`` calls."""

    def __init__(
        self, max_batch_size: int, max_wait_s: float, max_queued_images: int | None = None
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queued_images = max_queued_images
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._queued_images = 0
        self._incoming = 0
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="bna-inference", daemon=True)

    # -- lifecycle (event loop) ------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def stop(self) -> None:
        """Take no new jobs, finish the queued ones, then end the inference thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    # -- producer side (event loop) --------------------------------------------------------------
    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Mark a request as on its way (decoding) so that a forming batch waits for it."""
        with self._cond:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cond:
                self._incoming -= 1
                self._cond.notify()

    @property
    def queued_images(self) -> int:
        """Images admitted and not yet handed to a batch."""
        return self._queued_images

    def has_room(self) -> bool:
        """Whether one more image would be admitted now (a cheap check before reading a body)."""
        return self.max_queued_images is None or self._queued_images < self.max_queued_images

    def enqueue(self, images: torch.Tensor, predict: PredictFn, timeout_s: float = float("inf")) -> Job:
        """Queue a request's images ``[N, C, H, W]`` for ``predict``; ``job.future`` gives their outcomes.

        Call it inside :meth:`incoming` so the job is queued before the request stops counting as on its
        way. Raises :class:`QueueFull` when the images would pass ``max_queued_images`` and
        :class:`BatcherClosed` once shutdown has begun."""
        n = int(images.shape[0])
        if n == 0:
            raise ValueError("no images to classify")
        if self._loop is None:
            raise RuntimeError("the batcher has not been started")
        now = time.monotonic()
        job = Job(images, self._loop.create_future(), predict, now, now + timeout_s)
        with self._cond:
            if self._closing:
                raise BatcherClosed("the gateway is shutting down")
            if self.max_queued_images is not None and self._queued_images + n > self.max_queued_images:
                raise QueueFull(
                    f"{self._queued_images} images are queued; {n} more would pass the bound of {self.max_queued_images}"
                )
            self._queue.append(job)
            self._queued_images += n
            self._cond.notify()
        return job

    def withdraw(self, job: Job) -> None:
        """Take a job's images that no batch has taken yet out of the queue (its request gave up), and
        drop the results of any part already running."""
        with self._cond:
            if job.unscheduled:
                self._queued_images -= job.unscheduled
                job.scheduled = job.size
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass
        if not job.future.done():
            job.future.cancel()

    # -- inference thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:  # closing, and nothing left
                    return
                self._gather()
                parts = self._take()
            if parts:
                self._process(parts)

    def _gather(self) -> None:
        """With the lock held: wait (bounded) while the batch has room and requests are on their way."""
        deadline = self._queue[0].enqueued + self.max_wait_s
        while self._queued_images < self.max_batch_size and self._incoming > 0 and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _take(self) -> list[_Part]:
        """With the lock held: pop up to ``max_batch_size`` images of one predict function, splitting a
        job that does not fit and dropping jobs whose request has gone or whose deadline has passed."""
        parts: list[_Part] = []
        room = self.max_batch_size
        now = time.monotonic()
        while room and self._queue:
            job = self._queue[0]
            if job.future.done() or (job.scheduled == 0 and now > job.deadline):
                self._queue.popleft()  # its request answers (or has answered) without it
                self._queued_images -= job.unscheduled
                job.scheduled = job.size
                continue
            if parts and job.predict is not parts[0][0].predict:
                break  # a bundle swap: the next batch starts on the new bundle
            n = min(room, job.unscheduled)
            parts.append((job, job.scheduled, job.scheduled + n))
            job.scheduled += n
            self._queued_images -= n
            room -= n
            if job.unscheduled == 0:
                self._queue.popleft()
        return parts

    def _process(self, parts: list[_Part]) -> None:
        assert self._loop is not None
        chunks = [job.images[start:stop] for job, start, stop in parts]
        try:
            outcome = parts[0][0].predict(chunks[0] if len(chunks) == 1 else torch.cat(chunks))
        except Exception as exc:  # a model failure fails the requests in this batch, not the thread
            log.exception("inference failed for a batch of %d images", sum(len(c) for c in chunks))
            self._loop.call_soon_threadsafe(self._fail, parts, exc)
            return
        self._loop.call_soon_threadsafe(self._unbatch, parts, outcome)

    # -- results (event loop) --------------------------------------------------------------------
    @staticmethod
    def _unbatch(parts: list[_Part], outcome: BatchOutcome) -> None:
        offset = 0
        for job, start, stop in parts:
            n = stop - start
            piece = outcome.slice(offset, offset + n)
            offset += n
            if job.future.done():
                continue
            job.pieces.append(piece)
            job.finished += n
            if job.finished == job.size:
                job.future.set_result(BatchOutcome.concat(job.pieces))

    @staticmethod
    def _fail(parts: list[_Part], exc: Exception) -> None:
        for job, _, _ in parts:
            if not job.future.done():
                job.future.set_exception(exc)
