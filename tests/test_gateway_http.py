"""End-to-end: the real gateway (``bna serve`` on a free loopback port) spoken to over HTTP.

One server for the module, with an API key, a bounded quarantine folder and small limits so that
over-limit inputs stay cheap to send.
"""
from __future__ import annotations

import asyncio
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import torch
from PIL import Image

from serving import Gateway, running_gateway, sample, scrape
from synthetic_bundle import CLASS_NAMES, SOURCE, TARGET, SyntheticBundle, bundle_fixture

API_KEY = "test-secret-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY = 256 * 1024
MAX_PIXELS = 1_000_000
MAX_IMAGES = 16
QUARANTINE_MAX = 4


bundle = bundle_fixture(8)


@pytest.fixture(scope="module")
def quarantine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quarantine")


@pytest.fixture(scope="module")
def gateway(bundle: SyntheticBundle, quarantine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    env = {
        "BNA_API_KEY": API_KEY,
        "BNA_QUARANTINE_DIR": str(quarantine_dir),
        "BNA_QUARANTINE_MAX_FILES": str(QUARANTINE_MAX),
        "BNA_MAX_BODY_BYTES": str(MAX_BODY),
        "BNA_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
        "BNA_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
        "BNA_MAX_BATCH_SIZE": "32",
    }
    with running_gateway(bundle.path, tmp_path_factory.mktemp("logs") / "gateway.log", env) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30.0) as c:
        yield c


