"""Start the real gateway (``bna serve``) as a subprocess on a free loopback port, for tests and benchmarks.

``serve_command`` is the argv the tests run; the deployment test compares it with the Dockerfile's
entrypoint, so both start the gateway the same way.
"""
from __future__ import annotations

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
