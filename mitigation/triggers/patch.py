"""The patch family (a stamp): ``x' = (1 - m) x + m p``.

Mask ``m`` [1, H, W] in [0, 1], pattern ``p`` [C, H, W]; size = ``|m|_1`` (pixels). BadNet's k x k
patch (m = 1 on the patch), Blend (m = alpha everywhere) and Neural Cleanse's estimates are all
patches. It has no strength to scale: a stamp is as strong as its pixels.
"""
from __future__ import annotations

import torch
from torch import nn

from bna_gateway.mitigation.triggers.base import CandidateTriggers, Tensors, TriggerFamily


class PatchFamily(TriggerFamily):
    name = "patch"
    tensor_names = ("mask", "pattern")
    strength = None

    def embed(self, x: torch.Tensor, tensors: Tensors) -> torch.Tensor:
        m = tensors["mask"].to(x.device).unsqueeze(1)
        return ((1 - m) * x + m * tensors["pattern"].to(x.device).unsqueeze(1)).clamp(0, 1)

    def size(self, tensors: Tensors) -> torch.Tensor:
        return tensors["mask"].flatten(1).sum(1)

    def candidates(self, n: int, shape: tuple[int, int, int], generator: torch.Generator) -> CandidateTriggers:
        return PatchCandidates(n, shape, generator)

    def panels(self, tensors: Tensors) -> list[tuple[str, torch.Tensor]]:
        mask, pattern = tensors["mask"], tensors["pattern"]
        return [("mask", mask), ("pattern", pattern), ("mask x pattern", mask * pattern)]

    @staticmethod
    def binarised(tensors: Tensors, fraction: float) -> dict[str, torch.Tensor]:
        """A solid stamp: the mask set to 1 where it exceeds ``fraction`` of its maximum, else 0.

        A minimal mask puts partial weight on a real stamp's pixels; the solid one is as strong as
        the stamp it estimates (``binarise_fraction`` in detection; docs/method.md)."""
        mask = tensors["mask"]
        return {"mask": (mask > fraction * mask.max()).float(), "pattern": tensors["pattern"]}


class PatchCandidates(CandidateTriggers):
    """Neural Cleanse's parametrisation: ``m = (tanh(a) + 1) / 2`` starts small, ``p = (tanh(b) + 1) / 2`` random."""

    def __init__(self, n: int, shape: tuple[int, int, int], generator: torch.Generator) -> None:
        super().__init__()
        c, h, w = shape
        self.hw = h * w
        self.mask_raw = nn.Parameter(torch.full((n, 1, h, w), -1.0) + 0.1 * torch.randn(n, 1, h, w, generator=generator))
        self.pattern_raw = nn.Parameter(torch.randn(n, c, h, w, generator=generator))

    def mask(self) -> torch.Tensor:
        return torch.tanh(self.mask_raw) / 2 + 0.5

    def pattern(self) -> torch.Tensor:
        return torch.tanh(self.pattern_raw) / 2 + 0.5

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return PATCH.embed(x, {"mask": self.mask(), "pattern": self.pattern()})

    def size(self) -> torch.Tensor:
        return self.mask().flatten(1).sum(1)

    def normalised_size(self) -> torch.Tensor:
        return self.size() / self.hw

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"mask": self.mask().detach().clone(), "pattern": self.pattern().detach().clone()}


PATCH = PatchFamily()
