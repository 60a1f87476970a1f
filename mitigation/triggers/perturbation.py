"""The perturbation family (additive): ``x' = clip(x + delta, 0, 1)``.

``delta`` [C, H, W]; size = ``|delta|_2``; strength = ``delta``. Chessboard, single pixel, SIG and the
minimum-size additive estimates of subtle triggers (blends look like this too) are perturbations.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from bna_gateway.mitigation.triggers.base import CandidateTriggers, Tensors, TriggerFamily


class PerturbationFamily(TriggerFamily):
    name = "perturbation"
    tensor_names = ("delta",)
    strength = "delta"

    def embed(self, x: torch.Tensor, tensors: Tensors) -> torch.Tensor:
        return (x + tensors["delta"].to(x.device).unsqueeze(1)).clamp(0, 1)

    def size(self, tensors: Tensors) -> torch.Tensor:
        return tensors["delta"].flatten(1).norm(dim=1)

    def candidates(self, n: int, shape: tuple[int, int, int], generator: torch.Generator) -> CandidateTriggers:
        return PerturbationCandidates(n, shape, generator)

    def panels(self, tensors: Tensors) -> list[tuple[str, torch.Tensor]]:
        d = tensors["delta"]
        return [("perturbation (scaled)", (d - d.min()) / (d.max() - d.min() + 1e-8)), ("|perturbation|", d.abs())]


class PerturbationCandidates(CandidateTriggers):
    """``delta`` itself, starting as small noise."""

    def __init__(self, n: int, shape: tuple[int, int, int], generator: torch.Generator) -> None:
        super().__init__()
        self.scale = math.sqrt(math.prod(shape))
        self.delta = nn.Parameter(0.01 * torch.randn(n, *shape, generator=generator))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return PERTURBATION.embed(x, {"delta": self.delta})

    def size(self) -> torch.Tensor:
        return self.delta.flatten(1).norm(dim=1)

    def normalised_size(self) -> torch.Tensor:
        return self.size() / self.scale * 4

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta.detach().clone()}


PERTURBATION = PerturbationFamily()
