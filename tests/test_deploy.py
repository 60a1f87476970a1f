"""Deployment files, checked statically (there is no Docker engine here).

The Dockerfile, docker-compose.yml (and the GPU override), the Prometheus configuration and rules and
the Grafana provisioning must agree with each other, with the ``bna`` command line, with the command
the end-to-end tests start, and with what a real gateway exports on ``/metrics``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from deploy_parsing import (
    Stage,
    container_ports,
    copy_sources,
    exec_form,
    find_tool,
    healthcheck_command,
    image_command,
    load_yaml,
    option,
    parse_dockerfile,
    parse_exposition,
    promql_references,
    volume_mounts,
)
from bna_gateway.mitigation.cli import build_parser
from serving import running_gateway, serve_command
from bna_gateway.service.config import Settings
from synthetic_bundle import SOURCE, TARGET, SyntheticBundle, build_synthetic_bundle

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
GRAFANA_PROVISIONING = ROOT / "docker" / "grafana" / "provisioning"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "bna-gateway.json"
BUNDLE_VOLUME = "bundle"
BUNDLE_MOUNT = "/bundle"  # the volume; the gateway serves the bundle its `current` link names


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(ROOT / "Dockerfile")[1]


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(ROOT / "docker-compose.yml")


def exposed_port(runtime: Stage) -> str:
    return runtime.last("EXPOSE").split("/")[0]


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_is_multistage_slim_and_runs_as_non_root(stages, runtime):
    assert len(stages) >= 2, "build in one stage, run in a smaller one"
    assert all(s.base == "python:3.11-slim" for s in stages), [s.base for s in stages]
    assert any(kw == "COPY" and "--from=" in args for kw, args in runtime.instructions)
    user = runtime.last("USER").split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert any("useradd" in a and user in a for a in runtime.all("RUN")), f"user {user} is never created"


def test_dockerfile_chooses_cpu_or_cuda_torch_with_a_build_arg(stages):
    build = stages[0]
    defaults = build.arg_defaults()
    assert defaults.get("TORCH_INDEX_URL", "").endswith("/whl/cpu"), "CPU PyTorch is the default"
    runs = build.all("RUN")
    (torch_install,) = [a for a in runs if "pip install" in a and "torch==" in a]
    assert "${TORCH_INDEX_URL}" in torch_install and "${TORCH_VERSION}" in torch_install
    make_spec = re.search(r"^TORCH_SPEC\s*\?=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert make_spec and defaults.get("TORCH_VERSION") == make_spec.group(1), "image and `make env` install one torch"
    # The project goes in after torch, so pip finds its torch requirement satisfied and keeps that build.
    assert any("pip install ." in r for r in runs[runs.index(torch_install) + 1 :])


def test_dockerfile_healthcheck_probes_readyz_on_the_exposed_port(runtime):
    port = exposed_port(runtime)
    assert option(image_command(runtime), "--port") == port
    probe = " ".join(healthcheck_command(runtime))
    assert f"http://127.0.0.1:{port}/readyz" in probe
    assert "urllib" in probe, "python:3.11-slim has no curl or wget"


def test_image_runs_bna_serve_on_the_bundle_mount(runtime):
    command = image_command(runtime)
    assert command[:2] == ["bna", "serve"]
    args = build_parser().parse_args(command[1:])
    assert (args.command, str(args.bundle), args.host) == ("serve", f"{BUNDLE_MOUNT}/current", "0.0.0.0")
    assert any("mkdir" in a and BUNDLE_MOUNT in a and "chown" in a for a in runtime.all("RUN")), "the user owns /bundle"


def test_image_command_is_what_the_end_to_end_tests_start(runtime):
    image = image_command(runtime)
    e2e = serve_command(image[2], int(option(image, "--port")))
    assert Path(e2e[0]).name == image[0] == "bna"
    # Same program, sub-command, bundle and flags; only the listening address differs (loopback in tests).
    assert e2e[1:] == [a if a != "0.0.0.0" else "127.0.0.1" for a in image[1:]]


def test_dockerignore_keeps_heavy_things_out_but_not_the_sources(stages):
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = {p.strip() for p in lines if p.strip() and not p.startswith("#")}
    for heavy in (".venv", ".git", "artifacts", "data", "bundles", "**/__pycache__", ".pytest_cache"):
        assert heavy in patterns, f".dockerignore should exclude {heavy}"
    sources = copy_sources(stages)
    assert "pyproject.toml" in sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file"
        assert Path(src).parts[0] not in patterns and src not in patterns, f".dockerignore drops {src}"


# ---------------------------------------------------------------- docker-compose


def test_compose_defines_every_service_and_volume(compose):
    services = compose["services"]
    assert set(services) == {"demo", "gateway", "lb", "mitigate", "prometheus", "grafana"}
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
    assert "ports" not in gateway, "replicas share no host port: the load balancer is the one address"
    assert [str(p) for p in gateway["expose"]] == [exposed_port(runtime)]
    assert "entrypoint" not in gateway and gateway["command"] == exec_form(runtime.last("CMD"))
    test = gateway["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:] == healthcheck_command(runtime)
    assert Path(gateway["command"][0]).parent == Path(BUNDLE_MOUNT)
    assert volume_mounts(gateway)[BUNDLE_MOUNT] == (BUNDLE_VOLUME, True), "bundle mounted read-only"


def test_compose_passes_only_real_gateway_settings(compose):
    fields = {f"BNA_{name.upper()}" for name in Settings.model_fields}
    env = compose["services"]["gateway"]["environment"]
    names = [e.split("=")[0] for e in env] if isinstance(env, list) else list(env)
    settings = [n for n in names if n != "PYTHONPATH"]
    assert settings and set(settings) <= fields, sorted(set(settings) - fields)
    assert not {"BNA_HOST", "BNA_PORT", "BNA_BUNDLE"} & set(names), "the command line sets these"


def test_compose_gateways_import_a_bring_your_own_architecture_from_where_mitigate_did(compose):
    """A bundle built by the `mitigate` job from --arch pkg.module:factory names an import path: the
    gateways mount the same model folder on the same PYTHONPATH."""
    services = compose["services"]
    mitigate_path = services["mitigate"]["environment"]["PYTHONPATH"]
    gateway_env = dict(e.split("=", 1) for e in services["gateway"]["environment"] if "=" in e)
    assert gateway_env["PYTHONPATH"] == mitigate_path
    assert volume_mounts(services["gateway"])[mitigate_path] == volume_mounts(services["mitigate"])[mitigate_path]


def job_script(runtime: Stage, entrypoint: list[str]) -> Path:
    """The repository file the image installs as the one-shot's entrypoint program."""
    (copy,) = [a.split() for a in runtime.all("COPY") if a.split()[-1].endswith("/" + entrypoint[0])]
    return ROOT / copy[-2]


