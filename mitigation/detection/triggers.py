"""Batched candidate triggers, one per ordered (source, target) pair, as ``nn.Module`` parameters.

Two families:
- ``patch`` (Neural Cleanse): ``x' = (1 - m) x + m p`` with mask ``m`` in [0, 1]^{HxW} and pattern ``p``;
  size = ``|m|_1``.
- ``perturbation``: ``x' = clip(x + delta)``; size = ``|delta|_2``.
Both expose ``embed(x)`` for x of shape [P, B, C, H, W] and ``size()`` of shape [P].
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mitigation.attacks import Additive, MaskPattern, Trigger

FAMILIES = ("patch", "perturbation")


class PairTriggers(nn.Module):
    family: str

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def size(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def normalised_size(self) -> torch.Tensor:
        """Size scaled to about [0, 1] so one lambda schedule suits every input shape."""
        raise NotImplementedError  # pragma: no cover

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Current trigger tensors (detached), for keeping the best one per pair."""
        raise NotImplementedError  # pragma: no cover

    @staticmethod
    def export(family: str, tensors: dict[str, torch.Tensor], i: int) -> Trigger:
        if family == "patch":
            return MaskPattern(tensors["mask"][i], tensors["pattern"][i])
        return Additive(tensors["delta"][i])


class PatchTriggers(PairTriggers):
    family = "patch"

    def __init__(self, n: int, shape: tuple[int, int, int], generator: torch.Generator) -> None:
        super().__init__()
        c, h, w = shape
        self.hw = h * w
        # tanh parameterisation as in Neural Cleanse; the mask starts small, the pattern random
        self.mask_raw = nn.Parameter(torch.full((n, 1, h, w), -1.0) + 0.1 * torch.randn(n, 1, h, w, generator=generator))
        self.pattern_raw = nn.Parameter(torch.randn(n, c, h, w, generator=generator))

    def mask(self) -> torch.Tensor:
        return torch.tanh(self.mask_raw) / 2 + 0.5

    def pattern(self) -> torch.Tensor:
        return torch.tanh(self.pattern_raw) / 2 + 0.5

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask().unsqueeze(1)
        return (1 - m) * x + m * self.pattern().unsqueeze(1)

    def size(self) -> torch.Tensor:
        return self.mask().flatten(1).sum(1)

    def normalised_size(self) -> torch.Tensor:
        return self.size() / self.hw

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"mask": self.mask().detach().clone(), "pattern": self.pattern().detach().clone()}


class PerturbationTriggers(PairTriggers):
    family = "perturbation"

    def __init__(self, n: int, shape: tuple[int, int, int], generator: torch.Generator) -> None:
        super().__init__()
        self.scale = math.sqrt(math.prod(shape))
        self.delta = nn.Parameter(0.01 * torch.randn(n, *shape, generator=generator))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.delta.unsqueeze(1)).clamp(0, 1)

    def size(self) -> torch.Tensor:
        return self.delta.flatten(1).norm(dim=1)

    def normalised_size(self) -> torch.Tensor:
        return self.size() / self.scale * 4

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta.detach().clone()}


def make_triggers(family: str, n: int, shape: tuple[int, int, int], generator: torch.Generator) -> PairTriggers:
    if family == "patch":
        return PatchTriggers(n, shape, generator)
    if family == "perturbation":
        return PerturbationTriggers(n, shape, generator)
    raise ValueError(f"unknown trigger family {family!r}: use one of {FAMILIES}")
