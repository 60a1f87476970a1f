"""deploy/k8s/, checked statically (there is no cluster here): every manifest is valid for a named
Kubernetes version (kubernetes-validate --strict), kustomize renders the folder, and the parts agree
with each other, with the image and with the gateway's settings."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from deploy_parsing import exec_form, find_tool, load_yaml, parse_dockerfile
from bna_gateway.mitigation.cli import build_parser
from bna_gateway.service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31.0"  # the oldest minor still in upstream support when this was written


@pytest.fixture(scope="module")
def kustomization() -> dict:
    return load_yaml(K8S / "kustomization.yaml")


@pytest.fixture(scope="module")
def resources(kustomization: dict) -> dict[tuple[str, str], dict]:
    """(kind, name) -> manifest, for every document of every file the kustomization lists."""
    found = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


@pytest.fixture(scope="module")
def image() -> tuple[list[str], list[str], int]:
    """The runtime stage's ENTRYPOINT, CMD and UID."""
    runtime = parse_dockerfile(ROOT / "Dockerfile")[1][-1]
    return exec_form(runtime.last("ENTRYPOINT")), exec_form(runtime.last("CMD")), int(runtime.arg_defaults()["UID"])


def test_the_kustomization_lists_every_manifest_in_the_folder(kustomization: dict) -> None:
    assert kustomization["kind"] == "Kustomization" and kustomization["namespace"] == "bna"
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    assert [i["name"] for i in kustomization["images"]] == ["bna-gateway"]


def test_every_manifest_is_valid_for_a_named_kubernetes_version(kustomization: dict) -> None:
    validate = find_tool("kubernetes-validate")
    assert validate, "kubernetes-validate is a test dependency (pip install -e .[test])"
    files = [str(K8S / name) for name in kustomization["resources"]]
    result = subprocess.run(
        [validate, "--strict", "--kubernetes-version", KUBERNETES_VERSION, *files],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Only the Prometheus Operator's ServiceMonitor (a custom resource) has no schema to check against.
    unchecked = [line for line in (result.stdout + result.stderr).splitlines() if "Couldn't find schema" in line]
    assert all("ServiceMonitor" in line for line in unchecked), unchecked


def test_kustomize_renders_the_folder() -> None:
    kubectl = find_tool("kubectl")
    if not kubectl:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = list(yaml.safe_load_all(result.stdout))
    assert all(d["metadata"].get("namespace") == "bna" for d in rendered if d["kind"] != "Namespace")
    images = {c["image"] for d in rendered if d["kind"] in ("Deployment", "Job")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"bna-gateway:cpu"}


def pod(resources: dict, kind: str, name: str) -> dict:
    return resources[(kind, name)]["spec"]["template"]["spec"]


def test_the_deployment_runs_the_image_command_with_probes_on_our_health_paths(resources: dict, image) -> None:
    entrypoint, cmd, uid = image
    spec = pod(resources, "Deployment", "bna-gateway")
    (gateway,) = spec["containers"]
    assert "command" not in gateway and gateway["args"] == cmd, "the image's own `bna serve ...`, as the tests run it"
    args = build_parser().parse_args([*entrypoint[1:], *gateway["args"]])
    (port,) = gateway["ports"]
    assert args.command == "serve" and args.port == port["containerPort"] and port["name"] == "http"
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["startupProbe"]["httpGet"]["path"] == "/healthz"
    mounts = {m["mountPath"]: m for m in gateway["volumeMounts"]}
    assert mounts["/bundle"]["readOnly"] is True and str(args.bundle).startswith("/bundle/")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/bundle"]["name"]]["persistentVolumeClaim"]["claimName"] == "bna-bundles"
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "a writable /tmp beside the read-only root"
    settings = set(Settings.model_fields)
    assert {e["name"] for e in gateway["env"]} <= {f"BNA_{s.upper()}" for s in settings}
    grace = spec["terminationGracePeriodSeconds"]
    shutdown = next(float(e["value"]) for e in gateway["env"] if e["name"] == "BNA_SHUTDOWN_TIMEOUT_S")
    assert grace > shutdown + 5, "in-flight requests finish before Kubernetes kills the pod"
    strategy = resources[("Deployment", "bna-gateway")]["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0, "an image update never lowers the ready count"


@pytest.mark.parametrize("kind,name", [("Deployment", "bna-gateway"), ("Job", "bna-mitigate")])
def test_pods_run_as_the_image_user_on_a_read_only_root_with_resources(resources: dict, image, kind: str, name: str) -> None:
    _, _, uid = image
    spec = pod(resources, kind, name)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == uid
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    for container in spec.get("initContainers", []) + spec["containers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]


def test_service_hpa_pdb_and_servicemonitor_point_at_the_gateway_pods(resources: dict) -> None:
    deployment = resources[("Deployment", "bna-gateway")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = resources[("Service", "bna-gateway")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http" and port["name"] == "http"
    hpa = resources[("HorizontalPodAutoscaler", "bna-gateway")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "bna-gateway"}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    pdb = resources[("PodDisruptionBudget", "bna-gateway")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["minAvailable"] < hpa["minReplicas"], "a drain can always proceed"
    monitor = resources[("ServiceMonitor", "bna-gateway")]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"


def test_the_job_runs_bna_mitigate_into_the_volume_the_gateways_serve(resources: dict) -> None:
    spec = pod(resources, "Job", "bna-mitigate")
    (job,) = spec["containers"]
    assert job["command"] == ["bna-bundle-job", "mitigate"]
    args = build_parser().parse_args(["mitigate", *job["args"], "--out", "/work/mitigate/bundle"])
    env = {e["name"]: e["value"] for e in job["env"]}
    mounts = {m["mountPath"]: m for m in job["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    bundle_mount = mounts[env["BNA_BUNDLE_DIR"]]
    assert not bundle_mount.get("readOnly") and volumes[bundle_mount["name"]]["persistentVolumeClaim"]["claimName"] == "bna-bundles"
    assert env["BNA_WORK_DIR"] in mounts and "/tmp" in mounts
    inputs = mounts["/input"]
    assert inputs["readOnly"] is True and str(args.model).startswith("/input/") and str(args.clean).startswith("/input/")
    assert spec["restartPolicy"] == "Never"
    claims = {(kind, name) for kind, name in resources if kind == "PersistentVolumeClaim"}
    assert {("PersistentVolumeClaim", "bna-bundles"), ("PersistentVolumeClaim", "bna-inputs")} <= claims
    bundles = resources[("PersistentVolumeClaim", "bna-bundles")]["spec"]
    assert bundles["accessModes"] == ["ReadWriteMany"], "written by the Job, read by gateway pods on any node"