def test_compose_demo_is_the_default_bundle_source(compose, runtime):
    services = compose["services"]
    assert services["gateway"]["depends_on"]["demo"]["condition"] == "service_completed_successfully"
    demo = services["demo"]
    mounts = volume_mounts(demo)
    assert mounts[demo["environment"]["BNA_BUNDLE_DIR"]] == (BUNDLE_VOLUME, False)
    assert mounts[demo["environment"]["BNA_WORK_DIR"]][0] in compose["volumes"]
    assert demo["entrypoint"][1:] == ["demo"] and "command" not in demo
    assert demo["healthcheck"] == {"disable": True}, "a one-shot job has no /readyz to probe"
    script = job_script(runtime, demo["entrypoint"])
    subprocess.run(["sh", "-n", str(script)], check=True)
    assert re.search(r'^\s*bna demo --out "\$WORK_DIR/demo" "\$@"$', script.read_text(), re.M)
    assert build_parser().parse_args(["demo", "--out", "/work/demo"]).command == "demo"


def test_compose_mitigate_writes_the_bundle_the_gateway_serves(compose, runtime):
    mitigate = compose["services"]["mitigate"]
    assert mitigate["entrypoint"][1:] == ["mitigate"]
    script = job_script(runtime, mitigate["entrypoint"])
    assert re.search(r'^\s*bna mitigate "\$@" --out "\$WORK_DIR/mitigate/bundle"$', script.read_text(), re.M)
    args = build_parser().parse_args(["mitigate", *mitigate["command"], "--out", "/work/mitigate/bundle"])
    mounts = volume_mounts(mitigate)
    assert mounts[mitigate["environment"]["BNA_BUNDLE_DIR"]] == (BUNDLE_VOLUME, False)
    assert mounts[mitigate["environment"]["BNA_WORK_DIR"]][0] in compose["volumes"]
    model, clean = str(args.model), str(args.clean)
    assert mounts[model][1] and mounts[clean][1], "model and clean folder are mounted read-only"
    assert mitigate["environment"]["PYTHONPATH"] == model, "a bring-your-own factory in the model folder imports"
    assert mitigate["healthcheck"] == {"disable": True}


