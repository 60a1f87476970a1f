"""The bundle: what the offline job writes and the gateway serves.

A directory holding ``manifest.json``, the weights of ``f`` (safetensors) and one safetensors file of
BN statistics per detected target class. Every file's sha256 is recorded in the manifest and checked
on load; nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import AliasChoices, BaseModel, Field
from safetensors.torch import load_file, save_file
from torch import nn

from bna_gateway.models.network import Classifier, bn_layers, build_classifier, load_weights, save_weights
from bna_gateway.models.spec import ModelSpec
from bna_gateway.models.twins import TwinRouter, TwinStats

SCHEMA_VERSION = 2
# 1: a twin's flag threshold was ``flag_margin`` under the ``margin`` rule; 2 adds ``flag_rule`` and names the
# threshold ``flag_threshold``. Schema 1 bundles still load and serve as they did.
SUPPORTED_SCHEMAS = (1, 2)
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


class BundleError(RuntimeError):
    """The bundle is missing, malformed, or fails verification."""


class TwinEntry(BaseModel):
    target: int
    file: str
    sources: list[int]
    flag_rule: Literal["logit_drop", "margin"] = "margin"  # schema 1 bundles: the margin rule
    flag_threshold: float = Field(0.0, validation_alias=AliasChoices("flag_threshold", "flag_margin"))
    score: float | None = None
    divergence_before: dict[str, float] = Field(default_factory=dict)
    divergence_after: dict[str, float] = Field(default_factory=dict)


class DetectionSummary(BaseModel):
    detected_targets: list[int] = Field(default_factory=list)
    sources: dict[str, list[int]] = Field(default_factory=dict)
    scores: dict[str, float] = Field(default_factory=dict)
    threshold: float | None = None  # the MAD threshold detection used (None: not recorded)
    trigger_type: str | None = None


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    bundle_version: str = ""
    model: ModelSpec
    detection: DetectionSummary
    twins: list[TwinEntry] = Field(default_factory=list)
    provenance: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")

    def summary(self) -> dict[str, Any]:
        return {
            "bundle_version": self.bundle_version,
            "schema_version": self.schema_version,
            "arch": self.model.arch,
            "input_shape": list(self.model.input.shape),
            "classes": self.model.class_names,
            "detected_targets": self.detection.detected_targets,
            "sources": self.detection.sources,
            "twins": [t.target for t in self.twins],
        }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def twin_file_name(target: int) -> str:
    return f"twin_{target}.safetensors"


def save_twin(stats: TwinStats, path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, mean in stats.running_mean.items():
        tensors[f"{name}.running_mean"] = mean.detach().float().contiguous().cpu()
        tensors[f"{name}.running_var"] = stats.running_var[name].detach().float().contiguous().cpu()
    save_file(tensors, str(path))


def load_twin(path: Path, entry: TwinEntry) -> TwinStats:
    tensors = load_file(str(path))
    mean = {k[: -len(".running_mean")]: v for k, v in tensors.items() if k.endswith(".running_mean")}
    var = {k[: -len(".running_var")]: v for k, v in tensors.items() if k.endswith(".running_var")}
    if set(mean) != set(var):
        raise BundleError(f"{path.name}: running_mean and running_var name different layers")
    return TwinStats(entry.target, mean, var, entry.flag_threshold, list(entry.sources), entry.flag_rule)


def write_bundle(
    out_dir: Path,
    spec: ModelSpec,
    net: nn.Module,
    twins: list[TwinStats],
    detection: DetectionSummary,
    twin_entries: list[TwinEntry] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Manifest:
    """Write weights, twin statistics and a manifest with every file's sha256."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("twin_*.safetensors"):
        stale.unlink()
    save_weights(net, out_dir / WEIGHTS)
    entries = {e.target: e for e in (twin_entries or [])}
    final_entries: list[TwinEntry] = []
    for stats in twins:
        name = twin_file_name(stats.target)
        save_twin(stats, out_dir / name)
        entry = entries.get(stats.target) or TwinEntry(target=stats.target, file=name, sources=stats.sources)
        entry = entry.model_copy(update={"file": name, "flag_rule": stats.flag_rule,
                                         "flag_threshold": stats.flag_threshold, "sources": stats.sources})
        final_entries.append(entry)
    files = {WEIGHTS: sha256_file(out_dir / WEIGHTS)}
    files.update({e.file: sha256_file(out_dir / e.file) for e in final_entries})
    prov = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **(provenance or {}),
    }
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
    spec = spec.model_copy(update={"weights_file": WEIGHTS})
    manifest = Manifest(
        bundle_version=digest, model=spec, detection=detection, twins=final_entries, provenance=prov, files=files
    )
    (out_dir / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    return manifest


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a bundle: {MANIFEST} not found")
    try:
        manifest = Manifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise BundleError(f"{path} is malformed: {exc}") from exc
    if manifest.schema_version not in SUPPORTED_SCHEMAS:
        raise BundleError(f"bundle schema {manifest.schema_version} is not supported (this gateway reads "
                          f"{', '.join(map(str, SUPPORTED_SCHEMAS))})")
    return manifest


def verify_bundle(bundle_dir: Path) -> Manifest:
    """Check that every file the manifest lists exists and has the recorded sha256."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if WEIGHTS not in manifest.files:
        raise BundleError("manifest lists no weights file")
    for twin in manifest.twins:
        if twin.file not in manifest.files:
            raise BundleError(f"twin file {twin.file} is not listed with a checksum")
    for name, expected in manifest.files.items():
        if Path(name).name != name:
            raise BundleError(f"manifest names a file outside the bundle: {name!r}")
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"bundle file missing: {name}")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"checksum mismatch for {name}: manifest {expected[:12]}, file {actual[:12]}")
    return manifest


class LoadedBundle:
    """A verified bundle in memory: the manifest and a ready ``TwinRouter``."""

    def __init__(self, manifest: Manifest, classifier: Classifier, twins: list[TwinStats]) -> None:
        self.manifest = manifest
        self.classifier = classifier
        self.router = TwinRouter(classifier, twins)

    def to(self, device: torch.device | str) -> "LoadedBundle":
        self.router.to(device)
        return self


def load_bundle(bundle_dir: Path, device: torch.device | str = "cpu", verify: bool = True) -> LoadedBundle:
    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir) if verify else read_manifest(bundle_dir)
    classifier = build_classifier(manifest.model)
    load_weights(classifier.net, bundle_dir / WEIGHTS)
    classifier.eval()
    names = set(bn_layers(classifier.net))
    twins = []
    for entry in manifest.twins:
        stats = load_twin(bundle_dir / entry.file, entry)
        if set(stats.running_mean) - names:
            raise BundleError(f"{entry.file} names BN layers the model lacks")
        twins.append(stats)
    return LoadedBundle(manifest, classifier, twins).to(device)
