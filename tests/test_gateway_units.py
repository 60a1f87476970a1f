"""In-process tests of the gateway's parts: settings, decoding, micro-batching, quarantine, readiness."""
from __future__ import annotations

import asyncio
import io
import json
import os
import random
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from bna_gateway.models.bundle import LoadedBundle, load_bundle
from bna_gateway.models.spec import InputSpec
from bna_gateway.service.batching import MicroBatcher
from bna_gateway.service.config import Settings
from bna_gateway.models.decode import BadImage, ImageDecoder, ImageTooLarge, UndecodableImage, configure_pillow
from bna_gateway.service.main import create_app
from bna_gateway.service.predict import BatchOutcome, Predictor
from bna_gateway.service.quarantine import Quarantine, QuarantineItem
from synthetic_bundle import SOURCE, TARGET, SyntheticBundle, build_synthetic_bundle

GREY = InputSpec(shape=(1, 28, 28), mean=(0.5,), std=(0.5,))
COLOUR = InputSpec(shape=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# -- settings --------------------------------------------------------------------------------------

def test_settings_defaults_are_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("BNA_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert (s.host, s.port, s.workers, s.max_batch_size) == ("127.0.0.1", 8000, 1, 64)
    assert s.api_key is None and s.quarantine_dir is None
    assert s.torch_device.type in ("cpu", "cuda")
    assert s.warmup_batch_sizes() == [1, 2, 4, 8, 16, 32, 64]


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BNA_MAX_BATCH_SIZE", "24")
    monkeypatch.setenv("BNA_API_KEY", "s3cr3t-key")
    monkeypatch.setenv("BNA_QUARANTINE_DIR", str(tmp_path))
    monkeypatch.setenv("BNA_DEVICE", "cpu")
    s = Settings(port=9001)
    assert (s.max_batch_size, s.port, s.quarantine_dir, str(s.torch_device)) == (24, 9001, tmp_path, "cpu")
    assert s.api_key is not None and s.api_key.get_secret_value() == "s3cr3t-key"
    assert "s3cr3t" not in repr(s)
    assert s.warmup_batch_sizes() == [1, 2, 4, 8, 16, 24]


@pytest.mark.parametrize("bad", [{"workers": 2}, {"max_batch_size": 0}, {"device": "gpu"}, {"port": 0}])
def test_settings_refuse_nonsense(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Settings(**bad)


# -- decoding --------------------------------------------------------------------------------------

def test_any_mode_and_size_becomes_the_model_input() -> None:
    grey, colour = ImageDecoder.for_input(GREY, 10**7), ImageDecoder.for_input(COLOUR, 10**7)
    images = {
        "L": Image.new("L", (28, 28), 200),
        "RGB": Image.new("RGB", (100, 60), (255, 0, 0)),
        "RGBA": Image.new("RGBA", (28, 28), (0, 255, 0, 128)),
        "P": Image.new("RGB", (40, 40), (10, 20, 30)).convert("P"),
        "1": Image.new("1", (28, 28), 1),
        "I;16": Image.new("I;16", (28, 28), 65535),
    }
    for mode, img in images.items():
        for fmt in ("PNG", "BMP", "TIFF"):
            if (mode, fmt) in {("I;16", "BMP"), ("RGBA", "BMP")}:
                continue
            data = encode(img, fmt)
            g, c = grey(data), colour(data)
            assert g.shape == (1, 28, 28) and g.dtype == torch.uint8, (mode, fmt)
            assert c.shape == (3, 32, 32) and c.dtype == torch.uint8, (mode, fmt)
    assert int(grey(encode(images["I;16"])).min()) == 255  # 16-bit white stays white
    assert colour(encode(images["RGB"]))[0].float().mean() > 250  # red channel
    assert grey(encode(images["L"], "JPEG")).float().mean().item() == pytest.approx(200, abs=3)


def test_exif_orientation_is_applied() -> None:
    decoder = ImageDecoder.for_input(GREY, 10**7)
    img = Image.new("L", (28, 28), 0)
    img.paste(255, (0, 0, 14, 28))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    upright = decoder(encode(img, "JPEG", quality=95))
    rotated = decoder(encode(img, "JPEG", quality=95, exif=exif))
    assert upright[0, :, :14].float().mean() > 200 and upright[0, :, 14:].float().mean() < 50
    assert rotated[0, :14, :].float().mean() > 200 and rotated[0, 14:, :].float().mean() < 50  # now the top half


def test_pixel_limit_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    configure_pillow(1000)
    decoder = ImageDecoder.for_input(GREY, 1000)
    with pytest.raises(ImageTooLarge, match="pixels"):
        decoder(encode(Image.new("L", (40, 40))))
    with pytest.raises(ImageTooLarge):
        decoder(encode(Image.new("L", (400, 400))))  # Pillow's own DecompressionBombError range
    assert decoder(encode(Image.new("L", (30, 30)))).shape == (1, 28, 28)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt metadata it skips
def test_corrupted_bytes_never_escape_as_anything_but_client_errors() -> None:
    decoder = ImageDecoder.for_input(GREY, 10**6)
    rng = random.Random(0)
    seeds = [
        encode(Image.effect_noise((32, 32), 40).convert("L"), fmt)
        for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
    ]
    outcomes = {"decoded": 0, "refused": 0}
    for i in range(600):
        data = bytearray(rng.choice(seeds))
        kind = i % 3
        if kind == 0:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:  # truncate
            data = data[: rng.randrange(1, len(data))]
        else:  # splice garbage into the header
            pos = rng.randrange(min(64, len(data)))
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        try:
            out = decoder(bytes(data))
        except BadImage as exc:
            assert isinstance(exc, (UndecodableImage, ImageTooLarge))
            outcomes["refused"] += 1
        else:
            assert out.shape == (1, 28, 28)
            outcomes["decoded"] += 1
    assert outcomes["refused"] > 100


def test_empty_and_foreign_bytes_are_undecodable() -> None:
    decoder = ImageDecoder.for_input(GREY, 10**6)
    for data in (b"", b"hello", b"%PDF-1.7\n", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n"):
        with pytest.raises(UndecodableImage):
            decoder(data)


# -- batching --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    torch.set_num_threads(1)
    return build_synthetic_bundle(tmp_path_factory.mktemp("bundle"), n_samples=8)


@pytest.fixture(scope="module")
def loaded(synthetic: SyntheticBundle) -> LoadedBundle:
    return load_bundle(synthetic.path)


def test_micro_batching_matches_the_router_image_for_image(synthetic: SyntheticBundle, loaded: LoadedBundle) -> None:
    decoder = ImageDecoder.for_input(loaded.manifest.model.input, 10**6)
    pool = torch.stack([decoder(d) for d in synthetic.clean + synthetic.triggered])  # 8 clean, 8 triggered
    predictor = Predictor(loaded, torch.device("cpu"))
    batch_sizes: list[int] = []

    def observed(images: torch.Tensor) -> BatchOutcome:
        batch_sizes.append(len(images))
        return predictor(images)

    rng = random.Random(1)
    requests = [[rng.randrange(16) for _ in range(rng.choice([1, 1, 2, 5, 13]))] for _ in range(40)]
    requests.append(list(range(16)) * 3)  # 48 images: larger than one batch

    async def run() -> list[BatchOutcome]:
        batcher = MicroBatcher(max_batch_size=16, max_wait_s=0.05)
        batcher.start()

        async def one(idx: list[int]) -> BatchOutcome:
            with batcher.incoming():
                await asyncio.sleep(0)
                job = batcher.enqueue(pool[idx], observed)
            return await job.future

        try:
            return await asyncio.gather(*(one(idx) for idx in requests))
        finally:
            await batcher.stop()

    outcomes = asyncio.run(run())
    for idx, outcome in zip(requests, outcomes):
        assert len(outcome) == len(idx)
        assert outcome.original_label == [SOURCE if i < 8 else TARGET for i in idx]
        assert outcome.trigger_detected == [i >= 8 for i in idx]
        assert outcome.label == [SOURCE] * len(idx)
    assert sum(batch_sizes) == sum(len(idx) for idx in requests)
    assert max(batch_sizes) <= 16
    assert len(batch_sizes) < len(requests)  # requests shared batches


def test_a_lone_request_does_not_wait_for_company(synthetic: SyntheticBundle, loaded: LoadedBundle) -> None:
    decoder = ImageDecoder.for_input(loaded.manifest.model.input, 10**6)
    image = decoder(synthetic.clean[0])[None]
    predictor = Predictor(loaded, torch.device("cpu"))

    async def run() -> float:
        batcher = MicroBatcher(max_batch_size=64, max_wait_s=2.0)
        batcher.start()
        await batcher.enqueue(image, predictor).future  # warm
        loop = asyncio.get_running_loop()
        start = loop.time()
        await batcher.enqueue(image, predictor).future
        elapsed = loop.time() - start
        await batcher.stop()
        return elapsed

    assert asyncio.run(run()) < 1.0  # far below max_wait: nothing else was on its way


# -- quarantine ------------------------------------------------------------------------------------

def test_quarantine_keeps_the_newest_records_only(tmp_path: Path) -> None:
    q = Quarantine(tmp_path, max_files=3)
    png = encode(Image.new("L", (4, 4)))
    for i in range(5):
        q.save([QuarantineItem(png, f"req/{i}", 0, TARGET, SOURCE, 0.9, "a.png", "image/png", "127.0.0.1", "v1")])
    records = sorted(tmp_path.glob("*.json"))
    assert len(records) == 3 and len(list(tmp_path.glob("*.png"))) == 3
    kept = [json.loads(p.read_text()) for p in records]
    assert [r["request_id"] for r in kept] == ["req/2", "req/3", "req/4"]
    assert all("/" not in p.name for p in records)
    assert kept[0]["bundle_version"] == "v1" and kept[0]["original_label"] == TARGET
    assert len(Quarantine(tmp_path, max_files=2)) == 2  # a restart honours the bound too


# -- readiness -------------------------------------------------------------------------------------

def test_not_ready_until_started(tmp_path: Path) -> None:
    app = create_app(Settings(bundle=tmp_path, api_key=None))  # lifespan not run: nothing loaded

    async def run() -> dict[str, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            return {
                "healthz": await c.get("/healthz"),
                "readyz": await c.get("/readyz"),
                "v2 ready": await c.get("/v2/health/ready"),
                "v2 live": await c.get("/v2/health/live"),
                "classify": await c.post("/classify", content=b"x", headers={"Content-Type": "image/png"}),
                "model": await c.get("/v1/model"),
            }

    r = asyncio.run(run())
    assert r["healthz"].status_code == 200 and r["v2 live"].status_code == 200
    for name in ("readyz", "v2 ready", "classify", "model"):
        assert r[name].status_code == 503, name
    assert r["classify"].headers["retry-after"] == "1"
    assert r["v2 ready"].json() == {"ready": False}
    assert "detail" in r["classify"].json()
