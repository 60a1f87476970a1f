"""digits100: 100 classes of two real MNIST digits side by side, composed from disjoint digit images per
split; the loader, the defaults a user gets, and the attack lab on its 1x28x56 images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bna_gateway.mitigation.lab.attacks import ATTACKS, AttackSpec, build_trigger
from bna_gateway.mitigation.lab.datasets import (DIGITS100_CLASSES, Dataset, compose_digits100, default_clean_per_class,
                                                 load_dataset, load_ref, read_mnist5k)
from bna_gateway.mitigation.lab.training import TrainConfig, train_classifier
from bna_gateway.models.network import build_classifier
from bna_gateway.models.spec import DatasetRef, ModelSpec

SPLITS = ("train", "clean", "test")


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    return read_mnist5k()


@pytest.fixture(scope="module")
def data() -> Dataset:
    return load_dataset("digits100")


def _halves(x: torch.Tensor) -> set[bytes]:
    """Every 28x28 digit image in ``x`` ([N, 1, 28, 56]), as bytes."""
    digits = torch.cat([x[..., :28], x[..., 28:]]).mul(255).round().to(torch.uint8).flatten(1).numpy()
    return {row.tobytes() for row in digits}


def test_hundred_classes_of_two_digits_with_the_default_splits(data: Dataset) -> None:
    assert data.name == "digits100" and data.num_classes == 100
    assert data.class_names == [f"{a}{b}" for a in range(10) for b in range(10)] == DIGITS100_CLASSES
    assert tuple(data.input.shape) == (1, 28, 56)
    for split, per_class in (("train", 100), ("clean", 20), ("test", 30)):
        s = getattr(data, split)
        assert s.x.shape == (100 * per_class, 1, 28, 56) and s.x.dtype == torch.float32
        assert torch.equal(torch.bincount(s.y, minlength=100), torch.full((100,), per_class)), split
        assert float(s.x.min()) >= 0 and float(s.x.max()) <= 1
    assert default_clean_per_class("digits100") == 20 and default_clean_per_class("mnist5k") == 50
    assert len(load_dataset("digits100", clean_per_class=7).clean) == 700


def test_each_image_is_its_labels_two_digits(data: Dataset, mnist: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = mnist
    parts = compose_digits100(y, clean_per_class=20, seed=0)
    for split in SPLITS:
        c, s = parts[split], getattr(data, split)
        assert torch.equal(c.labels, s.y)
        assert torch.equal(s.y, 10 * y[c.left] + y[c.right]), f"{split}: label = 10 x left digit + right digit"
        assert torch.equal(s.x[..., :28], x[c.left]) and torch.equal(s.x[..., 28:], x[c.right])


def test_no_digit_image_is_in_two_splits(data: Dataset, mnist: tuple[torch.Tensor, torch.Tensor]) -> None:
    _, y = mnist
    parts = compose_digits100(y, clean_per_class=20, seed=0)
    used = {s: set(torch.cat([parts[s].left, parts[s].right]).tolist()) for s in SPLITS}
    assert not used["train"] & used["clean"] and not used["train"] & used["test"] and not used["clean"] & used["test"]
    pixels = {s: _halves(getattr(data, s).x) for s in SPLITS}  # the same, seen in the images themselves
    assert not pixels["train"] & pixels["test"] and not pixels["train"] & pixels["clean"]
    assert not pixels["clean"] & pixels["test"]
    # each split draws on many different digit images (the train split on nearly all of its 350 per digit)
    assert len(used["train"]) > 3000 and len(used["test"]) > 900 and len(used["clean"]) > 450


def test_seeded(data: Dataset) -> None:
    again = load_ref(DatasetRef(name="digits100", clean_per_class=20, seed=0))
    for split in SPLITS:
        assert torch.equal(getattr(again, split).x, getattr(data, split).x)
        assert torch.equal(getattr(again, split).y, getattr(data, split).y)
    other = load_dataset("digits100", seed=1)
    assert not torch.equal(other.train.x, data.train.x) and not torch.equal(other.test.x, data.test.x)


@pytest.mark.parametrize("kind", ATTACKS)
def test_every_attack_builds_on_two_digit_images(data: Dataset, kind: str) -> None:
    spec = AttackSpec(kind=kind, target=37, seed=3)
    trigger = build_trigger(spec, (1, 28, 56))
    x = data.test.x[:16]
    out = trigger(x)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(trigger(x), out), "the trigger is deterministic"
    if kind != "none":
        assert not torch.equal(out, x)
    assert torch.equal(spec.target_of(data.test.y, 100), torch.full_like(data.test.y, 37))
    a2a = AttackSpec(kind=kind, mode="a2a").target_of(data.test.y, 100)
    assert torch.equal(a2a, (data.test.y + 1) % 100)


def test_the_lab_trains_a_poisoned_model_on_it(data: Dataset) -> None:
    """A few optimiser steps of a narrow ResNet-18 on a slice: the lab's training and metrics run on
    1x28x56 inputs and 100 classes (learning them takes ``bna train``'s 6 epochs: minutes)."""
    small = Dataset(data.name, data.class_names, data.input, data.train.subset(torch.arange(0, 10000, 40)),
                    data.clean, data.test.subset(torch.arange(0, 3000, 30)))
    spec = ModelSpec(arch="resnet18", arch_kwargs={"num_classes": 100, "in_channels": 1, "width": 4},
                     input=data.input, class_names=data.class_names)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        _, metrics, _ = train_classifier(build_classifier(spec), small, AttackSpec(kind="badnet", target=5),
                                         TrainConfig(epochs=1, batch_size=50, progress=False))
    finally:
        torch.set_num_threads(threads)
    assert 0 <= metrics.acc <= 1 and metrics.asr is not None and np.isfinite(metrics.asr)
