"""The patch family (a stamp): ``x' = (1 - m) x + m p``.

Mask ``m`` [1, H, W] in [0, 1], pattern ``p`` [C, H, W]; size = ``|m|_1`` (pixels). BadNet's k x k
patch (m = 1 on the patch), Blend (m = alpha everywhere) and Neural Cleanse's estimates are all
patches. It has no strength to scale: a stamp is as strong as its pixels.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bna_gateway.mitigation.triggers.base import CandidateTriggers, Tensors, TriggerFamily, randn_per_group


class PatchFamily(TriggerFamily):
    name = "patch"
    tensor_names = ("mask", "pattern")
    strength = None

    def embed(self, x: torch.Tensor, tensors: Tensors) -> torch.Tensor:
        m = tensors["mask"].to(x.device).unsqueeze(1)
        return ((1 - m) * x + m * tensors["pattern"].to(x.device).unsqueeze(1)).clamp(0, 1)

    def size(self, tensors: Tensors) -> torch.Tensor:
        return tensors["mask"].flatten(1).sum(1)

    def candidates(self, shape: tuple[int, int, int], generators: Sequence[torch.Generator]) -> CandidateTriggers:
        return PatchCandidates(shape, generators)

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

    def __init__(self, shape: tuple[int, int, int], generators: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.family = PATCH
        c, h, w = shape
        self.hw = h * w
        draws = randn_per_group(generators, 1 + c, h, w)  # each group: its mask noise, then its pattern
        self.mask_raw = nn.Parameter(-1.0 + 0.1 * draws[:, :1])
        self.pattern_raw = nn.Parameter(draws[:, 1:].clone())

    def tensors(self, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        a, b = (self.mask_raw, self.pattern_raw) if rows is None else (self.mask_raw[rows], self.pattern_raw[rows])
        return {"mask": torch.tanh(a) / 2 + 0.5, "pattern": torch.tanh(b) / 2 + 0.5}

    def normalised_size(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.size(rows) / self.hw


PATCH = PatchFamily()
