"""The memory test (detection stage 6c): BatchNorm running statistics remember a trained trigger.

A small conv-BN network whose running means are *planted*: the clean images' BN-input means, moved a
known share of the way towards the means of the same images with a trigger stamped. The share the stage
measures must be that share; a target with weak evidence is kept only when its share reaches the
threshold, strong evidence is never overruled, and a network without BN running statistics is not tested.
"""
from __future__ import annotations

import torch
from torch import nn

from bna_gateway.mitigation.detection import DetectionConfig, TargetTrigger
from bna_gateway.mitigation.detection.io import read_detection, write_detection
from bna_gateway.mitigation.detection.records import DetectionResult, TargetEvidence
from bna_gateway.mitigation.detection.stages.memory import ChannelMeans, memory_share, require_memory, spread
from bna_gateway.mitigation.detection.suspect import Suspect
from bna_gateway.mitigation.detection.table import scores_table
from bna_gateway.models.network import bn_layers

K = 4


def network(norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(1, 6, 3, padding=1)]
    layers += [nn.BatchNorm2d(6)] if norm else []
    layers += [nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1)]
    layers += [nn.BatchNorm2d(8)] if norm else []
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, K)]
    return nn.Sequential(*layers).eval()


def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(80, 1, 12, 12, generator=g) * 0.5, torch.arange(80) % K


def trigger(target: int, score: float) -> TargetTrigger:
    delta = torch.zeros(1, 12, 12)
    delta[:, 8:11, 8:11] = 0.5  # a bright corner square
    return TargetTrigger(target, [c for c in range(K) if c != target], "perturbation", {"delta": delta}, 1.0,
                         float(delta.norm()), score)


def plant(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trig: TargetTrigger, share: float) -> None:
    """Running means = clean means + share * (triggered means - clean means); variances: the clean ones."""
    layers = list(bn_layers(model).values())
    means = ChannelMeans(layers)
    # the second layer's input depends on the first's statistics: plant layer by layer, in order
    for k, layer in enumerate(layers):
        clean = means(model, x)
        stamped = means(model, trig.module()(x[y != trig.target]))
        layer.running_mean.copy_((clean[k] + share * (stamped[k] - clean[k])).float())
        layer.running_var.fill_(1.0)


def evidence(target: int, level: float) -> dict[str, TargetEvidence]:
    score = [0.0] * K
    score[target] = level
    return {"perturbation": TargetEvidence(column=score, score=score, universal_size=[1.0] * K,
                                           universal_asr=[1.0] * K)}


def test_the_share_is_what_was_planted() -> None:
    x, y = images()
    for planted in (0.0, 0.1):
        model = network()
        trig = trigger(1, 5.0)
        plant(model, x, y, trig, planted)
        layers = list(bn_layers(model).values())
        means = ChannelMeans(layers)
        # chunked accumulation gives the same means as one pass
        assert all(torch.allclose(a, b) for a, b in zip(means(model, x, chunk=7), means(model, x)))
        share = memory_share(layers, means(model, x), means(model, trig.module()(x[y != 1])))
        assert abs(share - planted) < 0.01, (planted, share)


def test_weak_targets_need_a_memory_strong_ones_do_not() -> None:
    x, y = images()
    cfg = DetectionConfig()
    forgotten, remembered = network(), network()
    weak = trigger(1, 6.0)
    plant(forgotten, x, y, weak, 0.0)
    plant(remembered, x, y, weak, 0.1)
    kept, checks = require_memory(Suspect(forgotten, x, y, K), {1: weak}, evidence(1, 6.0), cfg)
    assert kept == {} and len(checks) == 1 and not checks[0].kept and abs(checks[0].share) < 0.01
    assert checks[0].level == 6.0 and checks[0].family == "perturbation"
    kept, checks = require_memory(Suspect(remembered, x, y, K), {1: weak}, evidence(1, 6.0), cfg)
    assert list(kept) == [1] and checks[0].kept and checks[0].share > cfg.memory_min_share
    # strong evidence (its target-level score, or its own score) is not tested at all
    strong = trigger(1, 6.0)
    kept, checks = require_memory(Suspect(forgotten, x, y, K), {1: strong}, evidence(1, 40.0), cfg)
    assert list(kept) == [1] and checks == []
    kept, checks = require_memory(Suspect(forgotten, x, y, K), {1: trigger(1, 40.0)}, evidence(1, 2.0), cfg)
    assert list(kept) == [1] and checks == []
    # off, and a network with no BatchNorm running statistics: nothing is tested
    kept, checks = require_memory(Suspect(forgotten, x, y, K), {1: weak}, evidence(1, 6.0),
                                  DetectionConfig(memory_min_share=0.0))
    assert list(kept) == [1] and checks == []
    kept, checks = require_memory(Suspect(network(norm=False), x, y, K), {1: weak}, evidence(1, 6.0), cfg)
    assert list(kept) == [1] and checks == []


def test_memory_checks_are_written_read_and_shown(tmp_path) -> None:
    x, y = images()
    model = network()
    weak = trigger(2, 6.0)
    plant(model, x, y, weak, 0.0)
    _, checks = require_memory(Suspect(model, x, y, K), {2: weak}, evidence(2, 6.0), DetectionConfig())
    result = DetectionResult([], 7.0, "all", {}, 1.0, {}, memory=checks)
    write_detection(result, tmp_path, pictures=False)
    back = read_detection(tmp_path)
    assert [(m.target, m.kept) for m in back.memory] == [(2, False)]
    assert abs(back.memory[0].share - checks[0].share) < 1e-3
    assert "target 2: the BatchNorm statistics remember" in scores_table(back) and "dropped" in scores_table(back)


def test_the_share_must_be_a_share() -> None:
    import pytest

    with pytest.raises(ValueError, match="memory_min_share"):
        DetectionConfig(memory_min_share=1.5)
    with pytest.raises(ValueError, match="memory_images"):
        DetectionConfig(memory_images=0)


def test_large_clean_sets_are_thinned_evenly() -> None:
    index = torch.arange(100, 300)
    assert torch.equal(spread(index, 500), index)  # short enough: all of it, in order
    thin = spread(index, 20)
    assert len(thin) == 20 and thin[0] == 100 and thin[-1] == 299 and bool((thin.diff() > 0).all())
    y = torch.arange(200) // 20  # a clean set ordered by class: every class keeps its share
    assert torch.bincount(y[spread(torch.arange(200), 50)], minlength=10).tolist() == [5] * 10
    # a capped test still reads a planted share
    x, yy = images()
    model = network()
    weak = trigger(1, 6.0)
    plant(model, x, yy, weak, 0.1)
    _, checks = require_memory(Suspect(model, x, yy, K), {1: weak}, evidence(1, 6.0), DetectionConfig(memory_images=40))
    assert abs(checks[0].share - 0.1) < 0.03
