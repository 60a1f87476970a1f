"""Deployment files, checked statically (no Docker engine needed).

The Dockerfile, docker-compose.yml (+ the GPU override), the Prometheus configuration and the Grafana
provisioning must agree with each other, with the ``bna`` command line, and with what a real gateway
exports on ``/metrics``.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from mitigation.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
PROMETHEUS_DIR = DOCKER / "prometheus"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "bna-gateway.json"
GRAFANA_PROVISIONING = DOCKER / "grafana" / "provisioning"
BUNDLE_VOLUME = "bundle"


# ---------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"final stage has no {keyword}"
        return found[-1]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, each a list of (KEYWORD, arguments) with continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages and keyword == "ARG":
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


def arg_defaults(stage: Stage) -> dict[str, str]:
    return {k: v for k, _, v in (a.partition("=") for a in stage.all("ARG"))}


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(ROOT / "Dockerfile")


@pytest.fixture(scope="module")
def runtime(dockerfile) -> Stage:
    return dockerfile[1][-1]


def healthcheck_command(stage: Stage) -> list[str]:
    args = stage.last("HEALTHCHECK")
    _, _, cmd = args.partition(" CMD ")
    return exec_form(cmd.strip())


def image_command(stage: Stage) -> list[str]:
    return exec_form(stage.last("ENTRYPOINT")) + exec_form(stage.last("CMD"))


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def test_dockerfile_is_multistage_slim_non_root(dockerfile, runtime):
    global_args, stages = dockerfile
    assert len(stages) >= 2, "the Dockerfile should build in one stage and run in a smaller one"
    assert all(s.base == "python:3.11-slim" for s in stages), [s.base for s in stages]
    assert any(kw == "COPY" and args.startswith("--from=") for kw, args in runtime.instructions)
    user = runtime.last("USER").split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert any("useradd" in a and user in a for a in runtime.all("RUN")), f"user {user} is never created"


def test_dockerfile_torch_variant_is_a_build_arg(dockerfile):
    _, stages = dockerfile
    build = stages[0]
    defaults = arg_defaults(build)
    assert defaults.get("TORCH_INDEX_URL", "").endswith("/whl/cpu"), "CPU PyTorch must be the default"
    installs = [a for a in build.all("RUN") if "pip install" in a and "torch==" in a]
    assert installs and "${TORCH_INDEX_URL}" in installs[0] and "${TORCH_VERSION}" in installs[0]
    make_spec = re.search(r"^TORCH_SPEC\s*\?=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert make_spec, "Makefile has no TORCH_SPEC"
    assert defaults.get("TORCH_VERSION") == make_spec.group(1), "the image and `make env` should install the same torch"
    # The project itself goes in after torch, so its torch requirement is already satisfied.
    runs = build.all("RUN")
    assert any("pip install ." in r for r in runs[runs.index(installs[0]) + 1 :])


def test_dockerfile_healthcheck_probes_readyz_on_the_exposed_port(runtime):
    exposed = runtime.last("EXPOSE").split("/")[0]
    command = image_command(runtime)
    assert option(command, "--port") == exposed
    probe = " ".join(healthcheck_command(runtime))
    assert f"http://127.0.0.1:{exposed}/readyz" in probe
    assert "urllib" in probe, "python:3.11-slim has no curl or wget"


def test_image_entrypoint_is_the_serve_command_of_the_cli(runtime):
    command = image_command(runtime)
    assert command[:2] == ["bna", "serve"]
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.bundle, args.host) == ("serve", "/bundle", "0.0.0.0")
    assert "/bundle" in next(a for a in runtime.all("RUN") if "mkdir" in a), "the image should own /bundle"


def test_image_entrypoint_is_what_the_end_to_end_tests_start(runtime):
    serving = pytest.importorskip("tests.serving", reason="tests/serving.py (the gateway's test helpers) is not there yet")
    e2e = [str(a) for a in serving.serve_command("/bundle", 8000)]
    image = image_command(runtime)
    assert Path(e2e[0]).name == image[0] == "bna"
    # Same program, sub-command, bundle and flags; only the listening address differs (loopback in tests).
    assert e2e[1:] == [a if a != "0.0.0.0" else "127.0.0.1" for a in image[1:]]


def test_dockerignore_keeps_heavy_things_out_but_not_the_sources(dockerfile):
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    for needed in (".venv", ".git", "artifacts", "data", "bundles", "**/__pycache__", ".pytest_cache"):
        assert needed in patterns, f".dockerignore should exclude {needed}"
    sources = []
    for stage in dockerfile[1]:
        for args in stage.all("COPY"):
            if args.startswith("--from="):
                continue
            sources += [s for s in args.split() if not s.startswith("--")][:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file"
        top = Path(src).parts[0]
        assert top not in patterns and src not in patterns, f".dockerignore drops {src}, which the Dockerfile copies"


# ---------------------------------------------------------------- docker-compose


def load_yaml(path: Path) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(ROOT / "docker-compose.yml")


def volume_mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only), short syntax; ``${VAR:-default}`` in a source stays as written."""
    mounts = {}
    for spec in service.get("volumes", []):
        parts = re.findall(r"(?:\$\{[^}]*\}|[^:])+", spec)
        mounts[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return mounts


def container_ports(service: dict) -> list[str]:
    return [str(p).rsplit(":", 1)[-1].split("/")[0] for p in service.get("ports", [])]


def test_compose_defines_every_service_and_volume(compose):
    services = compose["services"]
    assert set(services) == {"demo", "gateway", "mitigate", "prometheus", "grafana"}
    assert services["mitigate"].get("profiles") == ["mitigate"], "mitigate is a one-shot under its own profile"
    assert all("profiles" not in services[s] for s in services if s != "mitigate"), "`docker compose up` runs the rest"
    ours = [services[s] for s in ("demo", "gateway", "mitigate")]
    assert len({s["image"] for s in ours}) == 1, "demo, gateway and mitigate run the one image"
    for s in ours:
        assert s["build"]["context"] == "." and (ROOT / s["build"]["dockerfile"]).is_file()
        assert "TORCH_INDEX_URL" in s["build"]["args"]
    for s in services.values():
        for source, _ in volume_mounts(s).values():
            if source.startswith("${"):  # a host folder the operator names, e.g. ${BNA_MODEL_DIR:-./input/model}
                assert re.fullmatch(r"\$\{BNA_\w+:-\./[\w./-]+\}", source), source
            elif source.startswith("./"):
                assert (ROOT / source).exists(), f"bind mount {source} does not exist"
            else:
                assert source in compose["volumes"], f"named volume {source} is not declared"


def test_compose_gateway_agrees_with_the_dockerfile(compose, runtime):
    gateway = compose["services"]["gateway"]
    exposed = runtime.last("EXPOSE").split("/")[0]
    assert container_ports(gateway) == [exposed]
    assert gateway["command"] == exec_form(runtime.last("CMD")), "compose should run the image's own command"
    assert "entrypoint" not in gateway
    test = gateway["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:] == healthcheck_command(runtime)
    bundle_dir = gateway["command"][0]
    assert volume_mounts(gateway)[bundle_dir] == (BUNDLE_VOLUME, True), "the bundle is mounted read-only"


def test_compose_demo_is_the_default_bundle_source(compose, runtime):
    services = compose["services"]
    assert services["gateway"]["depends_on"]["demo"]["condition"] == "service_completed_successfully"
    demo = services["demo"]
    assert volume_mounts(demo)["/bundle"] == (BUNDLE_VOLUME, False)
    assert demo["healthcheck"] == {"disable": True}, "a one-shot job has no /readyz to probe"
    script_name = demo["entrypoint"][0]
    copies = [a.split() for a in runtime.all("COPY") if a.split()[-1].endswith("/" + script_name)]
    assert copies, f"the image does not install {script_name}"
    script = ROOT / copies[0][-2]
    subprocess.run(["sh", "-n", str(script)], check=True)
    text = script.read_text()
    assert "manifest.json" in text, "the demo must not overwrite an existing bundle"
    demo_call = re.search(r'^bna demo --out "\$DEMO_DIR"', text, re.M)
    assert demo_call, "the script should run `bna demo --out DIR`"
    assert build_parser().parse_args(["demo", "--out", "/demo"]).command == "demo"
    assert volume_mounts(demo)[demo["environment"]["BNA_DEMO_DIR"]][0] in compose["volumes"]


def test_compose_mitigate_writes_the_bundle_the_gateway_serves(compose):
    mitigate = compose["services"]["mitigate"]
    argv = mitigate["entrypoint"] + mitigate["command"]
    assert argv[:2] == ["bna", "mitigate"]
    args = build_parser().parse_args(argv[1:])
    mounts = volume_mounts(mitigate)
    assert mounts[args.out] == (BUNDLE_VOLUME, False)
    assert mounts[args.model][1] and mounts[args.clean][1], "model and clean folder are mounted read-only"
    assert mitigate["healthcheck"] == {"disable": True}


def test_gpu_override_reserves_nvidia_gpus_and_builds_cuda_torch(compose):
    gpu = load_yaml(ROOT / "docker-compose.gpu.yml")
    assert set(gpu["services"]) <= set(compose["services"])
    gateway = gpu["services"]["gateway"]
    devices = gateway["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "cuda" in str(gateway["environment"]["BNA_DEVICE"])
    assert "/whl/cpu" not in gateway["build"]["args"]["TORCH_INDEX_URL"]
    assert gateway["image"] != compose["services"]["gateway"]["image"], "CPU and CUDA images get different tags"


def test_prometheus_scrapes_the_gateway_service(compose):
    services = compose["services"]
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    job = jobs["bna-gateway"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    port = container_ports(services["gateway"])[0]
    assert targets == [f"gateway:{port}"]
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_DIR / rule_file).is_file()
    prometheus = services["prometheus"]
    mounts = volume_mounts(prometheus)
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])
    assert mounts[str(config_path.parent)] == ("./docker/prometheus", True)


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(compose):
    services = compose["services"]
    datasources = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    (source,) = [d for d in datasources if d["type"] == "prometheus"]
    prometheus_port = container_ports(services["prometheus"])[0]
    assert source["url"] == f"http://prometheus:{prometheus_port}"
    mounts = volume_mounts(services["grafana"])
    assert mounts["/etc/grafana/provisioning"] == ("./docker/grafana/provisioning", True)
    (provider,) = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "bna-gateway.yml")["providers"]
    assert mounts[provider["options"]["path"]][0] == "./" + str(DASHBOARD.parent.relative_to(ROOT))
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]
    exprs = " ".join(dashboard_exprs())
    for needed in ("rate(bna_requests_total", "histogram_quantile(0.5, sum by (le) (rate(bna_inference_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(bna_inference_seconds_bucket", "bna_batch_size_bucket",
                   "sum by (target_class) (rate(bna_twin_checks_total",
                   "sum by (target_class, corrected_class) (rate(bna_triggers_detected_total"):
        assert needed in exprs, f"the dashboard lacks {needed}"