FAKE_BNA = """#!/bin/sh
# stands in for `bna demo` / `bna mitigate`: writes a two-file bundle (tagged with $TAG) to the --out directory
echo "$@" >> "$CALLS"
while [ "$#" -gt 0 ]; do [ "$1" = --out ] && out="$2"; shift; done
case "$out" in */demo) out="$out/bundle" ;; esac
mkdir -p "$out" && echo "$TAG" > "$out/weights.safetensors" && echo '{}' > "$out/manifest.json"
"""


def test_bundle_job_installs_releases_and_repoints_current(tmp_path, runtime, compose):
    script = job_script(runtime, compose["services"]["demo"]["entrypoint"])
    bin_dir, bundle, work = tmp_path / "bin", tmp_path / "bundle", tmp_path / "work"
    for d in (bin_dir, bundle, work):
        d.mkdir()
    (bin_dir / "bna").write_text(FAKE_BNA)
    (bin_dir / "bna").chmod(0o755)
    calls = tmp_path / "calls"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "BNA_BUNDLE_DIR": str(bundle), "BNA_WORK_DIR": str(work),
           "CALLS": str(calls), "BNA_KEEP_RELEASES": "2"}

    def job(*args: str, tag: str = "") -> None:
        subprocess.run(["sh", str(script), *args], env={**env, "TAG": tag}, check=True, capture_output=True, timeout=30)

    def served() -> str:
        current = bundle / "current"
        assert current.is_symlink() and not Path(os.readlink(current)).is_absolute(), "a relative link: any mount point"
        return (current / "weights.safetensors").read_text().strip()

    job("demo", tag="demo")
    assert served() == "demo" and sorted(p.name for p in (bundle / "current").iterdir()) == ["manifest.json", "weights.safetensors"]
    job("demo", tag="demo again")  # a current bundle is there: nothing is rebuilt
    assert calls.read_text().splitlines() == [f"demo --out {work}/demo"] and served() == "demo"
    for k in (1, 2, 3):
        time.sleep(1.1)  # release names are UTC seconds
        job("mitigate", "--model", "/m", "--clean", "/c", tag=f"mitigated {k}")
        assert served() == f"mitigated {k}"
    assert calls.read_text().splitlines()[-1] == f"mitigate --model /m --clean /c --out {work}/mitigate/bundle"
    releases = sorted(p.name for p in (bundle / "releases").iterdir())
    assert len(releases) == 2 and os.readlink(bundle / "current") == f"releases/{releases[-1]}", "the newest two stay"
    assert sorted(p.name for p in bundle.iterdir()) == ["current", "releases"], "no temporary left behind"
    failed = subprocess.run(["sh", str(script), "train"], env=env, capture_output=True, timeout=30)
    assert failed.returncode == 2


def test_gpu_override_reserves_nvidia_gpus_and_builds_cuda_torch(compose):
    gpu = load_yaml(ROOT / "docker-compose.gpu.yml")
    assert set(gpu["services"]) == {"demo", "gateway", "mitigate"}
    for name, service in gpu["services"].items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
        assert "/whl/cpu" not in service["build"]["args"]["TORCH_INDEX_URL"], name
        assert service["image"] != compose["services"][name]["image"], "CPU and CUDA images get different tags"
    assert "cuda" in str(gpu["services"]["gateway"]["environment"]["BNA_DEVICE"])


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]


def alert_exprs() -> list[str]:
    return [r["expr"] for g in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"] for r in g["rules"]]


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(compose):
    services = compose["services"]
    datasources = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    (source,) = [d for d in datasources if d["type"] == "prometheus"]
    assert source["url"] == f"http://prometheus:{container_ports(services['prometheus'])[0]}"
    mounts = volume_mounts(services["grafana"])
    assert mounts["/etc/grafana/provisioning"] == ("./docker/grafana/provisioning", True)
    (provider,) = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "bna-gateway.yml")["providers"]
    assert mounts[provider["options"]["path"]] == ("./" + str(DASHBOARD.parent.relative_to(ROOT)), True)
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]
    exprs = " ".join(dashboard_exprs())
    for needed in ("rate(bna_requests_total", "histogram_quantile(0.5, sum by (le) (rate(bna_inference_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(bna_inference_seconds_bucket", "bna_batch_size_bucket",
                   "sum by (target_class) (rate(bna_twin_checks_total",
                   "sum by (target_class, corrected_class) (rate(bna_triggers_detected_total"):
        assert needed in exprs, f"the dashboard lacks {needed}"


