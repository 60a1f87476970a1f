"""Dynamic micro-batching across concurrent requests: the *batch* and *unbatch* stages.

Each request's decoded images are one job in a FIFO queue. A single worker task forms a batch of at
most ``max_batch_size`` images (a job larger than the room left is split across batches), hands it to
the *predict* callable in a one-thread executor (one model call per batch, never on the event loop),
and gives each job its slice of the result.

When to dispatch: as soon as the batch is full; otherwise the worker waits for more images only
while some request is already on its way in (body being read or images decoded, see
:meth:`MicroBatcher.incoming`) and never longer than ``max_wait_s`` after the oldest queued job
arrived. A lone request therefore goes straight to the model, while requests arriving together share
a batch. Images that arrive while a batch is running queue up and form the next one.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from service.predict import BatchOutcome

log = logging.getLogger(__name__)

PredictFn = Callable[[torch.Tensor], BatchOutcome]


class BatcherClosed(RuntimeError):
    """The gateway is shutting down and takes no new work."""


@dataclass(eq=False)
class _Job:
    images: torch.Tensor
    future: asyncio.Future[BatchOutcome]
    enqueued: float
    scheduled: int = 0
    finished: int = 0
    pieces: list[BatchOutcome] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    @property
    def unscheduled(self) -> int:
        return self.size - self.scheduled


_Part = tuple[_Job, int, int]  # job, first image, one past the last image


class MicroBatcher:
    """Queue + worker that turns concurrent ``submit`` calls into batched ``predict`` calls."""

    def __init__(self, predict: PredictFn, max_batch_size: int, max_wait_s: float) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bna-inference")
        self._queue: deque[_Job] = deque()
        self._queued_images = 0
        self._incoming = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="bna-batcher")

    async def stop(self) -> None:
        """Take no new jobs, finish the queued ones, then stop the worker and its thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    async def run_in_executor(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the inference thread (used for warm-up, so it shares the model's thread)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # -- producer side ---------------------------------------------------------------------------
    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Mark a request as on its way (reading/decoding) so a forming batch waits for it."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._wakeup.set()

    async def submit(self, images: torch.Tensor) -> BatchOutcome:
        """Queue a request's images ``[N, C, H, W]`` and wait for their outcomes (in order)."""
        if self._closing:
            raise BatcherClosed("the gateway is shutting down")
        if images.shape[0] == 0:
            raise ValueError("no images to classify")
        loop = asyncio.get_running_loop()
        job = _Job(images, loop.create_future(), loop.time())
        self._queue.append(job)
        self._queued_images += job.size
        self._wakeup.set()
        return await job.future

    # -- worker ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._gather(loop)
            parts = self._take()
            if not parts:
                continue
            chunks = [job.images[start:stop] for job, start, stop in parts]
            try:
                outcome = await loop.run_in_executor(self._executor, self._predict_chunks, chunks)
            except Exception as exc:  # a model failure fails the requests in this batch, not the worker
                log.exception("inference failed for a batch of %d images", sum(len(c) for c in chunks))
                for job, _, _ in parts:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self._unbatch(parts, outcome)

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait (bounded by max wait) while the batch has room and more requests are on their way."""
        deadline = self._queue[0].enqueued + self.max_wait_s
        while self._queued_images < self.max_batch_size and self._incoming > 0 and not self._closing:
            timeout = deadline - loop.time()
            if timeout <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Part]:
        """Pop up to ``max_batch_size`` images off the queue, splitting a job that does not fit."""
        parts: list[_Part] = []
        room = self.max_batch_size
        while room and self._queue:
            job = self._queue[0]
            if job.future.done():  # cancelled by its client, or failed in an earlier batch
                self._queue.popleft()
                self._queued_images -= job.unscheduled
                continue
            n = min(room, job.unscheduled)
            parts.append((job, job.scheduled, job.scheduled + n))
            job.scheduled += n
            self._queued_images -= n
            room -= n
            if job.unscheduled == 0:
                self._queue.popleft()
        return parts

    def _predict_chunks(self, chunks: list[torch.Tensor]) -> BatchOutcome:
        batch = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        return self.predict(batch)

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
