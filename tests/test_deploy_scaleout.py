"""Scale-out, checked statically and with the real parts that run here: the compose files against the
Compose Specification, the load balancer (nginx's own config test, then nginx in front of a real gateway),
and Prometheus finding every replica by DNS service discovery."""
from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from deploy_parsing import container_ports, find_tool, load_yaml, volume_mounts
from serving import Gateway, free_port, running_gateway
from synthetic_bundle import SyntheticBundle, bundle_fixture
from bna_gateway.service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = ROOT / "docker" / "nginx" / "nginx.conf"
COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(ROOT / "docker-compose.yml")


@pytest.fixture(scope="module")
def nginx_conf() -> str:
    return NGINX_CONF.read_text()


def test_compose_files_follow_the_compose_specification() -> None:
    checker = find_tool("check-jsonschema")
    assert checker, "check-jsonschema is a test dependency (pip install -e .[test])"
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", *map(str, COMPOSE_FILES)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_replicas_behind_one_load_balancer(compose: dict, nginx_conf: str) -> None:
    services = compose["services"]
    gateway, lb = services["gateway"], services["lb"]
    replicas = re.fullmatch(r"\$\{BNA_GATEWAY_REPLICAS:-(\d+)\}", str(gateway["deploy"]["replicas"]))
    assert replicas and int(replicas.group(1)) >= 2, gateway["deploy"]
    assert "ports" not in gateway and "container_name" not in gateway, "replicas cannot share a name or a host port"
    assert re.match(r"nginx:\d", lb["image"])
    assert lb["depends_on"]["gateway"]["condition"] == "service_healthy"
    (published,) = lb["ports"]
    assert published.startswith("${GATEWAY_PORT:-8000}:")
    listen = re.search(r"^\s*listen\s+(\d+);", nginx_conf, re.M)
    assert listen and container_ports(lb) == [listen.group(1)]
    assert volume_mounts(lb)["/etc/nginx/nginx.conf"] == ("./docker/nginx/nginx.conf", True)
    assert lb.get("read_only") is True and "/tmp" in lb["tmpfs"]
    # nginx asks Docker's DNS for every replica of the gateway service, on the port they expose
    upstream = re.search(r"set \$gateway http://([\w-]+):(\d+);", nginx_conf)
    assert upstream and upstream.group(1) == "gateway" and [upstream.group(2)] == [str(p) for p in gateway["expose"]]
    assert re.search(r"^\s*resolver 127\.0\.0\.11 valid=\d+s", nginx_conf, re.M), "re-resolved, so scaling is followed"


def test_load_balancer_limits_agree_with_the_gateway(nginx_conf: str) -> None:
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    size = re.search(r"client_max_body_size (\d+)m;", nginx_conf)
    assert size and int(size.group(1)) * 1024 * 1024 == defaults.max_body_bytes
    head = re.search(r"client_header_timeout (\d+)s;", nginx_conf)
    body = re.search(r"client_body_timeout (\d+)s;", nginx_conf)
    assert head and int(head.group(1)) <= defaults.header_timeout_s
    assert body and int(body.group(1)) <= defaults.body_timeout_s
    retry = re.search(r"location = /classify \{(.*?)\}", nginx_conf, re.S)
    assert retry and "http_503" in retry.group(1) and "proxy_next_upstream_timeout" in retry.group(1)


def test_prometheus_discovers_every_replica_by_dns(compose: dict) -> None:
    config = load_yaml(ROOT / "docker" / "prometheus" / "prometheus.yml")
    job = {j["job_name"]: j for j in config["scrape_configs"]}["bna-gateway"]
    assert "static_configs" not in job
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["gateway"] and sd.get("type", "SRV") == "A"
    assert [str(sd["port"])] == [str(p) for p in compose["services"]["gateway"]["expose"]]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def nginx_binary() -> str:
    found = find_tool("nginx")
    if not found:
        pytest.skip("nginx is not installed (Debian package `nginx`; `make test` unpacks its binary into the venv)")
    return found


def test_nginx_accepts_the_load_balancer_config(tmp_path: Path) -> None:
    result = subprocess.run(
        [nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(NGINX_CONF), "-e", "stderr"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr


# -- nginx with this config in front of a real gateway ------------------------------------------------


bundle = bundle_fixture(2)


@pytest.fixture(scope="module")
def balanced(bundle: SyntheticBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Gateway]]:
    """nginx on a free loopback port, its upstream the real gateway's address instead of compose's
    `gateway` name (the one line that differs), in one process as the invoking user."""
    binary = nginx_binary()
    root = tmp_path_factory.mktemp("nginx")
    with running_gateway(bundle.path, root / "gateway.log", {"BNA_API_KEY": "", "BNA_QUARANTINE_DIR": ""}) as gateway:
        port = free_port()
        conf = NGINX_CONF.read_text()
        conf = conf.replace("http://gateway:8000", f"http://127.0.0.1:{gateway.port}")
        conf = re.sub(r"^(\s*)listen \d+;", rf"\1listen 127.0.0.1:{port};", conf, flags=re.M)
        conf = conf.replace("/tmp/", f"{root}/")
        (root / "nginx.conf").write_text(conf)
        log = open(root / "nginx.log", "wb")
        proc = subprocess.Popen(
            [binary, "-p", str(root), "-c", str(root / "nginx.conf"), "-e", "stderr", "-g", "daemon off; master_process off;"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError((root / "nginx.log").read_text())
                    time.sleep(0.1)
            yield f"http://127.0.0.1:{port}", gateway
        finally:
            proc.terminate()
            proc.wait(timeout=15)
            log.close()


def test_the_load_balancer_passes_classify_and_health_and_hides_the_rest(
    balanced: tuple[str, Gateway], bundle: SyntheticBundle
) -> None:
    url, _ = balanced
    r = httpx.post(f"{url}/classify", files={"file": ("t.png", bundle.triggered[0], "image/png")},
                   headers={"X-Request-ID": "through-the-lb"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["request_id"] == "through-the-lb" and r.json()["predictions"][0]["trigger_detected"] is True
    generated = httpx.post(f"{url}/classify", files={"file": ("c.png", bundle.clean[0], "image/png")}, timeout=30)
    assert re.fullmatch(r"[0-9a-f]{32}", generated.json()["request_id"]), "nginx's request id is passed on"
    for path in ("/healthz", "/readyz", "/v1/model", "/v2/health/ready"):
        assert httpx.get(f"{url}{path}", timeout=10).status_code == 200, path
    for path in ("/metrics", "/docs", "/openapi.json", "/anything"):
        hidden = httpx.get(f"{url}{path}", timeout=10)
        assert hidden.status_code == 404 and hidden.json() == {"detail": "not found"}, path
    assert httpx.get(f"{url}/lb-healthz", timeout=10).json() == {"status": "ok"}
    bad = httpx.post(f"{url}/classify", content=b"nope", headers={"Content-Type": "image/png"}, timeout=10)
    assert bad.status_code == 400 and "detail" in bad.json(), "the gateway's own errors come through"


def test_no_replica_left_is_a_json_503_with_retry_after(balanced: tuple[str, Gateway], bundle: SyntheticBundle) -> None:
    url, gateway = balanced
    gateway.terminate()
    r = httpx.post(f"{url}/classify", files={"file": ("t.png", bundle.clean[0], "image/png")}, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json() == {"detail": "no gateway replica answered; retry later"}
