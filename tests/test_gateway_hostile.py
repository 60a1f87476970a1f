"""End-to-end: hostile and careless clients against the real gateway: slow-loris heads and bodies,
clients that leave mid-upload, huge refused uploads, a connection flood, and a request of huge images."""
from __future__ import annotations

import asyncio
import io
import select
import socket
import statistics
import time
from typing import Iterator

import httpx
import pytest
from PIL import Image

from serving import Gateway, KeepAliveClient, multipart_body, request_head, running_gateway, sample, scrape
from synthetic_bundle import SyntheticBundle, bundle_fixture

API_KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
DRAIN_SECONDS = 0.25  # service.api.middleware.DRAIN_SECONDS
MAX_CONNECTIONS = 160
MAX_BODY = 1024 * 1024


bundle = bundle_fixture(4)


@pytest.fixture(scope="module")
def gateway(bundle: SyntheticBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    env = {
        "BNA_API_KEY": API_KEY,
        "BNA_QUARANTINE_DIR": "",
        "BNA_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "BNA_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "BNA_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "BNA_MAX_BODY_BYTES": str(MAX_BODY),
    }
    with running_gateway(bundle.path, tmp_path_factory.mktemp("logs") / "gateway.log", env) as gw:
        yield gw


def classify_request(port: int, images: list[bytes]) -> tuple[bytes, dict[str, str]]:
    body, ctype = multipart_body(images)
    return body, {**AUTH, "Content-Type": ctype}


async def _closed(reader: asyncio.StreamReader, wait: float) -> tuple[bool, bytes]:
    """Read for up to ``wait`` s: (whether the server closed the connection, what it sent)."""
    try:
        data = await asyncio.wait_for(reader.read(65536), wait)
    except asyncio.TimeoutError:
        return False, b""
    except OSError:
        return True, b""
    return not data, data


async def slow_loris(port: int, prefix: bytes, give_up_s: float) -> tuple[float, bytes]:
    """Send ``prefix`` one byte a second until the server closes; (seconds until closed, what it answered)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    answer = b""
    try:
        for i in range(int(give_up_s) + 1):
            try:
                writer.write(prefix[i : i + 1] or b"x")
                await writer.drain()
            except OSError:
                return time.monotonic() - t0, answer
            closed, data = await _closed(reader, 1.0)
            answer += data
            while data and not closed:  # an answer came: read on until the server closes
                closed, data = await _closed(reader, 1.0)
                answer += data
            if closed:
                return time.monotonic() - t0, answer
        return float("inf"), answer
    finally:
        writer.close()


def test_100_slow_loris_connections_are_closed_in_time_while_a_normal_client_is_served_fast(
    gateway: Gateway, bundle: SyntheticBundle
) -> None:
    before = scrape(gateway.url)
    head = b"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"  # never completed
    body_body, body_headers = classify_request(gateway.port, bundle.clean[:1])
    slow_body = request_head("POST", "/classify", gateway.port, {**body_headers, "Content-Length": "100000"})

    async def normal_client(stop: asyncio.Event) -> list[float]:
        client = KeepAliveClient(gateway.port)
        body, headers = classify_request(gateway.port, bundle.clean[:1])
        latencies = []
        for _ in range(5):  # warm this connection
            await client.request("POST", "/classify", body, headers)
        while not stop.is_set():
            t0 = time.perf_counter()
            status, _, _ = await client.request("POST", "/classify", body, headers)
            latencies.append(time.perf_counter() - t0)
            assert status == 200
            await asyncio.sleep(0.01)
        await client.close()
        return latencies

    async def run() -> tuple[list[tuple[float, bytes]], list[tuple[float, bytes]], list[float]]:
        stop = asyncio.Event()
        normal = asyncio.create_task(normal_client(stop))
        heads = [asyncio.create_task(slow_loris(gateway.port, head, 15)) for _ in range(50)]

        async def slow_body_loris() -> tuple[float, bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(slow_body)  # a complete head, then the body a byte a second
            await writer.drain()
            t0 = time.monotonic()
            try:
                for _ in range(15):
                    writer.write(b"x")
                    await writer.drain()
                    closed, data = await _closed(reader, 1.0)
                    answer = data
                    while data and not closed:
                        closed, data = await _closed(reader, 1.0)
                        answer += data
                    if closed:
                        return time.monotonic() - t0, answer
            except OSError:
                return time.monotonic() - t0, b""
            finally:
                writer.close()
            return float("inf"), b""

        bodies = [asyncio.create_task(slow_body_loris()) for _ in range(50)]
        head_results = await asyncio.gather(*heads)
        body_results = await asyncio.gather(*bodies)
        stop.set()
        return head_results, body_results, await normal

    head_results, body_results, latencies = asyncio.run(run())
    head_limit, body_limit = HEADER_TIMEOUT_S + 1.0, BODY_TIMEOUT_S + DRAIN_SECONDS + 1.0
    assert max(s for s, _ in head_results) <= head_limit, sorted(s for s, _ in head_results)[-5:]
    assert max(s for s, _ in body_results) <= body_limit, sorted(s for s, _ in body_results)[-5:]
    assert all(answer.startswith(b"HTTP/1.1 408 ") for _, answer in body_results), body_results[0][1][:200]
    assert all(b"connection: close" in answer.lower() for _, answer in body_results)
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(f"\nnormal client: {len(latencies)} requests, p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms; slow heads closed after <= {max(s for s, _ in head_results):.2f} s, "
          f"slow bodies after <= {max(s for s, _ in body_results):.2f} s")
    assert len(latencies) >= 50 and p99 < 0.050, f"normal client p99 {p99 * 1000:.1f} ms"

    after = scrape(gateway.url)
    delta = lambda name, **labels: sample(after, name, **labels) - sample(before, name, **labels)  # noqa: E731
    assert delta("bna_client_aborts_total", reason="header_timeout") == 50
    assert delta("bna_client_aborts_total", reason="body_timeout") == 50
    assert delta("bna_requests_total", endpoint="/classify", status="408") == 50


def test_50_clients_that_leave_mid_upload_are_no_server_error(gateway: Gateway, bundle: SyntheticBundle) -> None:
    before = scrape(gateway.url)
    body, headers = classify_request(gateway.port, bundle.clean[:1])
    head = request_head("POST", "/classify", gateway.port, {**headers, "Content-Length": str(len(body) + 50_000)})

    async def leaver(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(head + body[: len(body) // 2])
        await writer.drain()
        await asyncio.sleep(0.3)
        if i % 2:
            writer.transport.abort()  # RST
        else:
            writer.close()  # FIN
        await asyncio.sleep(0)

    async def run() -> None:
        await asyncio.gather(*(leaver(i) for i in range(50)))

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = scrape(gateway.url)
        if sample(after, "bna_client_aborts_total", reason="disconnect") - sample(
            before, "bna_client_aborts_total", reason="disconnect"
        ) >= 50:
            break
        time.sleep(0.2)
    delta = lambda name, **labels: sample(after, name, **labels) - sample(before, name, **labels)  # noqa: E731
    assert delta("bna_client_aborts_total", reason="disconnect") == 50
    assert delta("bna_requests_total", endpoint="/classify", status="499") == 50
    server_errors = {dict(k)["status"]: v for (n, k), v in after.items() if n == "bna_requests_total" and dict(k)["status"].startswith("5")}
    assert not {s: v for s, v in server_errors.items() if s != "503"}, server_errors
    log = gateway.log_text()
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("auth", [False, True], ids=["401 without a key", "413 with a key"])
def test_a_refused_1_gib_upload_is_cut_off_not_read(gateway: Gateway, auth: bool) -> None:
    """The server answers and closes the connection after at most a bounded drain, instead of reading
    the whole gigabyte to keep the connection alive."""
    headers = {"Content-Type": "image/png", "Content-Length": str(1 << 30), **(AUTH if auth else {})}
    expected = b"HTTP/1.1 413 " if auth else b"HTTP/1.1 401 "

    async def run() -> tuple[int, bytes, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(request_head("POST", "/classify", gateway.port, headers))
        answer = b""
        sent = 0
        chunk = b"\0" * 65536
        t0 = time.monotonic()

        async def read_all() -> None:
            nonlocal answer
            try:
                while data := await reader.read(65536):
                    answer += data
            except OSError:
                pass

        reading = asyncio.create_task(read_all())
        try:
            while sent < (1 << 30) and time.monotonic() - t0 < 20 and not reading.done():
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
        except OSError:
            pass
        await asyncio.wait_for(reading, 10)
        writer.close()
        return sent, answer, time.monotonic() - t0

    sent, answer, seconds = asyncio.run(run())
    assert answer.startswith(expected), answer[:200]
    assert b"connection: close" in answer.lower()
    assert sent < 64 * 1024 * 1024, f"{sent} bytes were accepted before the connection was closed"
    assert seconds < 10


@pytest.mark.parametrize("auth", [False, True], ids=["401 without a key", "413 with a key"])
def test_a_refused_upload_sent_flat_out_still_gets_its_answer(gateway: Gateway, auth: bool) -> None:
    """The client writes as fast as loopback takes it for a second, then reads (a client busy sending
    on a loaded machine). The server must stop taking bytes rather than close with bytes unread: that
    close sends RST, and an RST throws the answer away on the client's side before the client reads it."""
    headers = {"Content-Type": "image/png", "Content-Length": str(1 << 30), **(AUTH if auth else {})}
    expected = b"HTTP/1.1 413 " if auth else b"HTTP/1.1 401 "
    chunk = b"\0" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(request_head("POST", "/classify", gateway.port, headers))
        sock.setblocking(False)
        writing_until = time.monotonic() + 1.0
        while time.monotonic() < writing_until:
            if not select.select([], [sock], [], 0.05)[1]:
                continue
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                continue
            except OSError as exc:  # EPIPE / ECONNRESET: the server closed on unread bytes
                pytest.fail(f"the connection was reset after {sent} bytes, before the client read: {exc}")
        answer = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and select.select([sock], [], [], 5)[0]:
            try:
                data = sock.recv(65536)
            except OSError as exc:
                pytest.fail(f"reading the answer failed after {len(answer)} bytes: {exc}")
            if not data:
                break
            answer += data
    assert answer.startswith(expected), answer[:200]
    assert b"connection: close" in answer.lower()
    assert sent < 64 * 1024 * 1024


def _wait_for_no_other_connections(gateway: Gateway, timeout_s: float = 10.0) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The metrics once every earlier test's connection has gone: a refused upload's connection lingers
    up to service.connections.LINGER_SECONDS, and would hold a slot of the cap."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = scrape(gateway.url)
        if sample(metrics, "bna_open_connections") <= 1 or time.monotonic() > deadline:  # 1: the scrape itself
            return metrics
        time.sleep(0.2)


def test_a_connection_over_the_cap_gets_a_json_503(gateway: Gateway) -> None:
    before = _wait_for_no_other_connections(gateway)
    assert sample(before, "bna_open_connections") <= 1, "connections of earlier tests still open after 10 s"

    async def run() -> tuple[bytes, int]:
        idle = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(MAX_CONNECTIONS)]
        await asyncio.sleep(0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(request_head("GET", "/healthz", gateway.port))
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        for _, w in idle:
            w.close()
        # a moment later the server has let them go: a new client is served again
        await asyncio.sleep(0.5)
        client = KeepAliveClient(gateway.port)
        status, _, _ = await client.request("GET", "/healthz")
        await client.close()
        return answer, status

    answer, status_after = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"retry-after: 1" in head.lower() and b"application/json" in head.lower()
    assert b"detail" in body
    assert status_after == 200
    after = scrape(gateway.url)
    assert sample(after, "bna_requests_refused_total", reason="connection_limit") - sample(
        before, "bna_requests_refused_total", reason="connection_limit"
    ) == 1


def _huge_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side), 1).save(buf, format="PNG", optimize=True)  # 16 M pixels in a few kB
    return buf.getvalue()


