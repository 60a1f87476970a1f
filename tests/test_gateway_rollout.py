"""End-to-end: bundle roll-outs without downtime: a re-pointed symlink or SIGHUP swaps the bundle under
load; a corrupted bundle is refused and the old one keeps serving."""
from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serving import KeepAliveClient, multipart_body, running_gateway, sample, scrape
from synthetic_bundle import SyntheticBundle, bundle_fixture

CONCURRENCY = 32
SWAPS = 5


bundle = bundle_fixture(4)


def release(source: Path, releases: Path, version: str) -> Path:
    """A copy of ``source`` under ``releases/version`` that says it is ``version`` (the files it
    lists, and so their checksums, are unchanged)."""
    out = releases / version
    shutil.copytree(source, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["bundle_version"] = version
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def corrupted(source: Path, releases: Path, version: str) -> Path:
    out = release(source, releases, version)
    twin = next(out.glob("twin_*.safetensors"))
    data = bytearray(twin.read_bytes())
    data[len(data) // 2] ^= 0xFF
    twin.write_bytes(bytes(data))
    return out


def repoint(link: Path, target: Path) -> None:
    """Re-point ``link`` atomically, as docs/deployment.md says: ``ln -sfn new tmp && mv -T tmp link``."""
    tmp = link.with_name(link.name + ".tmp")
    subprocess.run(["ln", "-sfn", str(target), str(tmp)], check=True)
    subprocess.run(["mv", "-T", str(tmp), str(link)], check=True)


def bundle_info_version(url: str) -> str:
    (labels,) = [dict(k) for (name, k), _ in scrape(url).items() if name == "bna_bundle_info"]
    return labels["version"]


def wait_until(condition, timeout: float = 60.0, what: str = "condition") -> float:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(f"{what} not met within {timeout} s")


@dataclass
class Answer:
    started: float
    status: int | str
    version: str | None


class Load:
    """``CONCURRENCY`` keep-alive clients sending one-image requests back to back, in a thread."""

    def __init__(self, port: int, images: list[bytes]) -> None:
        self.port = port
        self.bodies = [multipart_body([image]) for image in images]
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _client(self, k: int) -> None:
        client = KeepAliveClient(self.port)
        i = k
        while not self._stop.is_set():
            body, ctype = self.bodies[i % len(self.bodies)]
            i += 1
            started = time.monotonic()
            try:
                status, _, data = await client.request("POST", "/classify", body, {"Content-Type": ctype})
                version = json.loads(data)["bundle_version"] if status == 200 else None
            except (OSError, asyncio.IncompleteReadError) as exc:
                status, version = type(exc).__name__, None
                await client.close()
            self.answers.append(Answer(started, status, version))
        await client.close()

    async def _run(self) -> None:
        await asyncio.gather(*(self._client(k) for k in range(CONCURRENCY)))

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@pytest.fixture()
def releases(tmp_path: Path) -> Path:
    folder = tmp_path / "releases"
    folder.mkdir()
    return folder


def test_five_swaps_under_load_lose_no_request_and_a_corrupted_bundle_is_refused(
    bundle: SyntheticBundle, releases: Path, tmp_path: Path
) -> None:
    current = tmp_path / "current"
    repoint(current, release(bundle.path, releases, "v0"))
    env = {"BNA_API_KEY": "", "BNA_QUARANTINE_DIR": "", "BNA_BUNDLE_WATCH_INTERVAL_S": "0.2", "BNA_MAX_BATCH_SIZE": "16"}
    with running_gateway(current, tmp_path / "gateway.log", env) as gateway:
        assert bundle_info_version(gateway.url) == "v0"
        switched: list[tuple[str, float, float]] = []  # version, re-pointed at, seen in bna_bundle_info at
        with Load(gateway.port, bundle.clean + bundle.triggered) as load:
            time.sleep(1.0)
            for k in range(1, SWAPS + 1):
                if k == 3:  # a corrupted bundle first: refused, v2 keeps serving
                    failures = sample(scrape(gateway.url), "bna_bundle_reloads_total", result="failure")
                    repoint(current, corrupted(bundle.path, releases, "broken"))
                    wait_until(lambda: sample(scrape(gateway.url), "bna_bundle_reloads_total", result="failure")
                               == failures + 1, what="the corrupted bundle refused")
                    assert bundle_info_version(gateway.url) == "v2"
                    time.sleep(0.5)
                version = f"v{k}"
                repointed = time.monotonic()
                repoint(current, release(bundle.path, releases, version))
                seen = wait_until(lambda: bundle_info_version(gateway.url) == version, what=f"{version} served")
                switched.append((version, repointed, seen))
                time.sleep(1.0)
        samples = scrape(gateway.url)
        log = gateway.log_text()

    answers = load.answers
    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {sorted({str(a.status) for a in failed})}"
    assert len(answers) > 100
    for (version, _, seen), following in zip(switched, [*switched[1:], (None, float("inf"), None)]):
        after = [a for a in answers if seen < a.started < following[1]]
        assert after and all(a.version == version for a in after), (version, {a.version for a in after})
    assert {a.version for a in answers} == {f"v{k}" for k in range(SWAPS + 1)}, "broken never answered"
    assert sample(samples, "bna_bundle_reloads_total", result="success") == SWAPS
    assert sample(samples, "bna_bundle_reloads_total", result="failure") == 1
    assert "checksum mismatch" in log and "still serving v2" in log


def test_sighup_rolls_out_what_the_path_names_and_a_bad_bundle_keeps_the_old(
    bundle: SyntheticBundle, releases: Path, tmp_path: Path
) -> None:
    current = tmp_path / "current"
    repoint(current, release(bundle.path, releases, "first"))
    env = {"BNA_API_KEY": "", "BNA_QUARANTINE_DIR": "", "BNA_BUNDLE_WATCH_INTERVAL_S": "0", "BNA_MAX_BATCH_SIZE": "8"}
    image = [("file", ("x.png", bundle.triggered[0], "image/png"))]
    with running_gateway(current, tmp_path / "gateway.log", env) as gateway:
        repoint(current, release(bundle.path, releases, "second"))
        time.sleep(1.0)
        assert httpx.post(f"{gateway.url}/classify", files=image).json()["bundle_version"] == "first"  # not watched
        gateway.process.send_signal(signal.SIGHUP)
        wait_until(lambda: bundle_info_version(gateway.url) == "second", what="SIGHUP roll-out")
        answer = httpx.post(f"{gateway.url}/classify", files=image).json()
        assert answer["bundle_version"] == "second" and answer["predictions"][0]["trigger_detected"] is True

        bad = release(bundle.path, releases, "no-such-arch")
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["model"]["arch"] = "no_such_architecture"
        (bad / "manifest.json").write_text(json.dumps(manifest))
        repoint(current, bad)
        gateway.process.send_signal(signal.SIGHUP)
        wait_until(lambda: sample(scrape(gateway.url), "bna_bundle_reloads_total", result="failure") == 1,
                   what="the bad bundle refused")
        assert httpx.post(f"{gateway.url}/classify", files=image).json()["bundle_version"] == "second"
        assert httpx.get(f"{gateway.url}/readyz").status_code == 200
        gateway.process.send_signal(signal.SIGHUP)  # the same bad bundle again: refused again, still serving
        wait_until(lambda: sample(scrape(gateway.url), "bna_bundle_reloads_total", result="failure") == 2,
                   what="the bad bundle refused twice")
        assert gateway.process.poll() is None
        log = gateway.log_text()
    assert "no_such_architecture" in log and "Traceback" not in log
