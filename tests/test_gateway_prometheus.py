"""End-to-end: a real Prometheus server scrapes the real gateway; a PromQL query sees the detections."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from serving import Gateway, free_port, running_gateway
from synthetic_bundle import SOURCE, TARGET, SyntheticBundle, bundle_fixture

_IN_VENV = Path(sys.executable).with_name("prometheus")  # where 'make prometheus' unpacks it
PROMETHEUS = shutil.which("prometheus") or (str(_IN_VENV) if _IN_VENV.is_file() else None)
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="no 'prometheus' binary on PATH or in the venv ('make prometheus' fetches Debian's package)",
)


bundle = bundle_fixture(4)


@pytest.fixture(scope="module")
def gateway(bundle: SyntheticBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    env = {"BNA_API_KEY": "", "BNA_QUARANTINE_DIR": ""}
    with running_gateway(bundle.path, tmp_path_factory.mktemp("logs") / "gateway.log", env) as gw:
        yield gw


@pytest.fixture(scope="module")
def prometheus(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert PROMETHEUS is not None
    root = tmp_path_factory.mktemp("prometheus")
    config = root / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: bna-gateway\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{gateway.port}']\n"
    )
    port = free_port()
    log = open(root / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (root / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "Prometheus was not ready in 60 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def test_prometheus_sees_the_trigger_counter(gateway: Gateway, prometheus: str, bundle: SyntheticBundle) -> None:
    files = [("file", (f"t{i}.png", img, "image/png")) for i, img in enumerate(bundle.triggered)]
    r = httpx.post(f"{gateway.url}/classify", files=files, timeout=30)
    assert r.status_code == 200
    assert all(p["trigger_detected"] for p in r.json()["predictions"])

    promql = f'bna_triggers_detected_total{{job="bna-gateway",target_class="{TARGET}",corrected_class="{SOURCE}"}}'
    deadline = time.monotonic() + 60
    while True:
        result = _query(prometheus, promql)
        if result and float(result[0]["value"][1]) >= len(bundle.triggered):
            break
        assert time.monotonic() < deadline, f"Prometheus never saw the detections: {result}"
        time.sleep(0.5)
    assert _query(prometheus, 'up{job="bna-gateway"}')[0]["value"][1] == "1"
    info = _query(prometheus, "bna_bundle_info")
    assert info and info[0]["metric"]["version"] == r.json()["bundle_version"]
