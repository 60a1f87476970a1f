"""The warp family: ``x'`` = ``x`` resampled through identity + a smooth displacement field.

``flow`` [H, W, 2] is the displacement in ``grid_sample``'s units (x, y in [-1, 1],
``align_corners=True``); the sampling grid is ``clamp(identity + flow, -1, 1)`` and sampling is
bilinear with the border repeated. Size = root-mean-square displacement in pixels; strength = ``flow``.
WaNet's backdoor is a warp (a random k x k field, upsampled); the defence's candidates are a 4 x 4
grid of control-point displacements upsampled bicubically (WaNet's construction). A warp moves pixels
instead of changing them: neither a small patch nor a small perturbation reproduces it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bna_gateway.mitigation.triggers.base import CandidateTriggers, Tensors, TriggerFamily, randn_per_group


def identity_grid(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """[H, W, 2] sampling grid (x, y in [-1, 1], ``align_corners=True``) that leaves an image as it is."""
    ys = torch.linspace(-1, 1, h, device=device)
    xs = torch.linspace(-1, 1, w, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx, yy), dim=-1)


def pixel_scale(h: int, w: int) -> torch.Tensor:
    """Grid units per pixel along (x, y) with ``align_corners=True``."""
    return torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])


def sampling_grid(flow: torch.Tensor) -> torch.Tensor:
    """Sampling grid(s) of displacement field(s) ``flow`` ([..., H, W, 2]), clamped to the image."""
    h, w = flow.shape[-3:-1]
    return (identity_grid(h, w, flow.device) + flow).clamp(-1, 1)


def resample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Images ``x`` [N, C, H, W] sampled at ``grid`` [N, H, W, 2] (bilinear, border repeated), in [0, 1]."""
    out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=True)
    return out.clamp(0, 1)


class WarpFamily(TriggerFamily):
    name = "warp"
    tensor_names = ("flow",)
    strength = "flow"

    def embed(self, x: torch.Tensor, tensors: Tensors) -> torch.Tensor:
        flow = tensors["flow"].to(x.device)
        g, b = x.shape[:2]
        groups = flow.shape[0] if g == 1 else g
        grid = sampling_grid(flow).unsqueeze(1).expand(groups, b, *flow.shape[1:])
        src = x.expand(groups, *x.shape[1:])
        return resample(src.flatten(0, 1), grid.flatten(0, 1)).view(groups, b, *x.shape[2:])

    def size(self, tensors: Tensors) -> torch.Tensor:
        flow = tensors["flow"]
        h, w = flow.shape[1:3]
        px = flow / pixel_scale(h, w).to(flow.device)
        return px.pow(2).sum(-1).flatten(1).mean(1).sqrt()

    def candidates(self, shape: tuple[int, int, int], generators: Sequence[torch.Generator]) -> CandidateTriggers:
        return WarpCandidates(shape, generators)

    def panels(self, tensors: Tensors) -> list[tuple[str, torch.Tensor]]:
        """The displacement magnitude, and a checkerboard warped through the field (amplified so that a
        sub-pixel warp is visible)."""
        flow = tensors["flow"]
        h, w = flow.shape[:2]
        mag = (flow / pixel_scale(h, w)).norm(dim=-1).unsqueeze(0)  # [1, H, W] pixels
        rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        step = max(2, min(h, w) // 8)
        board = (((rr // step) + (cc // step)) % 2).float().view(1, 1, 1, h, w)
        gain = max(1.0, 0.25 * min(h, w) / max(float(mag.max()), 1e-6))  # the largest move a quarter of the image
        warped = self.embed(board, {"flow": (flow * gain).unsqueeze(0)})[0, 0]
        return [(f"|displacement| (max {float(mag.max()):.2f} px)", mag / mag.max().clamp(min=1e-8)),
                (f"checkerboard warped (x{gain:.0f})", warped)]


class WarpCandidates(CandidateTriggers):
    """A ``control`` x ``control`` grid of displacements in pixels per trigger, upsampled bicubically."""

    def __init__(self, shape: tuple[int, int, int], generators: Sequence[torch.Generator], control: int = 4) -> None:
        super().__init__()
        self.family = WARP
        _, h, w = shape
        self.hw = (h, w)
        self.scale_px = max(h, w) / 28  # a pixel's worth of displacement on a 28-pixel-wide image
        # (dx, dy) in pixels; a small random start breaks the symmetry
        self.control = nn.Parameter(0.05 * randn_per_group(generators, 2, control, control))
        self.register_buffer("unit", pixel_scale(h, w))

    def flow(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[G, H, W, 2] displacement in grid units."""
        control = self.control if rows is None else self.control[rows]
        px = F.interpolate(control, size=self.hw, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        return px * self.unit

    def tensors(self, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"flow": self.flow(rows)}

    def normalised_size(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.size(rows) / self.scale_px


WARP = WarpFamily()