# ---------------------------------------------------------------- PromQL: valid, and only metrics the gateway exports

# Grafana's interval variables, replaced by plain durations so that Prometheus' parser accepts the query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan"}
# Series Prometheus itself writes for every scrape target (not on the gateway's /metrics).
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added",
                     "scrape_samples_post_metric_relabeling"}
TARGET_LABELS = {"job", "instance"}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]


def alert_exprs() -> list[str]:
    groups = load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def promql_references(expr: str) -> tuple[set[str], set[str]]:
    """Metric names and label names a PromQL expression uses."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    labels = {name for m in re.finditer(grouping, expr) for name in re.findall(r"[A-Za-z_]\w*", m.group(1))}
    expr = re.sub(grouping, " ", expr)
    for m in re.finditer(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", m.group(1)))
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    metrics = set()
    for m in re.finditer(r"\d[\w.]*|([A-Za-z_:][\w:]*)(\s*\()?", expr):
        name, call = m.group(1), m.group(2)
        if name and not call and name.lower() not in PROMQL_WORDS:
            metrics.add(name)
    return metrics, labels


def test_promql_reference_extraction():
    metrics, labels = promql_references(
        'histogram_quantile(0.99, sum by (le) (rate(bna_inference_seconds_bucket[$__rate_interval]))) '
        '/ on (job) group_left sum(rate(bna_requests_total{status=~"5..", endpoint!="/x"}[5m] offset 1h)) > 1e3'
    )
    assert metrics == {"bna_inference_seconds_bucket", "bna_requests_total"}
    assert labels == {"le", "job", "status", "endpoint"}


def find_promtool() -> str:
    found = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip("promtool not installed (Debian package `prometheus`; `make test` installs it as root)")
    return found


def promtool(*args: str) -> None:
    result = subprocess.run([find_promtool(), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_prometheus_config():
    promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))


def test_promtool_accepts_the_alert_rules():
    promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    names = [r.get("alert") for g in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"] for r in g["rules"]]
    assert "BnaTriggerBurst" in names
    (burst,) = [e for e in alert_exprs() if "increase(bna_triggers_detected_total" in e]
    assert re.search(r"\)\s*>\s*\d+", burst), "the burst alert compares an increase with a threshold"


def test_promtool_parses_every_dashboard_query(tmp_path):
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"bna_dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(path))
