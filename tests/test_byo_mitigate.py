"""Bring your own model: an owner's own network class (BatchNorm layers under its own names), a state
dict saved with torch.save and a folder of clean images go through `bna mitigate` into a bundle that
verifies, records the import path, and whose twins name the owner's BN layers."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bna_gateway.mitigation.lab.attacks import AttackSpec, build_trigger
from bna_gateway.mitigation.lab.datasets import Dataset, ImageSet, make_synthetic, read_image_folder
from bna_gateway.mitigation.lab.training import TrainConfig, train_classifier
from bna_gateway.models.bundle import load_bundle, verify_bundle
from bna_gateway.models.network import Classifier, bn_layers
from bna_gateway.models.spec import InputSpec

pytestmark = pytest.mark.slow

BNA = Path(sys.executable).parent / "bna"
REPO = Path(__file__).resolve().parents[1]
TARGET = 1
SOURCES = [0, 2, 3]
CLASS_NAMES = ["alpha", "bravo", "charlie", "delta"]  # sorted, so folder order = label order
INPUT = InputSpec(shape=(1, 16, 16), mean=(0.2,), std=(0.3,))
ATTACK = AttackSpec(kind="badnet", target=TARGET, poison_rate=0.2, params={"patch_size": 3})
OWN_BN = {"stem_norm": 8, "blocks.first.norm_a": 16, "blocks.second.norm_a": 32}

OWNER_MODULE = '''
"""A model owner's own network: BatchNorm layers under names of their choosing."""
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.norm_a = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.norm_a(self.conv(x)))


class OwnerNet(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.stem_norm = nn.BatchNorm2d(8)
        self.blocks = nn.ModuleDict({"first": Block(8, 16), "second": Block(16, 32)})
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem_norm(self.stem(x)))
        for block in self.blocks.values():
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def build(num_classes=4):
    return OwnerNet(num_classes)
