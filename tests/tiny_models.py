"""Tiny trained classifiers shared by the detection and BNA tests (trained once per test process).

A width-8 ResNet-18 (1x16x16 input, 6 classes) trained on ``make_synthetic`` -- poisoned with a 3x3
BadNet patch (or a WaNet warp) towards class ``TARGET``, or clean -- in a few seconds on one CPU thread.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from bna_gateway.mitigation.bna import BNAConfig, TwinFit, fit_twin
from bna_gateway.mitigation.lab.attacks import AttackSpec, build_trigger
from bna_gateway.mitigation.lab.datasets import Dataset, make_synthetic
from bna_gateway.mitigation.lab.metrics import AttackMetrics
from bna_gateway.mitigation.lab.training import TrainConfig, train_classifier
from bna_gateway.models.network import Classifier, build_classifier
from bna_gateway.models.spec import InputSpec, ModelSpec

TARGET = 2
NUM_CLASSES = 6
SIZE = 16
SPEC = ModelSpec(
    arch="resnet18",
    arch_kwargs={"num_classes": NUM_CLASSES, "in_channels": 1, "width": 8},
    input=InputSpec(shape=(1, SIZE, SIZE), mean=(0.2,), std=(0.3,)),
    class_names=[f"class{c}" for c in range(NUM_CLASSES)],
)
BADNET = AttackSpec(kind="badnet", target=TARGET, poison_rate=0.2, params={"patch_size": 3})
CLEAN = AttackSpec(kind="none")
# WaNet without its noise mode and at twice its strength: on 16x16 bars the tiny model learns the paper's
# setting (s 0.5, noise mode) in 10 epochs to an ASR of 0.0, this one to about 0.95
WANET = AttackSpec(kind="wanet", target=TARGET, poison_rate=0.2, params={"s": 1.0, "cross_ratio": 0.0})
TRAIN = TrainConfig(epochs=10, batch_size=16, lr=0.05, progress=False)


@dataclass(frozen=True)
class TinyModel:
    classifier: Classifier
    data: Dataset
    attack: AttackSpec
    trigger: torch.nn.Module  # the attack's true trigger (identity for a clean model)
    metrics: AttackMetrics


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models on a small shared machine: one torch thread is much faster than the default pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _train(attack_json: str, seed: int) -> TinyModel:
    attack = AttackSpec.model_validate_json(attack_json)
    data = make_synthetic(num_classes=NUM_CLASSES, per_class=60, size=SIZE)
    with one_thread():
        torch.manual_seed(seed)
        clf = build_classifier(SPEC)
        cfg = TrainConfig(**{**TRAIN.__dict__, "seed": seed})
        clf, metrics, _ = train_classifier(clf, data, attack, cfg)
    clf.eval()
    return TinyModel(clf, data, attack, build_trigger(attack, tuple(SPEC.input.shape)), metrics)


def backdoored(seed: int = 0) -> TinyModel:
    """The BadNet-poisoned model (cached: every caller gets the same object; do not modify it)."""
    return _train(BADNET.model_dump_json(), seed)


def warped(seed: int = 0) -> TinyModel:
    """The WaNet-poisoned model (``WANET``; cached)."""
    return _train(WANET.model_dump_json(), seed)


def clean(seed: int = 0) -> TinyModel:
    """The same model and training, without poisoning (cached)."""
    return _train(CLEAN.model_dump_json(), seed)


def defender_set(m: TinyModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The defender's clean labelled images for the BNA tests: the clean split plus the clean training
    images (45 per class). The clean split alone holds 10 per class, and on 16x16 bars a twin fitted on
    so few is decided by the model's float noise: with the same seeds, one host corrected every source
    class and another left one uncorrected (both at lr 0.03 and 0.08)."""
    return torch.cat([m.data.clean.x, m.data.train.x]), torch.cat([m.data.clean.y, m.data.train.y])


@functools.cache
def twin_fit(seed: int = 0) -> TwinFit:
    """The twin of ``backdoored(seed)`` for its target, fitted with the attack's true trigger and the
    product's default BNA settings (cached; do not modify it)."""
    m = backdoored(seed)
    x, y = defender_set(m)
    sources = [c for c in range(NUM_CLASSES) if c != TARGET]
    with one_thread():
        return fit_twin(m.classifier, TARGET, x, y, sources, m.trigger, BNAConfig(progress=False))