def test_healthz_stays_fast_while_a_request_of_30_huge_images_is_decoded(gateway: Gateway) -> None:
    image = _huge_png(4000)
    body, headers = classify_request(gateway.port, [image] * 30)
    assert len(body) < 200_000  # small in bytes: only the pixel count tells it is heavy

    async def run() -> tuple[int, list[float]]:
        big = KeepAliveClient(gateway.port)
        probe = KeepAliveClient(gateway.port)
        await probe.request("GET", "/healthz")
        heavy = asyncio.create_task(big.request("POST", "/classify", body, headers))
        latencies = []
        while not heavy.done():
            t0 = time.perf_counter()
            status, _, _ = await probe.request("GET", "/healthz")
            latencies.append(time.perf_counter() - t0)
            assert status == 200
            await asyncio.sleep(0.01)
        status, _, _ = await heavy
        await big.close()
        await probe.close()
        return status, latencies

    status, latencies = asyncio.run(run())
    assert status == 200
    print(f"\n/healthz during the decode: {len(latencies)} probes, max {max(latencies) * 1000:.1f} ms, "
          f"median {statistics.median(latencies) * 1000:.1f} ms")
    assert len(latencies) >= 10, "the heavy request was answered too fast to probe anything"
    assert max(latencies) < 0.050, sorted(latencies)[-5:]


def test_no_server_errors_and_nothing_logged_at_error(gateway: Gateway) -> None:
    samples = scrape(gateway.url)
    statuses = {dict(k)["status"] for (n, k), _ in samples.items() if n == "bna_requests_total"}
    assert not {s for s in statuses if s.startswith("5") and s != "503"}, statuses
    assert " ERROR " not in gateway.log_text()
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200