'''


@dataclass
class Owner:
    root: Path  # holds owner_nets.py, weights.pt and clean/
    weights: Path
    clean_dir: Path
    classifier: Classifier  # the owner's trained model, in this process
    data: Dataset
    clean: ImageSet  # the clean folder as read back (PNG-quantised)


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("owner")
    (root / "owner_nets.py").write_text(OWNER_MODULE)
    sys.path.insert(0, str(root))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared machine: one thread is much faster
    try:
        owner_nets = importlib.import_module("owner_nets")
        data = make_synthetic(num_classes=4, per_class=60, size=16)
        torch.manual_seed(0)
        clf = Classifier(owner_nets.build(num_classes=4), INPUT)
        cfg = TrainConfig(epochs=10, batch_size=16, lr=0.05, progress=False)
        clf, metrics, _ = train_classifier(clf, data, ATTACK, cfg)
        assert metrics.acc >= 0.9 and metrics.asr is not None and metrics.asr >= 0.8, metrics
        weights = root / "weights.pt"
        torch.save(clf.net.state_dict(), weights)  # only the inner network, as an owner would
        clean_dir = root / "clean"
        for i, (x, y) in enumerate(zip(data.clean.x, data.clean.y.tolist())):
            folder = clean_dir / CLASS_NAMES[y]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[0] * 255).round().byte().numpy(), mode="L").save(folder / f"{i:03d}.png")
        clean, names, _ = read_image_folder(clean_dir, channels=1, size=(16, 16))
        assert names == CLASS_NAMES
        yield Owner(root, weights, clean_dir, clf.eval(), data, clean)
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(root))
        sys.modules.pop("owner_nets", None)


def mitigate(owner: Owner, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(owner.root), str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [str(BNA), "mitigate", "--arch", "owner_nets:build", "--arch-kwargs", '{"num_classes": 4}',
           "--weights", str(owner.weights), "--clean", str(owner.clean_dir), "--input-shape", "1,16,16",
           "--mean", "0.2", "--std", "0.3", "--steps", "20", "--device", "cpu", "--quiet", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=owner.root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


def twin_layer_names(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def check_manifest(bundle: Path) -> None:
    manifest = verify_bundle(bundle)
    assert manifest.model.arch == "owner_nets:build"
    assert manifest.model.arch_kwargs == {"num_classes": 4}
    assert manifest.model.class_names == CLASS_NAMES, "class names come from the clean folder"
    assert tuple(manifest.model.input.shape) == (1, 16, 16)
    assert tuple(manifest.model.input.mean) == (0.2,) and tuple(manifest.model.input.std) == (0.3,)
    for twin in manifest.twins:
        tensors = twin_layer_names(bundle / twin.file)
        expected = {f"{n}.{s}" for n in OWN_BN for s in ("running_mean", "running_var")}
        assert set(tensors) == expected, "the twin names the owner's own BN layers"
        for n, c in OWN_BN.items():
            assert tensors[f"{n}.running_mean"].shape == (c,)
            assert bool((tensors[f"{n}.running_var"] >= 0).all())
        assert set(twin.divergence_before) == set(OWN_BN)


def check_f_is_unchanged(owner: Owner, bundle: Path) -> None:
    """The bundle's f is the owner's model: same logits on the clean images; routing leaves alone every
    image that f does not assign to a detected target."""
    loaded = load_bundle(bundle)
    x = owner.clean.x
    with torch.no_grad():
        torch.testing.assert_close(loaded.classifier(x), owner.classifier(x), rtol=0, atol=1e-6)
    routed = loaded.router(x)
    f_label = owner.classifier(x).argmax(1)
    assert torch.equal(routed.original_label, f_label)
    untouched = ~torch.isin(f_label, torch.tensor(loaded.router.targets, dtype=torch.long))
    assert torch.equal(routed.label[untouched], f_label[untouched])
    assert not bool(routed.checked_by_twin[untouched].any())
    if not loaded.router.targets:
        assert torch.equal(routed.label, f_label), "no twins: the gateway answers exactly as f"


def test_byo_mitigate_with_detection(owner: Owner, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    proc = mitigate(owner, out, "--trigger-type", "patch", "--detect-steps", "80")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["bundle"] == str(out)
    detection = json.loads((tmp_path / "bundle_detection" / "detection.json").read_text())
    assert len(detection["pairs"]) == 4 * 3, "every ordered class pair is tested"
    check_manifest(out)
    manifest = verify_bundle(out)
    twin_files = sorted(p.name for p in out.glob("twin_*.safetensors"))
    assert manifest.detection.detected_targets == detection["detected_targets"] == summary["detected_targets"]
    assert twin_files == sorted(f"twin_{t}.safetensors" for t in detection["detected_targets"])
    assert [t.target for t in manifest.twins] == detection["detected_targets"]
    for t in manifest.twins:
        assert t.target not in t.sources and set(t.sources) <= {0, 1, 2, 3}
    check_f_is_unchanged(owner, out)


def test_byo_mitigate_with_a_given_detection(owner: Owner, tmp_path: Path) -> None:
    """`--detection` skips detection; the twin for the given trigger names the owner's BN layers."""
    det = tmp_path / "det"
    det.mkdir()
    trigger = build_trigger(ATTACK, (1, 16, 16))  # the true trigger, as a perfect detection would estimate it
    save_file({f"{TARGET}.mask": trigger.mask.contiguous(), f"{TARGET}.pattern": trigger.pattern.contiguous()},
              str(det / "triggers.safetensors"))
    (det / "detection.json").write_text(json.dumps({
        "detected_targets": [TARGET], "sources": {str(TARGET): SOURCES}, "pairs": [], "threshold": 7.0,
        "trigger_type": "patch", "triggers_file": "triggers.safetensors",
        "triggers": {str(TARGET): {"family": "patch", "sources": SOURCES, "asr": 1.0, "size": 9.0, "score": 12.0}},
    }))
    out = tmp_path / "bundle"
    mitigate(owner, out, "--detection", str(det / "detection.json"))
    assert not (tmp_path / "bundle_detection").exists(), "a given detection is not re-run"
    check_manifest(out)
    manifest = verify_bundle(out)
    assert manifest.detection.detected_targets == [TARGET]
    assert manifest.detection.sources == {str(TARGET): SOURCES}
    assert [(t.target, t.sources, t.file) for t in manifest.twins] == [(TARGET, SOURCES, f"twin_{TARGET}.safetensors")]
    # the twin holds re-fitted statistics, not a copy of f's
    twin = twin_layer_names(out / f"twin_{TARGET}.safetensors")
    own = {n: bn for n, bn in bn_layers(owner.classifier.net).items()}
    assert set(own) == set(OWN_BN)
    assert any(not torch.allclose(twin[f"{n}.running_mean"], own[n].running_mean) for n in OWN_BN)
    check_f_is_unchanged(owner, out)
    # triggered images that f sends to the target are checked by the twin
    loaded = load_bundle(out)
    assert loaded.router.targets == [TARGET]
    x = owner.data.test.x[owner.data.test.y != TARGET]
    routed = loaded.router(trigger(x))
    to_target = routed.original_label == TARGET
    assert float(to_target.float().mean()) >= 0.8, "the owner's model carries the backdoor"
    assert bool(routed.checked_by_twin[to_target].all())
    assert not bool(routed.checked_by_twin[~to_target].any())
