"""Load generation for bench/serving.py: a minimal asyncio HTTP/1.1 client (or httpx), measured cells.

Each concurrent client is one coroutine with its own keep-alive connection, sending pre-encoded
multipart bodies back to back. A cell runs for a warm-up period (not counted), then a measuring window:
requests that complete inside the window count towards requests/s, images/s and the latency
percentiles; the server process's CPU time over the window is read from /proc.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger("bench.loadgen")

BOUNDARY = "bnabenchboundary7d1f"
LOAD_TOOLS = {
    "raw": "asyncio HTTP/1.1 keep-alive client (bench/loadgen.py), one connection per concurrent client, pre-encoded bodies",
    "httpx": "httpx.AsyncClient, one pooled connection per concurrent client, pre-encoded bodies",
}


def multipart_bodies(images: list[bytes], per_request: int, count: int = 16) -> list[bytes]:
    bodies = []
    for k in range(count):
        body = b""
        for j in range(per_request):
            data = images[(k * per_request + j) % len(images)]
            body += (
                f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{j}.png\"\r\n"
                "Content-Type: image/png\r\n\r\n"
            ).encode() + data + b"\r\n"
        bodies.append(body + f"--{BOUNDARY}--\r\n".encode())
    return bodies


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Cell:
    system: str
    traffic: str
    images_per_request: int
    concurrency: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    flagged_fraction: float | None = None
    server_cpu_ms_per_image: float | None = None
    x_bare: float | None = None
    x_naive: float | None = None


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client connection on asyncio streams (the default load tool)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                data += chunk[:-2]
        else:
            data = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except ConnectionError:
                pass
        self.reader = self.writer = None


async def drive(url: str, bodies: list[bytes], concurrency: int, warmup: float, seconds: float,
                 tool: str, server_pid: int | None) -> tuple[list[float], int, float, bytes, float | None]:
    parsed = httpx.URL(url)
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    latencies: list[float] = []
    errors = 0
    sample_body = b""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120.0) as client:
        start = time.perf_counter()
        measure_from, stop = start + warmup, start + warmup + seconds

        async def worker(k: int) -> None:
            nonlocal errors, sample_body
            conn = RawConnection(parsed.host, parsed.port or 80)
            i = k
            try:
                while True:
                    t0 = time.perf_counter()
                    if t0 >= stop:
                        return
                    body = bodies[i % len(bodies)]
                    if tool == "httpx":
                        r = await client.post(url, content=body, headers={"Content-Type": content_type})
                        status, data = r.status_code, r.content
                    else:
                        status, data = await conn.post(parsed.raw_path.decode(), body, content_type)
                    t1 = time.perf_counter()
                    i += concurrency
                    if not sample_body and status == 200:
                        sample_body = data
                    if measure_from <= t1 <= stop:
                        if status == 200:
                            latencies.append(t1 - t0)
                        else:
                            errors += 1
            finally:
                await conn.close()

        cpu: list[float | None] = []

        async def cpu_at_window_edges() -> None:
            for edge in (measure_from, stop):
                await asyncio.sleep(max(0.0, edge - time.perf_counter()))
                cpu.append(process_cpu_seconds(server_pid) if server_pid else None)

        await asyncio.gather(cpu_at_window_edges(), *(worker(k) for k in range(concurrency)))
    server_cpu = cpu[1] - cpu[0] if len(cpu) == 2 and None not in cpu else None  # type: ignore[operator]
    return latencies, errors, seconds, sample_body, server_cpu


def measure(system: str, url: str, traffic: str, images: list[bytes], per_request: int, concurrency: int,
            warmup: float, seconds: float, tool: str = "raw", server_pid: int | None = None) -> Cell:
    bodies = multipart_bodies(images, per_request)
    latencies, errors, window, body, server_cpu = asyncio.run(
        drive(url, bodies, concurrency, warmup, seconds, tool, server_pid))
    n = len(latencies)
    ms = sorted(x * 1000 for x in latencies) or [float("nan")]
    flagged = None
    if body and system == "gateway":
        preds = json.loads(body)["predictions"]
        flagged = sum(p["trigger_detected"] for p in preds) / len(preds)
    cell = Cell(
        system, traffic, per_request, concurrency, n, errors, window, n / window, n * per_request / window,
        ms[len(ms) // 2], ms[min(len(ms) - 1, int(0.99 * len(ms)))], flagged,
        server_cpu * 1000 / (n * per_request) if server_cpu is not None and n else None,
    )
    log.info("%-7s %-9s %2d img/req c=%-2d  %7.1f req/s %8.1f img/s  p50 %6.1f ms  p99 %6.1f ms  errors %d",
             system, traffic, per_request, concurrency, cell.requests_per_s, cell.images_per_s, cell.p50_ms,
             cell.p99_ms, errors)
    return cell


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
