"""The model under test and the defender's clean set: what every detection stage measures on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from bna_gateway.mitigation.detection.config import ReverseConfig
from bna_gateway.mitigation.detection.reverse import (ReverseResult, group_index, prediction_fractions,
                                                      reverse_engineer, success_rate)
from bna_gateway.mitigation.triggers import Tensors, TriggerFamily

# reverse_engineer's signature: (model, x, y, groups, targets, family, cfg, desc) -> ReverseResult
Optimiser = Callable[..., ReverseResult]


@dataclass(frozen=True)
class Suspect:
    """A frozen classifier (images in [0, 1] -> logits), its clean images ``x`` with labels ``y`` on the
    model's device, and the trigger optimiser the stages run (the batched one; tests may give a table)."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    optimiser: Optimiser = reverse_engineer

    @property
    def present(self) -> list[int]:
        """The classes that have clean images."""
        return sorted(self.y.unique().tolist())

    def index(self, groups: list[list[int]]) -> torch.Tensor:
        """[G, L] image indices of each group of classes (see ``reverse.group_index``)."""
        return group_index(self.y.cpu(), groups)

    def reverse(self, groups: list[list[int]], targets: list[int] | torch.Tensor, family: TriggerFamily,
                cfg: ReverseConfig, desc: str) -> ReverseResult:
        """One trigger per group of source classes, towards its target(s), in one batched optimisation."""
        return self.optimiser(self.model, self.x, self.y, groups, targets, family, cfg, desc=desc)

    def fractions(self, family: TriggerFamily, tensors: Tensors, cfg: ReverseConfig,
                  per_class: int | None = None) -> torch.Tensor:
        """[T, K, K] where each of T triggers sends each class's clean images (CPU); with ``per_class``, on
        the first that many images of each class only."""
        x, y = (self.x, self.y) if per_class is None else self.subsample(per_class)
        return prediction_fractions(self.model, x, y, self.num_classes, family, tensors, cfg).cpu()

    def subsample(self, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``per_class`` clean images of each class."""
        keep = torch.zeros_like(self.y, dtype=torch.bool)
        for c in self.present:
            keep[(self.y == c).nonzero(as_tuple=True)[0][:per_class]] = True
        return self.x[keep], self.y[keep]

    def success(self, groups: list[list[int]], targets: torch.Tensor, family: TriggerFamily, tensors: Tensors,
                cfg: ReverseConfig, per_class_targets: bool = False) -> torch.Tensor:
        """[G] fraction of each group's images that its trigger (tensors [G, ...]) sends to its target
        (``targets`` [G], or a per-class mapping [G, K] with ``per_class_targets``)."""
        y = self.y if per_class_targets else None
        return success_rate(self.model, self.x, self.index(groups), targets, family, tensors, cfg, y).cpu()
