"""Start the real gateway (``bna serve``) as a subprocess on a free loopback port, and talk to it.

``serve_command`` is the argv the tests run; the deployment test compares it with the Dockerfile's
entrypoint, so both start the gateway the same way.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import httpx

BNA = Path(sys.executable).with_name("bna")
REPO = Path(__file__).resolve().parents[1]


def serve_command(bundle: Path | str, port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line that serves ``bundle`` on ``host:port``."""
    return [str(BNA), "serve", str(bundle), "--host", host, "--port", str(port)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    """A running ``bna serve`` process; ``url`` is its base URL, ``log`` its combined output."""

    def __init__(self, bundle: Path, log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        full_env = {**os.environ, "BNA_TORCH_THREADS": "1", **(env or {})}
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            serve_command(bundle, self.port), cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"gateway not ready after {timeout:.0f} s:\n{self.log_text()[-4000:]}")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return int(self.process.returncode)


@contextmanager
def running_gateway(bundle: Path, log_path: Path, env: Mapping[str, str] | None = None) -> Iterator[Gateway]:
    gateway = Gateway(bundle, log_path, env)
    try:
        gateway.wait_ready()
        yield gateway
    finally:
        gateway.terminate()


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``GET url/metrics`` parsed into ``{(sample name, labels): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def server_rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def multipart_body(images: list[bytes], boundary: str = "bnatestboundary") -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with one ``file`` part per image, and its content type."""
    body = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{i}.png\"\r\n"
        "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n"
        for i, data in enumerate(images)
    )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request_head(method: str, path: str, port: int, headers: Mapping[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_response(reader: "asyncio.StreamReader") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length framed, as the gateway sends): status, headers, body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


class KeepAliveClient:
    """One keep-alive connection that sends whole requests and reads whole responses (asyncio streams):
    light enough that a test can run hundreds of them beside the server on two cores."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        all_headers = {**(headers or {}), **({"Content-Length": str(len(body))} if body or method == "POST" else {})}
        self.writer.write(request_head(method, path, self.port, all_headers) + body)
        await self.writer.drain()
        status, response_headers, data = await read_response(self.reader)
        if response_headers.get("connection", "").lower() == "close":
            await self.close()
        return status, response_headers, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None
