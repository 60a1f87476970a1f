"""Stage 6c, the memory test: a backdoor was *trained*; the network's BatchNorm statistics remember it.

A BatchNorm layer's running mean is an average over the batches the network was trained on. A
poisoned training set held triggered images, so every running mean sits a fraction of the way from
the clean images' mean towards the triggered images' mean. Given a trigger estimate, that fraction
is a least-squares fit over every BN channel (each in units of its running standard deviation):

    share = sum((running_mean - clean_mean) * (trigger_mean - clean_mean)) / sum((trigger_mean - clean_mean)^2)

where ``clean_mean`` is a channel's mean input on the defender's clean set and ``trigger_mean`` its
mean on the same images (all but the target's) with the trigger stamped. For a backdoor it estimates
the share of triggered images in the training batches (the detection panel's all-to-one targets,
poisoned at 10%: +0.050 to +0.174). A *natural* universal perturbation (a class that every digit can
be nudged into, with no poison involved) was never in the training data: its share is noise around 0
(the seven on the panel's clean plain CNNs: -0.013 to +0.020; bench/results/memory_share_r15.md).

The test acts only where the trigger evidence alone is not conclusive: a target whose score (the
larger of its candidate score and its families' target-level scores) is under ``memory_exempt_score``
is kept only when its share is at least ``memory_min_share``. Evidence above that is never overruled,
because the memory can be erased: a network fine-tuned on clean data, or whose BN statistics were
re-estimated on clean data, or trained with frozen BN layers, forgets the poison; so does a backdoor
planted in very few training images. A model without BatchNorm running statistics gets no test. Each
mean is taken over at most ``memory_images`` clean images, evenly spread over the set.
``--memory-share 0`` turns it off. docs/method.md#6c-memory-test.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.records import MemoryCheck, TargetEvidence, TargetTrigger
from bna_gateway.mitigation.detection.suspect import Suspect
from bna_gateway.models.network import bn_layers

log = logging.getLogger(__name__)


class ChannelMeans:
    """Each BN layer's per-channel mean *input* over a set of images, accumulated in chunks."""

    def __init__(self, layers: list[nn.modules.batchnorm._BatchNorm]) -> None:
        self.layers = layers

    @torch.no_grad()
    def __call__(self, model: nn.Module, x: torch.Tensor, chunk: int = 256) -> list[torch.Tensor]:
        sums: list[torch.Tensor | None] = [None] * len(self.layers)
        counts = [0] * len(self.layers)

        def hook(k: int):
            def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                a = inputs[0].transpose(0, 1).reshape(inputs[0].shape[1], -1).double()
                sums[k] = a.sum(1) if sums[k] is None else sums[k] + a.sum(1)
                counts[k] += a.shape[1]
            return record

        handles = [layer.register_forward_hook(hook(k)) for k, layer in enumerate(self.layers)]
        try:
            for i in range(0, len(x), chunk):
                model(x[i : i + chunk])
        finally:
            for h in handles:
                h.remove()
        return [s / n for s, n in zip(sums, counts)]  # type: ignore[operator]


def memory_share(layers: list[nn.modules.batchnorm._BatchNorm], clean: list[torch.Tensor],
                 stamped: list[torch.Tensor]) -> float:
    """The least-squares share ``s`` with running_mean ~ clean + s * (stamped - clean), over every channel of
    every layer, each in units of its running standard deviation (0 when the trigger moves no channel)."""
    num = torch.zeros((), dtype=torch.double)
    den = torch.zeros((), dtype=torch.double)
    for layer, c, s in zip(layers, clean, stamped):
        sd = (layer.running_var.double() + layer.eps).sqrt()
        residual = (layer.running_mean.double() - c) / sd
        shift = (s - c) / sd
        num = num + (residual * shift).sum()
        den = den + (shift * shift).sum()
    return float(num / den) if float(den) > 0 else 0.0


def spread(index: torch.Tensor, most: int) -> torch.Tensor:
    """At most ``most`` of ``index``, evenly spaced (all of it when it is no longer): the clean set is ordered by
    class, so every class keeps its share, and the cost of a pass stops growing with the clean set."""
    if len(index) <= most:
        return index
    return index[torch.linspace(0, len(index) - 1, most).round().long()]


def target_level(target: int, trigger: TargetTrigger, evidence: dict[str, TargetEvidence]) -> float:
    """How strong a target's trigger evidence is on its own: its candidate score, or its largest
    target-level score in any family, whichever is larger."""
    levels = [float(ev.score[target]) for ev in evidence.values() if target < len(ev.score)]
    return max([trigger.score, *levels])


def trigger_shares(suspect: Suspect, triggers: dict[int, TargetTrigger], cfg: DetectionConfig
                   ) -> dict[int, float] | None:
    """Each trigger's ``memory_share``: the clean means once, then one pass per trigger over the other classes'
    images (each over at most ``memory_images``). None when the network has no BatchNorm running statistics."""
    layers = list(bn_layers(suspect.model).values())
    if not layers:
        return None
    means = ChannelMeans(layers)
    clean = means(suspect.model, suspect.x[spread(torch.arange(len(suspect.y)), cfg.memory_images)])
    out: dict[int, float] = {}
    for t, tr in sorted(triggers.items()):
        others = suspect.x[spread((suspect.y != t).nonzero(as_tuple=True)[0].cpu(), cfg.memory_images)]
        with torch.no_grad():
            stamped = means(suspect.model, tr.module()(others))
        out[t] = memory_share(layers, clean, stamped)
    return out


def require_memory(suspect: Suspect, triggers: dict[int, TargetTrigger], evidence: dict[str, TargetEvidence],
                   cfg: DetectionConfig) -> tuple[dict[int, TargetTrigger], list[MemoryCheck]]:
    """The targets kept by the memory test, and a record of every target it examined (kept or not)."""
    if cfg.memory_min_share <= 0 or not triggers:
        return triggers, []
    levels = {t: target_level(t, tr, evidence) for t, tr in triggers.items()}
    weak = {t: tr for t, tr in triggers.items() if levels[t] < cfg.memory_exempt_score}
    if not weak:
        return triggers, []
    shares = trigger_shares(suspect, weak, cfg)
    if shares is None:
        log.info("memory test skipped: the network has no BatchNorm running statistics")
        return triggers, []
    checks = [MemoryCheck(t, tr.family, shares[t], levels[t], shares[t] >= cfg.memory_min_share, list(tr.sources))
              for t, tr in sorted(weak.items())]
    for m in checks:
        if not m.kept:
            log.info("target %d: its %s trigger (score %.1f) left no trace in the BatchNorm statistics (share %.3f, "
                     "needs %.3f): a natural universal perturbation, not a trained backdoor", m.target, m.family,
                     m.level, m.share, cfg.memory_min_share)
    forgotten = {m.target for m in checks if not m.kept}
    return {t: tr for t, tr in triggers.items() if t not in forgotten}, checks
