"""Where the model under test comes from: a model directory (``bna train``) or the owner's own network.

``ModelSource`` says which (typed; the CLI builds it from ``--model`` or the bring-your-own flags),
``load_model`` loads it, and ``load_clean_set`` gives the defender's clean images: a folder of class
sub-folders, or the model directory's own split. docs/cli.md#bring-your-own-model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bna_gateway.mitigation.imagefolder import DatasetError, ImageSet, read_image_folder
from bna_gateway.mitigation.lab.attacks import AttackSpec
from bna_gateway.mitigation.lab.datasets import load_ref
from bna_gateway.models.network import Classifier, build_classifier, load_weights, save_weights
from bna_gateway.models.spec import InputSpec, ModelSpec

MODEL_JSON = "model.json"
ATTACK_JSON = "attack.json"
METRICS_JSON = "metrics.json"


@dataclass(frozen=True)
class ByoModel:
    """An owner's network: a built-in name or import path ``package.module:factory``, its state dict,
    and the input it expects (images scaled to [0, 1], then ``(x - mean) / std`` per channel)."""

    arch: str
    weights: Path
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...] | None = None  # default 0 per channel
    std: tuple[float, ...] | None = None  # default 1 per channel
    class_names: list[str] | None = None  # default: the clean folder's sub-folder names
    arch_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSource:
    """The model under test (a model directory or a ``ByoModel``) and the defender's clean images."""

    model_dir: Path | None = None
    byo: ByoModel | None = None
    clean_dir: Path | None = None
    clean_per_class: int | None = None

    def __post_init__(self) -> None:
        if (self.model_dir is None) == (self.byo is None):
            raise ValueError("give --model DIR (from 'bna train') or --arch with --weights and --clean")


@dataclass(frozen=True)
class LoadedModel:
    spec: ModelSpec
    classifier: Classifier
    attack: AttackSpec | None = None
    directory: Path | None = None


def save_model_dir(out: Path, spec: ModelSpec, classifier: Classifier, attack: AttackSpec,
                   metrics: dict[str, Any]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(classifier.net, out / spec.weights_file)
    (out / MODEL_JSON).write_text(spec.model_dump_json(indent=2))
    attack.save(out / ATTACK_JSON)
    (out / METRICS_JSON).write_text(json.dumps(metrics, indent=2))


def load_model_dir(path: str | Path) -> LoadedModel:
    path = Path(path)
    if not (path / MODEL_JSON).is_file():
        raise FileNotFoundError(f"{path} is not a model directory: {MODEL_JSON} not found (write one with 'bna train')")
    spec = ModelSpec.model_validate_json((path / MODEL_JSON).read_text())
    clf = build_classifier(spec)
    load_weights(clf.net, path / spec.weights_file)
    clf.eval()
    attack = AttackSpec.load(path / ATTACK_JSON) if (path / ATTACK_JSON).is_file() else None
    return LoadedModel(spec, clf, attack, path)


def load_byo(byo: ByoModel, clean_dir: Path | None) -> LoadedModel:
    """An owner's model; its class names from ``byo`` or the clean folder's sub-folders."""
    c = byo.input_shape[0]
    names = byo.class_names
    if names is None:
        if clean_dir is None:
            raise ValueError("give --class-names or a --clean folder whose sub-folders name the classes")
        if not Path(clean_dir).is_dir():
            raise DatasetError(f"clean folder {clean_dir} does not exist (expected one sub-folder per class)")
        names = sorted(p.name for p in Path(clean_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    spec = ModelSpec(arch=byo.arch, arch_kwargs=dict(byo.arch_kwargs), class_names=names,
                     input=InputSpec(shape=byo.input_shape, mean=byo.mean or (0.0,) * c, std=byo.std or (1.0,) * c))
    clf = build_classifier(spec)
    load_weights(clf.net, byo.weights)
    clf.eval()
    return LoadedModel(spec, clf)


def load_model(source: ModelSource) -> LoadedModel:
    if source.model_dir is not None:
        return load_model_dir(source.model_dir)
    assert source.byo is not None
    return load_byo(source.byo, source.clean_dir)


def load_clean_set(model: LoadedModel, source: ModelSource, seed: int = 0) -> ImageSet:
    """The defender's clean set: the source's clean folder, or the model directory's own split."""
    if source.clean_dir is not None:
        c, h, w = model.spec.input.shape
        data, _, _ = read_image_folder(source.clean_dir, channels=c, size=(h, w), class_names=model.spec.class_names)
        return data.per_class(source.clean_per_class, seed)
    if model.spec.dataset is None:
        raise ValueError("this model has no dataset on record: pass --clean FOLDER (one sub-folder per class)")
    return load_ref(model.spec.dataset).clean.per_class(source.clean_per_class, seed)
