"""One import namespace, and the layering rules, checked on the project as it installs.

The project installs as ``bna_gateway`` only (``models/``, ``mitigation/`` and ``service/`` map to
``bna_gateway.models`` ... via setuptools' package-dir). An editable install hides a clash with a user's
own top-level ``models`` package (its import finder runs before PYTHONPATH), so these tests build the
wheel and install it, non-editable, into a fresh virtual environment whose dependencies come from this
test environment (a ``.pth`` line). There:
- a bring-your-own model whose package is called ``models``, on PYTHONPATH as the compose ``mitigate``
  service puts the owner's folder, goes through ``bna mitigate`` and ``bna serve``;
- import-linter's contracts (``[tool.importlinter]`` in pyproject.toml) hold.
Also: every package folder is installed, and a bundle written before the change still loads.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import torch

from serving import free_port

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PACKAGE_DIRS = {"bna_gateway": "bna_gateway", "bna_gateway.models": "models", "bna_gateway.mitigation": "mitigation",
                "bna_gateway.service": "service"}

OWNER_NET = '''
"""The owner's network, in the owner's own package called ``models``."""
from torch import nn


def build(num_classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
'''


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the project's wheel installed (not editable)."""
    tmp = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("bna_gateway-*.whl"))
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # torch and the other dependencies (and pip) from this environment, after the venv's own packages
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return env_dir


def run(venv: Path, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(venv / "bin" / "bna"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_installed_package_is_the_wheel_and_only_bna_gateway(venv: Path) -> None:
    code = "import bna_gateway.models.network as n, importlib.util as u; print(n.__file__); " \
           "print([m for m in ('models', 'service', 'mitigation') if u.find_spec(m)])"
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=venv, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].startswith(str(venv)), "bna_gateway comes from the installed wheel"
    assert out[1] == "[]", "no top-level models / service / mitigation is installed"


def test_a_users_own_models_package_mitigates_and_serves(venv: Path, tmp_path: Path) -> None:
    owner = tmp_path / "owner"
    (owner / "models").mkdir(parents=True)
    (owner / "models" / "__init__.py").write_text("")
    (owner / "models" / "mynet.py").write_text(OWNER_NET)
    sys.path.insert(0, str(owner))
    try:
        net = __import__("models.mynet", fromlist=["build"]).build()
    finally:
        sys.path.remove(str(owner))
        for name in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
            del sys.modules[name]
    torch.manual_seed(0)
    net.train()
    with torch.no_grad():
        net(torch.rand(64, 1, 16, 16))  # BN statistics from data
    torch.save(net.state_dict(), owner / "x.pt")
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("a", "b", "c", "d"):
        (owner / "clean" / c).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(16, 16, generator=g) * 255).byte().numpy()
            Image.fromarray(pixels, mode="L").save(owner / "clean" / c / f"{i}.png")
    proc = run(venv, "mitigate", "--arch", "models.mynet:build", "--weights", "x.pt", "--clean", "clean",
               "--input-shape", "1,16,16", "--mean", "0", "--std", "1", "--trigger-type", "patch",
               "--detect-steps", "5", "--steps", "2", "--quiet", "--out", "b", cwd=owner)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["bundle"] == "b" and json.loads((owner / "b" / "manifest.json").read_text())["model"]["arch"] \
        == "models.mynet:build"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(owner), "BNA_TORCH_THREADS": "1"}
    server = subprocess.Popen([str(venv / "bin" / "bna"), "serve", "b", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=owner, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert server.poll() is None, server.stdout.read().decode(errors="replace")[-3000:] if server.stdout else ""
        image = (owner / "clean" / "b" / "0.png").read_bytes()
        answer = httpx.post(f"{url}/classify", files={"file": ("0.png", image, "image/png")}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["class_name"] in ("a", "b", "c", "d")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_import_linter_contracts_hold_on_the_installed_package(venv: Path) -> None:
    site = next((venv / "lib").glob("python3*/site-packages"))
    lint = Path(sys.executable).with_name("lint-imports")
    # lint-imports puts its working directory on the path: run it where no source tree shadows the install
    proc = subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=venv,
                          env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "3 kept" in proc.stdout


def test_every_package_folder_is_installed() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for package, folder in PACKAGE_DIRS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert listed == found, f"pyproject.toml's packages lack {sorted(found - listed)}, list extra {sorted(listed - found)}"


def test_a_bundle_written_before_the_namespace_change_still_loads(tmp_path: Path) -> None:
    from bna_gateway.models.bundle import load_bundle

    expected = json.loads((FIXTURES / "bundle_v0_1_expected.json").read_text())
    x = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    for arch in (None, "models.architectures.resnet:resnet18"):  # a built-in name, or our old import path
        bundle = tmp_path / f"b{arch is None}"
        shutil.copytree(FIXTURES / "bundle_v0_1", bundle)
        if arch:
            manifest = json.loads((bundle / "manifest.json").read_text())
            manifest["model"]["arch"] = arch
            (bundle / "manifest.json").write_text(json.dumps(manifest))
        loaded = load_bundle(bundle)
        with torch.no_grad():
            torch.testing.assert_close(loaded.classifier(x), torch.tensor(expected["f_logits"]), atol=1e-5, rtol=0)
            torch.testing.assert_close(loaded.router.twin_logits(x, 3), torch.tensor(expected["twin_3_logits"]),
                                       atol=1e-5, rtol=0)
        assert loaded.router.targets == [3]


def test_a_schema_1_bundle_keeps_its_margin_rule_and_a_new_one_records_its_rule(tmp_path: Path) -> None:
    from dataclasses import replace

    from bna_gateway.models.bundle import SCHEMA_VERSION, load_bundle, read_manifest, write_bundle

    old = load_bundle(FIXTURES / "bundle_v0_1")  # schema 1: 'flag_margin' 0.05, no rule
    assert old.manifest.schema_version == 1
    stats = old.router.twin_stats[3]
    assert (stats.flag_rule, stats.flag_threshold) == ("margin", pytest.approx(0.05))
    new = replace(stats, flag_rule="logit_drop", flag_threshold=1.25)
    write_bundle(tmp_path / "b", old.manifest.model, old.classifier.net, [new], old.manifest.detection)
    raw = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert raw["schema_version"] == SCHEMA_VERSION == 2
    assert (raw["twins"][0]["flag_rule"], raw["twins"][0]["flag_threshold"]) == ("logit_drop", 1.25)
    reloaded = load_bundle(tmp_path / "b").router.twin_stats[3]
    assert (reloaded.flag_rule, reloaded.flag_threshold) == ("logit_drop", 1.25)
    raw["schema_version"] = 3
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(Exception, match="schema 3 is not supported"):
        read_manifest(tmp_path / "b")
