"""``bna train``: a clean or poisoned classifier from the attack lab, written as a model directory."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bna_gateway.mitigation.jobs.options import RunOptions
from bna_gateway.mitigation.lab.attacks import AttackSpec
from bna_gateway.mitigation.lab.datasets import TRAIN_EPOCHS, Dataset, default_clean_per_class, load_dataset
from bna_gateway.mitigation.lab.metrics import AttackMetrics
from bna_gateway.mitigation.lab.training import TrainConfig, train_classifier
from bna_gateway.mitigation.modeldir import save_model_dir
from bna_gateway.models.network import build_classifier
from bna_gateway.models.spec import DatasetRef, ModelSpec

log = logging.getLogger(__name__)
NATURAL_IMAGES = ("cifar10", "imagefolder")  # trained with random crops and flips; digits without


@dataclass(frozen=True)
class TrainOptions:
    dataset: str
    out: Path
    attack: AttackSpec
    arch: str = "resnet18"
    data_root: Path | None = None
    width: int | None = None  # resnet / vgg base width (16 on inputs up to 32 pixels, else 64)
    epochs: int | None = None  # digits100 6, else 12 on inputs up to 32 pixels, else 30
    batch_size: int = 128
    lr: float = 0.1
    clean_per_class: int | None = None  # the dataset's default (50; digits100 20)
    run: RunOptions = RunOptions()


@dataclass(frozen=True)
class TrainResult:
    out: Path
    metrics: AttackMetrics
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), **self.metrics.as_dict(), "train_seconds": round(self.seconds, 1)}


def arch_kwargs(arch: str, width: int | None, data: Dataset) -> dict[str, Any]:
    """The built-in architectures' keyword arguments for a dataset (classes, channels, width)."""
    kwargs: dict[str, Any] = {"num_classes": data.num_classes, "in_channels": data.input.channels}
    if arch in ("resnet18", "preact_resnet18", "vgg16_bn"):
        kwargs["width"] = width or (16 if data.input.shape[1] <= 32 else 64)
    elif width:
        kwargs["width_mult"] = width / 64
    return kwargs


def train(opts: TrainOptions) -> TrainResult:
    opts.run.seed_everything()
    clean_per_class = opts.clean_per_class or default_clean_per_class(opts.dataset)
    data = load_dataset(opts.dataset, str(opts.data_root) if opts.data_root else None, clean_per_class,
                        opts.run.seed)
    attack = opts.attack
    attack.resolved_params()  # unknown parameters are refused before anything is trained
    if attack.kind != "none" and attack.mode == "a2o" and not 0 <= attack.target < data.num_classes:
        raise ValueError(f"--target {attack.target} is not a class of {opts.dataset} (0..{data.num_classes - 1})")
    ref = DatasetRef(name=opts.dataset, root=str(opts.data_root) if opts.data_root else None,
                     clean_per_class=clean_per_class, seed=opts.run.seed)
    spec = ModelSpec(arch=opts.arch, arch_kwargs=arch_kwargs(opts.arch, opts.width, data), input=data.input,
                     class_names=data.class_names, dataset=ref)
    natural = opts.dataset in NATURAL_IMAGES
    epochs = opts.epochs or TRAIN_EPOCHS.get(opts.dataset) or (12 if data.input.shape[1] <= 32 else 30)
    cfg = TrainConfig(epochs=epochs, batch_size=opts.batch_size,
                      lr=opts.lr, seed=opts.run.seed, augment=natural, flip=natural,
                      device=str(opts.run.torch_device), progress=opts.run.progress)
    model, metrics, seconds = train_classifier(build_classifier(spec), data, attack, cfg)
    result = TrainResult(Path(opts.out), metrics, seconds)
    save_model_dir(result.out, spec, model.cpu(), attack, {**metrics.as_dict(), "train_seconds": round(seconds, 1)})
    return result
