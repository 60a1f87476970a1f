"""Model directories (written by ``bna train``) and bring-your-own models, loaded the same way."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bna_gateway.models.network import Classifier, build_classifier, load_weights, save_weights
from bna_gateway.models.spec import InputSpec, ModelSpec
from bna_gateway.mitigation.attacks import AttackSpec
from bna_gateway.mitigation.datasets import DatasetError, ImageSet, load_ref, read_image_folder

MODEL_JSON = "model.json"
ATTACK_JSON = "attack.json"
METRICS_JSON = "metrics.json"


@dataclass
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


def _floats(raw: str | None, what: str) -> tuple[float, ...] | None:
    if raw is None:
        return None
    try:
        return tuple(float(v) for v in raw.split(","))
    except ValueError as exc:
        raise ValueError(f"{what} must be comma-separated numbers, got {raw!r}") from exc


def load_byo(arch: str, weights: str | None, clean: str | None, input_shape: str | None, mean: str | None,
             std: str | None, class_names: str | None, arch_kwargs: str = "{}") -> LoadedModel:
    """A user's model: import path + state dict + input description (+ class names from the clean folder)."""
    if not weights:
        raise ValueError("--arch without --model needs --weights (a state dict file)")
    if not input_shape:
        raise ValueError("--arch without --model needs --input-shape C,H,W")
    shape = tuple(int(v) for v in input_shape.split(","))
    if len(shape) != 3:
        raise ValueError(f"--input-shape must be C,H,W, got {input_shape!r}")
    c = shape[0]
    names = class_names.split(",") if class_names else None
    if names is None:
        if not clean:
            raise ValueError("give --class-names or a --clean folder whose sub-folders name the classes")
        root = Path(clean)
        if not root.is_dir():
            raise DatasetError(f"clean folder {root} does not exist (expected one sub-folder per class)")
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    spec = ModelSpec(
        arch=arch,
        arch_kwargs=json.loads(arch_kwargs or "{}"),
        input=InputSpec(shape=shape, mean=_floats(mean, "--mean") or (0.0,) * c, std=_floats(std, "--std") or (1.0,) * c),
        class_names=names,
    )
    clf = build_classifier(spec)
    load_weights(clf.net, Path(weights))
    clf.eval()
    return LoadedModel(spec, clf)


def load_clean_set(model: LoadedModel, clean: str | None, per_class: int | None, seed: int = 0) -> ImageSet:
    """The defender's clean set: a folder of class sub-folders, or the model directory's own split."""
    if clean:
        c, h, w = model.spec.input.shape
        data, names, _ = read_image_folder(clean, channels=c, size=(h, w), class_names=model.spec.class_names)
        return data.per_class(per_class, seed)
    if model.spec.dataset is None:
        raise ValueError("this model has no dataset on record: pass --clean FOLDER (one sub-folder per class)")
    return load_ref(model.spec.dataset).clean.per_class(per_class, seed)


def resolve_model(args: Any) -> LoadedModel:
    """``--model DIR`` or the bring-your-own flags."""
    if getattr(args, "model", None):
        return load_model_dir(args.model)
    if getattr(args, "arch", None):
        return load_byo(args.arch, args.weights, args.clean, args.input_shape, args.mean, args.std,
                        args.class_names, args.arch_kwargs)
    raise ValueError("give --model DIR (from 'bna train') or --arch with --weights and --clean")