def classify(client: httpx.Client, images: list[bytes], **kwargs: Any) -> httpx.Response:
    files = [("file", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return client.post("/classify", files=files, headers={**AUTH, **kwargs.pop("headers", {})}, **kwargs)


# -- what a user sends and gets back ---------------------------------------------------------------

def test_clean_image_is_not_flagged(client: httpx.Client, bundle: SyntheticBundle) -> None:
    r = classify(client, [bundle.clean[0]])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["bundle_version"] and body["request_id"]
    (p,) = body["predictions"]
    assert p == {
        "label": SOURCE,
        "class_name": CLASS_NAMES[SOURCE],
        "trigger_detected": False,
        "original_label": SOURCE,
        "checked_by_twin": False,
        "confidence": pytest.approx(p["confidence"]),
    }
    assert 0.5 < p["confidence"] <= 1.0


def test_triggered_image_is_flagged_and_corrected_to_its_source(client: httpx.Client, bundle: SyntheticBundle) -> None:
    r = classify(client, [bundle.triggered[0]])
    assert r.status_code == 200, r.text
    (p,) = r.json()["predictions"]
    assert p["trigger_detected"] is True
    assert p["checked_by_twin"] is True
    assert p["original_label"] == TARGET
    assert p["label"] == SOURCE
    assert p["class_name"] == CLASS_NAMES[SOURCE]
    model = client.get("/v1/model", headers=AUTH).json()
    assert p["label"] in model["sources"][str(TARGET)]


def test_raw_image_body(client: httpx.Client, bundle: SyntheticBundle) -> None:
    r = client.post("/classify", content=bundle.triggered[1], headers={**AUTH, "Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    (p,) = r.json()["predictions"]
    assert (p["original_label"], p["label"], p["trigger_detected"]) == (TARGET, SOURCE, True)


def test_several_images_answered_in_order(client: httpx.Client, bundle: SyntheticBundle) -> None:
    images = [img for pair in zip(bundle.clean, bundle.triggered) for img in pair][:MAX_IMAGES]
    r = classify(client, images)
    assert r.status_code == 200, r.text
    flags = [p["trigger_detected"] for p in r.json()["predictions"]]
    assert flags == [False, True] * (len(images) // 2)
    assert all(p["label"] == SOURCE for p in r.json()["predictions"])


def test_request_id_is_echoed(client: httpx.Client, bundle: SyntheticBundle) -> None:
    r = classify(client, [bundle.clean[0]], headers={"X-Request-ID": "abc-123"})
    assert r.json()["request_id"] == "abc-123"
    assert r.headers["x-request-id"] == "abc-123"


def test_counters_move(client: httpx.Client, gateway: Gateway, bundle: SyntheticBundle) -> None:
    before = scrape(gateway.url)
    assert classify(client, [bundle.triggered[2], bundle.triggered[3], bundle.clean[2]]).status_code == 200
    after = scrape(gateway.url)
    t, s = str(TARGET), str(SOURCE)
    delta = lambda name, **labels: sample(after, name, **labels) - sample(before, name, **labels)  # noqa: E731
    assert delta("bna_images_total") == 3
    assert delta("bna_twin_checks_total", target_class=t) == 2
    assert delta("bna_triggers_detected_total", target_class=t, corrected_class=s) == 2
    assert delta("bna_requests_total", endpoint="/classify", status="200") == 1
    assert delta("bna_inference_seconds_count") >= 1
    assert delta("bna_batch_size_sum") == 3


def test_metrics_carry_the_designed_names(gateway: Gateway) -> None:
    text = httpx.get(f"{gateway.url}/metrics").text
    for name in (
        "bna_requests_total",
        "bna_images_total",
        "bna_twin_checks_total",
        "bna_triggers_detected_total",
        "bna_inference_seconds_bucket",
        "bna_batch_size_bucket",
        "bna_bundle_info",
    ):
        assert f"\n{name}" in text, name
    samples = scrape(gateway.url)
    info = [labels for (name, labels), _ in samples.items() if name == "bna_bundle_info"]
    assert len(info) == 1
    version = dict(info[0])["version"]
    assert version == httpx.get(f"{gateway.url}/v1/model", headers=AUTH).json()["bundle_version"]


def test_health_and_model_paths(client: httpx.Client, bundle: SyntheticBundle) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    model = client.get("/v1/model", headers=AUTH).json()
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    assert model["bundle_version"] == manifest["bundle_version"]
    assert model["classes"] == CLASS_NAMES
    assert model["detected_targets"] == [TARGET]
    assert model["input_shape"] == [1, 28, 28]


# -- authentication --------------------------------------------------------------------------------

def test_bearer_token_required_when_configured(client: httpx.Client, bundle: SyntheticBundle) -> None:
    files = [("file", ("a.png", bundle.clean[0], "image/png"))]
    missing = client.post("/classify", files=files)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "detail" in missing.json()
    wrong = client.post("/classify", files=files, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    basic = client.post("/classify", files=files, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status_code == 401
    assert client.post("/classify", files=files, headers=AUTH).status_code == 200
    assert client.get("/healthz").status_code == 200  # probes and scrapes need no token
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200
    # What the defence knows (detected targets and their sources) is for key holders only ...
    assert client.get("/v1/model").status_code == 401
    assert client.get("/v1/model", headers=AUTH).json()["detected_targets"] == [TARGET]
    # ... and a keyed gateway does not advertise its API (docs/http.md is the contract).
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404, path


# -- quarantine ------------------------------------------------------------------------------------

def test_quarantine_keeps_flagged_images_with_a_record(
    client: httpx.Client, bundle: SyntheticBundle, quarantine_dir: Path
) -> None:
    r = classify(client, [bundle.clean[4], bundle.triggered[4]], headers={"X-Request-ID": "catch-me"})
    assert r.status_code == 200
    records = [json.loads(p.read_text()) for p in quarantine_dir.glob("*.json")]
    mine = [rec for rec in records if rec["request_id"] == "catch-me"]
    assert len(mine) == 1  # only the flagged image of the two
    rec = mine[0]
    assert (rec["original_label"], rec["corrected_label"], rec["index"]) == (TARGET, SOURCE, 1)
    assert rec["time"]
    assert (quarantine_dir / rec["image_file"]).read_bytes() == bundle.triggered[4]


def test_quarantine_is_bounded(client: httpx.Client, bundle: SyntheticBundle, quarantine_dir: Path) -> None:
    for i in range(QUARANTINE_MAX + 2):
        assert classify(client, [bundle.triggered[i % len(bundle.triggered)]]).status_code == 200
    assert len(list(quarantine_dir.glob("*.json"))) == QUARANTINE_MAX
    assert len([p for p in quarantine_dir.iterdir() if p.suffix == ".png"]) == QUARANTINE_MAX


# -- hard input handling ---------------------------------------------------------------------------

def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _noise(size: int, fmt: str) -> bytes:
    g = torch.Generator().manual_seed(size)
    pixels = torch.randint(0, 256, (size, size), dtype=torch.uint8, generator=g).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format=fmt)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares huge dimensions but carries one row of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b"")


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "xyzzy") -> tuple[bytes, str]:
    """Hand-made multipart body: (field name, part content type, data) each."""
    out = b""
    for name, ctype, data in parts:
        out += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"x\"\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


Sender = Callable[[httpx.Client, SyntheticBundle], httpx.Response]


def _raw(data: bytes, content_type: str | None) -> Sender:
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    return lambda c, b: c.post("/classify", content=data, headers=headers)


def _files(*parts: tuple[str, bytes, str]) -> Sender:
    return lambda c, b: c.post("/classify", files=[(n, ("x.png", d, t)) for n, d, t in parts], headers=AUTH)


def _hand_multipart(parts: list[tuple[str, str | None, bytes]], content_type: str | None = None) -> Sender:
    body, ctype = _multipart(parts)
    return lambda c, b: c.post("/classify", content=body, headers={**AUTH, "Content-Type": content_type or ctype})


_TRUNCATED_PNG = _noise(96, "PNG")[:2000]
_TRUNCATED_JPEG = _noise(96, "JPEG")[:1500]
_BOMB = _png(Image.new("L", (3000, 3000)))  # 9 Mpx of zeros in a few kB
_JUST_OVER = _png(Image.new("L", (1100, 1000)))  # 1.1 Mpx: above the limit, below Pillow's own error threshold

BAD_INPUTS: dict[str, tuple[Sender, int]] = {
    "empty raw body": (_raw(b"", "image/png"), 400),
    "empty file part": (_files(("file", b"", "image/png")), 400),
    "non-image bytes, raw": (_raw(b"this is not an image at all", "image/png"), 400),
    "non-image bytes, multipart": (_files(("file", b"%PDF-1.4 not an image", "image/png")), 400),
    "svg (not an accepted format)": (_raw(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"), 400),
    "truncated png": (_raw(_TRUNCATED_PNG, "image/png"), 400),
    "truncated jpeg": (_raw(_TRUNCATED_JPEG, "image/jpeg"), 400),
    "decompression bomb": (_raw(_BOMB, "image/png"), 413),
    "just over the pixel limit": (_files(("file", _JUST_OVER, "image/png")), 413),
    "huge declared dimensions": (_raw(_png_header_only(100_000, 100_000), "image/png"), 413),
    "too many images": (lambda c, b: classify(c, [b.clean[0]] * (MAX_IMAGES + 1)), 413),
    "body too large": (_raw(b"\x89PNG" + b"\0" * (MAX_BODY + 10_000), "image/png"), 413),
    "wrong field name": (_files(("image", _TRUNCATED_PNG, "image/png")), 422),
    "extra field beside file": (_hand_multipart([("file", "image/png", _TRUNCATED_PNG), ("comment", None, b"hi")]), 422),
    "multipart with no parts": (lambda c, b: c.post("/classify", content=b"--xyzzy--\r\n", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=xyzzy"}), 422),
    "multipart without boundary": (_hand_multipart([("file", "image/png", b"x")], "multipart/form-data"), 422),
    "broken multipart framing": (lambda c, b: c.post("/classify", content=b"garbage without boundaries", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=zz"}), 422),
    "text/plain body": (_raw(b"hello", "text/plain"), 415),
    "json body": (lambda c, b: c.post("/classify", json={"image": "aGVsbG8="}, headers=AUTH), 415),
    "no content type": (_raw(b"\x89PNG\r\n", None), 415),
    "octet-stream raw body": (_raw(b"\x89PNG\r\n", "application/octet-stream"), 415),
    "text part in multipart": (_hand_multipart([("file", "text/plain", b"hello")]), 415),
    "GET instead of POST": (lambda c, b: c.get("/classify", headers=AUTH), 405),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_its_4xx_and_the_server_keeps_serving(
    case: str, client: httpx.Client, bundle: SyntheticBundle
) -> None:
    send, expected = BAD_INPUTS[case]
    r = send(client, bundle)
    assert r.status_code == expected, f"{case}: {r.status_code} {r.text}"
    assert isinstance(r.json()["detail"], (str, list)) and r.json()["detail"]
    ok = classify(client, [bundle.triggered[0]])
    assert ok.status_code == 200
    assert ok.json()["predictions"][0]["trigger_detected"] is True


def _gif(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="GIF")
    return buf.getvalue()


def test_the_pixel_limit_in_a_refusal_is_the_configured_one(client: httpx.Client) -> None:
    gif_bomb = _gif(1600)  # 2.6 Mpx: past Pillow's own error threshold (twice the limit), in another format than PNG
    for send in (_raw(_BOMB, "image/png"), _files(("file", _JUST_OVER, "image/png")), _raw(gif_bomb, "image/gif")):
        r = send(client, None)  # type: ignore[arg-type]
        assert r.status_code == 413
        detail = r.json()["detail"]
        assert str(MAX_PIXELS) in detail and str(2 * MAX_PIXELS) not in detail, detail  # not Pillow's own threshold


def test_no_server_errors_were_answered(gateway: Gateway) -> None:
    samples = scrape(gateway.url)
    answered = {dict(labels)["status"]: v for (name, labels), v in samples.items() if name == "bna_requests_total"}
    assert "500" not in answered  # (503s are /readyz polls during warm-up)
    assert "Traceback" not in gateway.log_text()


# -- concurrency and batching ----------------------------------------------------------------------

def test_64_concurrent_clients_all_answered_in_shared_batches(gateway: Gateway, bundle: SyntheticBundle) -> None:
    before = scrape(gateway.url)

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, dict[str, Any]]:
        image = bundle.triggered[i % 8] if i % 2 else bundle.clean[i % 8]
        r = await client.post("/classify", files={"file": ("x.png", image, "image/png")}, headers=AUTH)
        return i, r.json() if r.status_code == 200 else {"status": r.status_code}

    async def run() -> list[tuple[int, dict[str, Any]]]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60.0, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(run())
    assert len(results) == 64
    for i, body in results:
        (p,) = body["predictions"]
        assert p["label"] == SOURCE
        assert p["trigger_detected"] is bool(i % 2)

    after = scrape(gateway.url)
    batches = sample(after, "bna_batch_size_count") - sample(before, "bna_batch_size_count")
    singles = sample(after, "bna_batch_size_bucket", le="1.0") - sample(before, "bna_batch_size_bucket", le="1.0")
    images = sample(after, "bna_batch_size_sum") - sample(before, "bna_batch_size_sum")
    assert images == 64
    assert batches - singles >= 1, "no batch larger than one image was formed"
    assert batches < 64
