"""End-to-end: starting and stopping the real gateway (defaults, bad bundles, graceful shutdown)."""
from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx

from serving import REPO, Gateway, serve_command
from synthetic_bundle import SOURCE, TARGET, SyntheticBundle, bundle_fixture


bundle = bundle_fixture(2)


def _multipart(image: bytes, boundary: str) -> bytes:
    return (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.png\"\r\n"
        "Content-Type: image/png\r\n\r\n"
    ).encode() + image + f"\r\n--{boundary}--\r\n".encode()


def test_defaults_need_no_token_and_sigterm_lets_the_in_flight_request_finish(
    bundle: SyntheticBundle, tmp_path: Path
) -> None:
    gateway = Gateway(bundle.path, tmp_path / "gateway.log", env={"BNA_API_KEY": "", "BNA_QUARANTINE_DIR": ""})
    try:
        gateway.wait_ready()
        # Defaults: no API key, no quarantine.
        r = httpx.post(f"{gateway.url}/classify", files={"file": ("t.png", bundle.triggered[0], "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["trigger_detected"] is True

        # A request whose body is still arriving when SIGTERM comes must still be answered.
        boundary = uuid.uuid4().hex
        body = _multipart(bundle.triggered[1], boundary)
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        conn.putrequest("POST", "/classify")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        conn.send(body[:100])
        time.sleep(0.5)  # the server has the headers and is waiting for the rest of the body
        gateway.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert gateway.process.poll() is None, "the gateway exited with a request in flight"
        conn.send(body[100:])
        response = conn.getresponse()
        payload = response.read()
        assert response.status == 200, payload
        prediction = httpx.Response(200, content=payload).json()["predictions"][0]
        assert (prediction["original_label"], prediction["label"]) == (TARGET, SOURCE)
        conn.close()

        # uvicorn re-raises the signal it caught once shutdown is complete, hence -SIGTERM rather than 0
        assert gateway.process.wait(timeout=30) in (0, -signal.SIGTERM)
        log = gateway.log_text()
        assert "draining" in log and "Application shutdown complete" in log and "Traceback" not in log
    finally:
        gateway.terminate()


def _serve_fails(bundle: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        serve_command(bundle, 1) + list(extra), cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_a_tampered_bundle_is_refused_before_serving(bundle: SyntheticBundle, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle.path, broken)
    twin = next(broken.glob("twin_*.safetensors"))
    data = bytearray(twin.read_bytes())
    data[-1] ^= 0xFF
    twin.write_bytes(bytes(data))
    result = _serve_fails(broken)
    assert result.returncode != 0
    assert "checksum mismatch" in result.stderr


def test_more_than_one_worker_is_refused(bundle: SyntheticBundle) -> None:
    result = _serve_fails(bundle.path, "--workers", "2")
    assert result.returncode != 0
    assert "one worker process per device" in result.stderr


def test_a_bundle_naming_an_unknown_architecture_is_a_plain_error(bundle: SyntheticBundle, tmp_path: Path) -> None:
    broken = tmp_path / "unknown-arch"
    shutil.copytree(bundle.path, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["model"]["arch"] = "no_such_architecture"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    result = _serve_fails(broken)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "bna serve: error:" in result.stderr and "no_such_architecture" in result.stderr
    assert "Traceback" not in result.stderr
