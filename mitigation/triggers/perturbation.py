"""The perturbation family (additive): ``x' = clip(x + delta, 0, 1)``.

``delta`` [C, H, W]; size = ``|delta|_2``; strength = ``delta``. Chessboard, single pixel, SIG and the
minimum-size additive estimates of subtle triggers (blends look like this too) are perturbations.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from bna_gateway.mitigation.triggers.base import CandidateTriggers, Tensors, TriggerFamily, randn_per_group


class PerturbationFamily(TriggerFamily):
    name = "perturbation"
    tensor_names = ("delta",)
    strength = "delta"

    def embed(self, x: torch.Tensor, tensors: Tensors) -> torch.Tensor:
        return (x + tensors["delta"].to(x.device).unsqueeze(1)).clamp(0, 1)

    def size(self, tensors: Tensors) -> torch.Tensor:
        return tensors["delta"].flatten(1).norm(dim=1)

    def candidates(self, shape: tuple[int, int, int], generators: Sequence[torch.Generator]) -> CandidateTriggers:
        return PerturbationCandidates(shape, generators)

    def panels(self, tensors: Tensors) -> list[tuple[str, torch.Tensor]]:
        d = tensors["delta"]
        return [("perturbation (scaled)", (d - d.min()) / (d.max() - d.min() + 1e-8)), ("|perturbation|", d.abs())]


class PerturbationCandidates(CandidateTriggers):
    """``delta`` itself, starting as small noise."""

    def __init__(self, shape: tuple[int, int, int], generators: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.family = PERTURBATION
        self.scale = math.sqrt(math.prod(shape))
        self.delta = nn.Parameter(0.01 * randn_per_group(generators, *shape))

    def tensors(self, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"delta": self.delta if rows is None else self.delta[rows]}

    def normalised_size(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.size(rows) / self.scale * 4


PERTURBATION = PerturbationFamily()
