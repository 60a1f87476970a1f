"""Batched candidate triggers, one per ordered (source, target) pair, as ``nn.Module`` parameters.

Three families:
- ``patch`` (Neural Cleanse): ``x' = (1 - m) x + m p`` with mask ``m`` in [0, 1]^{HxW} and pattern ``p``;
  size = ``|m|_1``.
- ``perturbation``: ``x' = clip(x + delta)``; size = ``|delta|_2``.
- ``warp``: ``x'`` = x resampled through identity + a smooth displacement field (a ``control`` x ``control``
  grid of displacements, upsampled bicubically: WaNet's construction); size = the root-mean-square
  displacement in pixels. A warp moves pixels instead of changing them: neither a small patch nor a small
  additive perturbation reproduces it, so a warping backdoor is only small in its own family.
All expose ``embed(x)`` for x of shape [P, B, C, H, W] and ``size()`` of shape [P].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bna_gateway.mitigation.attacks import Additive, MaskPattern, Trigger, Warp, identity_grid

FAMILIES = ("patch", "perturbation", "warp")
# the tensor that sets a trigger's strength: scaled to calibrate an estimate, or to fit a twin on stronger copies
STRENGTH = {"perturbation": "delta", "warp": "flow"}


def family_of(tensors: dict[str, torch.Tensor]) -> str:
    """The family of a trigger given as its tensors (each family has its own names)."""
    if "mask" in tensors:
        return "patch"
    if "flow" in tensors:
        return "warp"
    if "delta" in tensors:
        return "perturbation"
    raise ValueError(f"tensors {sorted(tensors)} are no trigger of the families {FAMILIES}")


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
        if family == "warp":
            return Warp(warp_grid(tensors["flow"][i]).unsqueeze(0))
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


def warp_grid(flow: torch.Tensor) -> torch.Tensor:
    """Sampling grid(s) of displacement field(s) ``flow`` ([..., H, W, 2], grid units), clamped to the image."""
    h, w = flow.shape[-3:-1]
    return (identity_grid(h, w, flow.device) + flow).clamp(-1, 1)


def warp_images(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Images ``x`` [G, B, C, H, W] resampled through field ``flow[g]`` ([G or 1, H, W, 2])."""
    g, b = x.shape[:2]
    grid = warp_grid(flow).to(x.dtype).unsqueeze(1).expand(flow.shape[0] if g == 1 else g, b, *flow.shape[1:])
    src = x.expand(grid.shape[0], *x.shape[1:])
    out = F.grid_sample(src.flatten(0, 1), grid.flatten(0, 1), mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out.view(grid.shape[0], b, *x.shape[2:]).clamp(0, 1)


def pixel_scale(h: int, w: int) -> torch.Tensor:
    """Grid units per pixel along (x, y) with ``align_corners=True``."""
    return torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])


def warp_size(flow: torch.Tensor) -> torch.Tensor:
    """[G] root-mean-square displacement in pixels of fields ``flow`` [G, H, W, 2] (grid units)."""
    h, w = flow.shape[1:3]
    px = flow / pixel_scale(h, w).to(flow.device)
    return px.pow(2).sum(-1).flatten(1).mean(1).sqrt()


class WarpTriggers(PairTriggers):
    family = "warp"

    def __init__(self, n: int, shape: tuple[int, int, int], generator: torch.Generator, control: int = 4) -> None:
        super().__init__()
        _, h, w = shape
        self.hw = (h, w)
        self.scale_px = max(h, w) / 28  # a pixel's worth of displacement on a 28-pixel-wide image
        # control-point displacements in pixels, (dx, dy); a small random start breaks the symmetry
        self.control = nn.Parameter(0.05 * torch.randn(n, 2, control, control, generator=generator))
        self.register_buffer("unit", pixel_scale(h, w))

    def flow(self) -> torch.Tensor:
        """[P, H, W, 2] displacement in grid units."""
        px = F.interpolate(self.control, size=self.hw, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        return px * self.unit

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return warp_images(x, self.flow())

    def size(self) -> torch.Tensor:
        return warp_size(self.flow())

    def normalised_size(self) -> torch.Tensor:
        return self.size() / self.scale_px

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"flow": self.flow().detach().clone()}


def make_triggers(family: str, n: int, shape: tuple[int, int, int], generator: torch.Generator) -> PairTriggers:
    if family == "patch":
        return PatchTriggers(n, shape, generator)
    if family == "perturbation":
        return PerturbationTriggers(n, shape, generator)
    if family == "warp":
        return WarpTriggers(n, shape, generator)
    raise ValueError(f"unknown trigger family {family!r}: use one of {FAMILIES}")