# ---------------------------------------------------------------- PromQL: valid, and only what the gateway exports

# Grafana's interval variables, replaced by plain durations so that Prometheus' parser accepts the query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
# Series Prometheus itself writes for every scrape target (they are not on the gateway's /metrics).
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}
TARGET_LABELS = {"job", "instance"}


def test_promql_reference_extraction():
    metrics, labels = promql_references(
        "histogram_quantile(0.99, sum by (le) (rate(bna_inference_seconds_bucket[$__rate_interval]))) "
        '/ on (job) group_left sum(rate(bna_requests_total{status=~"5..", endpoint!="/x"}[5m] offset 1h)) > 1e3'
    )
    assert metrics == {"bna_inference_seconds_bucket", "bna_requests_total"}
    assert labels == {"le", "job", "status", "endpoint"}


def promtool(*args: str) -> None:
    found = find_tool("promtool")
    if not found:
        pytest.skip("promtool is not installed (Debian package `prometheus`; `make test` fetches it)")
    result = subprocess.run([found, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_prometheus_config_and_its_rules():
    promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))


def test_promtool_accepts_the_alert_rules_with_a_trigger_burst_alert():
    promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    rules = {r["alert"]: r for g in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"] for r in g["rules"]}
    burst = rules["BnaTriggerBurst"]["expr"]
    assert re.search(r"increase\(bna_triggers_detected_total\[\w+\]\)\)\s*>\s*\d+", burst), burst


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


@pytest.fixture(scope="module")
def live_metrics(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Series and their label names on the /metrics of a real gateway that has answered requests,
    among them images its twin flagged."""
    bundle: SyntheticBundle = build_synthetic_bundle(tmp_path_factory.mktemp("bundle"), n_samples=2)
    env = {"BNA_DEVICE": "cpu", "BNA_API_KEY": "", "BNA_QUARANTINE_DIR": "", "BNA_MAX_BATCH_SIZE": "4"}
    with running_gateway(bundle.path, tmp_path_factory.mktemp("logs") / "gateway.log", env) as gateway:
        images = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(bundle.clean + bundle.triggered)]
        answer = httpx.post(f"{gateway.url}/classify", files=images, timeout=60)
        assert answer.status_code == 200, answer.text
        flagged = [p for p in answer.json()["predictions"] if p["trigger_detected"]]
        assert [(p["original_label"], p["label"]) for p in flagged] == [(TARGET, SOURCE)] * len(bundle.triggered)
        bad = httpx.post(f"{gateway.url}/classify", content=b"nope", headers={"content-type": "image/png"}, timeout=30)
        assert bad.status_code == 400
        metrics = httpx.get(f"{gateway.url}/metrics", timeout=30)
        assert metrics.status_code == 200
        return parse_exposition(metrics.text)


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_query_names_metrics_and_labels_the_gateway_exports(live_metrics, source):
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    assert exprs
    for expr in exprs:
        metrics, labels = promql_references(expr)
        assert metrics, f"no metric in {expr}"
        ours = metrics - PROMETHEUS_SERIES
        missing = ours - set(live_metrics)
        assert not missing, f"{source} query {expr!r} names {sorted(missing)}, which /metrics does not export"
        known = TARGET_LABELS.union(*(live_metrics[name] for name in ours))
        assert labels <= known, f"{source} query {expr!r} uses labels {sorted(labels - known)} its metrics lack"


def test_the_gateway_exports_every_series_the_dashboard_is_built_on(live_metrics):
    for name, labels in {
        "bna_requests_total": {"endpoint", "status"},
        "bna_images_total": set(),
        "bna_twin_checks_total": {"target_class"},
        "bna_triggers_detected_total": {"target_class", "corrected_class"},
        "bna_inference_seconds_bucket": {"le"},
        "bna_batch_size_bucket": {"le"},
        "bna_bundle_info": {"version"},
    }.items():
        assert name in live_metrics and labels <= live_metrics[name], (name, live_metrics.get(name))
