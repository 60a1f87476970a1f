"""In-process tests of admission control and roll-out in the batcher: the queue bound, deadlines,
withdrawal, and batches that never mix two bundles; and the settings that drive them."""
from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from bna_gateway.service.admission import Admission
from bna_gateway.service.batching import MicroBatcher, QueueFull
from bna_gateway.service.config import Settings
from bna_gateway.service.errors import Unavailable
from bna_gateway.service.predict import BatchOutcome


class Model:
    """A stand-in predict function (the model is not what these tests are about): labels every image
    with ``label``, records each batch, and can be held until released."""

    def __init__(self, label: int) -> None:
        self.label = label
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, images: torch.Tensor) -> BatchOutcome:
        self.gate.wait(10)
        n = len(images)
        self.batches.append(n)
        return BatchOutcome([self.label] * n, [self.label] * n, [False] * n, [False] * n, [1.0] * n)


def images(n: int) -> torch.Tensor:
    return torch.zeros(n, 1, 4, 4, dtype=torch.uint8)


def test_the_queue_bound_refuses_what_would_pass_it() -> None:
    async def run() -> None:
        model = Model(0)
        model.gate.clear()  # the first batch blocks, so what follows stays queued
        batcher = MicroBatcher(max_batch_size=4, max_wait_s=0.0, max_queued_images=6)
        batcher.start()
        first = batcher.enqueue(images(4), model)
        await asyncio.sleep(0.1)  # taken by the inference thread: no longer queued
        queued = [batcher.enqueue(images(3), model), batcher.enqueue(images(3), model)]
        assert batcher.queued_images == 6 and not batcher.has_room()
        with pytest.raises(QueueFull):
            batcher.enqueue(images(1), model)
        with pytest.raises(Unavailable) as refused:
            Admission.check_room(batcher)
        assert refused.value.reason == "queue_full"
        model.gate.set()
        outcomes = await asyncio.gather(first.future, *(j.future for j in queued))
        assert [len(o) for o in outcomes] == [4, 3, 3]
        assert batcher.queued_images == 0 and batcher.has_room()
        await batcher.stop()

    asyncio.run(run())


def test_a_late_request_is_withdrawn_and_never_reaches_the_model() -> None:
    async def run() -> None:
        model = Model(0)
        model.gate.clear()
        batcher = MicroBatcher(max_batch_size=2, max_wait_s=0.0, max_queued_images=10)
        batcher.start()
        busy = batcher.enqueue(images(2), model)
        await asyncio.sleep(0.1)
        admission = Admission(batcher, timeout_s=0.2)
        late = admission.admit(images(2), model)
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as refused:
            await admission.outcome(late)
        assert refused.value.reason == "deadline" and time.monotonic() - t0 < 1.0
        assert batcher.queued_images == 0  # gone from the queue at once
        model.gate.set()
        await busy.future
        await asyncio.sleep(0.1)
        assert model.batches == [2], "the withdrawn images were given to the model"
        await batcher.stop()

    asyncio.run(run())


def test_jobs_past_their_deadline_are_skipped_by_the_inference_thread() -> None:
    async def run() -> None:
        model = Model(0)
        model.gate.clear()
        batcher = MicroBatcher(max_batch_size=2, max_wait_s=0.0)
        batcher.start()
        busy = batcher.enqueue(images(2), model)
        await asyncio.sleep(0.1)
        expired = batcher.enqueue(images(2), model, timeout_s=0.05)
        fresh = batcher.enqueue(images(1), model)
        await asyncio.sleep(0.2)
        model.gate.set()
        await asyncio.gather(busy.future, fresh.future)
        assert model.batches == [2, 1] and not expired.future.done()
        await batcher.stop()

    asyncio.run(run())


def test_a_batch_never_mixes_two_bundles_and_old_jobs_finish_on_the_old_one() -> None:
    async def run() -> None:
        old, new = Model(1), Model(2)
        old.gate.clear()
        batcher = MicroBatcher(max_batch_size=64, max_wait_s=0.0)
        batcher.start()
        first = batcher.enqueue(images(1), old)
        await asyncio.sleep(0.1)
        jobs = [batcher.enqueue(images(1), model) for model in (old, old, new, new, old)]
        old.gate.set()
        outcomes = await asyncio.gather(first.future, *(j.future for j in jobs))
        assert [o.label[0] for o in outcomes] == [1, 1, 1, 2, 2, 1]
        assert old.batches == [1, 2, 1] and new.batches == [2]
        await batcher.stop()

    asyncio.run(run())


def test_admission_settings_have_sane_defaults_and_refuse_nonsense(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("BNA_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert s.max_queued_images >= s.max_images_per_request
    assert 0 < s.request_timeout_s <= 60 and s.retry_after_s == 1
    assert 0 < s.header_timeout_s <= s.body_timeout_s
    assert s.max_connections >= 256 and s.bundle_watch_interval_s > 0
    assert s.docs_enabled  # no key: the API describes itself
    assert not Settings(api_key="k").docs_enabled and Settings(api_key="k", docs=True).docs_enabled
    with pytest.raises(ValueError, match="max_queued_images"):
        Settings(max_queued_images=8, max_images_per_request=16)
    for bad in ({"request_timeout_s": 0}, {"header_timeout_s": -1}, {"max_connections": 0}):
        with pytest.raises(ValueError):
            Settings(**bad)


def test_every_setting_and_metric_is_documented() -> None:
    """docs/http.md lists every setting (as its BNA_ variable) and every bna_ metric the gateway exports."""
    from prometheus_client.parser import text_string_to_metric_families

    from bna_gateway.service.metrics import GatewayMetrics

    doc = (Path(__file__).resolve().parents[1] / "docs" / "http.md").read_text()
    documented = set(re.findall(r"`(BNA_[A-Z_]+)`", doc))
    settings = {f"BNA_{name.upper()}" for name in Settings.model_fields}
    assert settings <= documented, sorted(settings - documented)
    metrics = GatewayMetrics(max_batch_size=8)
    body, _ = metrics.exposition()
    exported = {f.name for f in text_string_to_metric_families(body.decode()) if f.name.startswith("bna_")}
    names = {n.removesuffix("_total") for n in re.findall(r"\| `(bna_\w+)` \|", doc)}
    assert exported == names, (sorted(exported - names), sorted(names - exported))
