"""The attack lab: backdoor triggers used to *evaluate* the defence.

A trigger is a small serialisable ``AttackSpec`` (kind, parameters, mode, target, seed), saved beside
the model as ``attack.json`` so evaluation re-applies exactly the same trigger. ``build_trigger``
turns it into a batched, deterministic ``Trigger``: ``trigger(x)`` maps images in [0, 1] of shape
[N, C, H, W] to triggered images in [0, 1].
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, field_validator

Mode = Literal["a2o", "a2a"]
ATTACKS = ("none", "badnet", "chessboard", "single_pixel", "blend", "sig", "wanet")

DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "none": {},
    "badnet": {"patch_size": 3, "location": "random"},
    "chessboard": {"amplitude": 6 / 255},
    "single_pixel": {"delta": 75 / 255, "location": "random"},
    "blend": {"alpha": 0.2, "pattern": "random"},
    "sig": {"delta": 40 / 255, "frequency": 6},
    "wanet": {"k": 4, "s": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0},
}


class AttackSpec(BaseModel):
    kind: str = "none"
    params: dict[str, Any] = Field(default_factory=dict)
    mode: Mode = "a2o"
    target: int = 0
    seed: int = 0
    poison_rate: float = 0.1

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        v = v.replace("-", "_").lower()
        if v not in ATTACKS:
            raise ValueError(f"unknown attack {v!r}: use one of {', '.join(ATTACKS)}")
        return v

    def resolved_params(self) -> dict[str, Any]:
        unknown = set(self.params) - set(DEFAULT_PARAMS[self.kind])
        if unknown:
            raise ValueError(f"attack {self.kind!r} has no parameter(s) {sorted(unknown)}; "
                             f"known: {sorted(DEFAULT_PARAMS[self.kind])}")
        return {**DEFAULT_PARAMS[self.kind], **self.params}

    def target_of(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Attack target label of images whose true label is ``y``."""
        if self.mode == "a2a":
            return (y + 1) % num_classes
        return torch.full_like(y, self.target)

    def victims(self, y: torch.Tensor) -> torch.Tensor:
        """Mask of images the attack applies to: every image in A2A, non-target images in A2O."""
        if self.mode == "a2a":
            return torch.ones_like(y, dtype=torch.bool)
        return y != self.target

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({**self.model_dump(), "params": self.resolved_params()}, indent=2))

    @classmethod
    def load(cls, path: Path) -> "AttackSpec":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"attack spec not found: {path}")
        return cls.model_validate_json(path.read_text())


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["alpha=0.2", "location=3,4"]`` -> ``{"alpha": 0.2, "location": [3, 4]}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"attack parameter {item!r} is not KEY=VALUE")
        try:
            val: Any = json.loads(raw)
        except json.JSONDecodeError:
            val = [int(v) for v in raw.split(",")] if "," in raw else raw
        out[key.strip()] = val
    return out


class Trigger(torch.nn.Module):
    """Base class: ``forward(x)`` embeds the trigger into a batch of [0, 1] images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Identity(Trigger):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MaskPattern(Trigger):
    """``x' = (1 - m) * x + m * p``: BadNet patches, Blend (m = alpha everywhere), and estimated triggers."""

    def __init__(self, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.float())
        self.register_buffer("pattern", pattern.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((1 - self.mask) * x + self.mask * self.pattern).clamp(0, 1)


class Additive(Trigger):
    """``x' = clip(x + delta)``: chessboard, single pixel, SIG, and estimated perturbations."""

    def __init__(self, delta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("delta", delta.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.delta).clamp(0, 1)


class Warp(Trigger):
    """WaNet: resample the image through a fixed smooth warping field."""

    def __init__(self, grid: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("grid", grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, align_corners=True).clamp(0, 1)


def _location(loc: Any, h: int, w: int, k: int, g: torch.Generator) -> tuple[int, int]:
    if loc == "random":
        r = int(torch.randint(0, h - k + 1, (1,), generator=g))
        c = int(torch.randint(0, w - k + 1, (1,), generator=g))
        return r, c
    if loc == "bottom_right":
        return h - k - 1 if h - k - 1 >= 0 else 0, w - k - 1 if w - k - 1 >= 0 else 0
    r, c = (int(v) for v in loc)
    if not (0 <= r <= h - k and 0 <= c <= w - k):
        raise ValueError(f"trigger location {(r, c)} does not fit a {k}x{k} patch in a {h}x{w} image")
    return r, c


def identity_grid(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """[H, W, 2] sampling grid (x, y in [-1, 1], ``align_corners=True``) that leaves an image as it is."""
    ys = torch.linspace(-1, 1, h, device=device)
    xs = torch.linspace(-1, 1, w, device=device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx, yy), dim=-1)


def wanet_grids(h: int, w: int, k: int, s: float, grid_rescale: float, g: torch.Generator) -> torch.Tensor:
    """WaNet's warping grid (Nguyen & Tran, 2021): a random k x k field, upsampled, added to identity."""
    ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    grid = identity_grid(h, w).unsqueeze(0) + s * noise / max(h, w)
    return (grid * grid_rescale).clamp(-1, 1)


def build_trigger(spec: AttackSpec, shape: tuple[int, int, int]) -> Trigger:
    """Deterministic trigger for images of shape (C, H, W)."""
    c, h, w = shape
    p = spec.resolved_params()
    g = torch.Generator().manual_seed(1000 + spec.seed)
    if spec.kind == "none":
        return Identity()
    if spec.kind == "badnet":
        k = int(p["patch_size"])
        r0, c0 = _location(p["location"], h, w, k, g)
        mask = torch.zeros(1, h, w)
        mask[:, r0 : r0 + k, c0 : c0 + k] = 1
        pattern = torch.zeros(c, h, w)
        pattern[:, r0 : r0 + k, c0 : c0 + k] = torch.randint(0, 2, (c, k, k), generator=g).float()
        return MaskPattern(mask, pattern)
    if spec.kind == "chessboard":
        rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        board = ((rr + cc) % 2).float() * 2 - 1
        return Additive(float(p["amplitude"]) * board.expand(c, h, w).clone())
    if spec.kind == "single_pixel":
        r0, c0 = _location(p["location"], h, w, 1, g)
        delta = torch.zeros(c, h, w)
        delta[:, r0, c0] = float(p["delta"])
        return Additive(delta)
    if spec.kind == "blend":
        if p["pattern"] == "random":
            pattern = torch.rand(c, h, w, generator=g)
        else:
            from bna_gateway.mitigation.datasets import decode_image

            pattern = decode_image(Path(p["pattern"]), c, (h, w))
        return MaskPattern(torch.full((1, h, w), float(p["alpha"])), pattern)
    if spec.kind == "sig":
        cols = torch.arange(w).float()
        wave = float(p["delta"]) * torch.sin(2 * math.pi * cols * float(p["frequency"]) / w)
        return Additive(wave.view(1, 1, w).expand(c, h, w).clone())
    if spec.kind == "wanet":
        return Warp(wanet_grids(h, w, int(p["k"]), float(p["s"]), float(p["grid_rescale"]), g))
    raise ValueError(f"unknown attack {spec.kind!r}")


def wanet_noise(trigger: Warp, n: int, g: torch.Generator) -> Warp:
    """WaNet's 'noise mode': the warping grid plus random jitter, used with the true label in training."""
    h, w = trigger.grid.shape[1:3]
    jitter = (torch.rand(n, h, w, 2, generator=g) * 2 - 1) / max(h, w)
    return Warp((trigger.grid + jitter).clamp(-1, 1))
