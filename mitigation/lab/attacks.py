"""The attack lab's backdoors, used to *evaluate* the defence.

An attack is a small serialisable ``AttackSpec`` (kind, parameters, mode, target, seed), saved beside
the model as ``attack.json`` so evaluation re-applies exactly the same trigger. ``build_trigger``
turns it into a deterministic ``Trigger`` of one of the trigger families (``mitigation.triggers``):
``trigger(x)`` maps images in [0, 1] of shape [N, C, H, W] to triggered images in [0, 1].
BadNet and Blend are patches, chessboard, single pixel and SIG perturbations, WaNet a warp.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, field_validator

from bna_gateway.mitigation.triggers import PATCH, PERTURBATION, WARP, Identity, Trigger, identity_grid, resample, sampling_grid
from bna_gateway.models.decode import ImageDecoder

Mode = Literal["a2o", "a2a"]
ATTACKS = ("none", "badnet", "chessboard", "single_pixel", "blend", "sig", "wanet")

DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "none": {},
    "badnet": {"patch_size": 3, "location": "random", "pattern": "random"},
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


def _stamp_pattern(kind: str, c: int, k: int, g: torch.Generator) -> torch.Tensor:
    """A BadNet stamp's k x k pixels: random 0/1 (per channel), a checkerboard, or solid white."""
    if kind == "random":
        return torch.randint(0, 2, (c, k, k), generator=g).float()
    if kind == "checkerboard":
        rr, cc = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
        return ((rr + cc) % 2).float().expand(c, k, k)
    if kind == "solid":
        return torch.ones(c, k, k)
    raise ValueError(f"unknown badnet pattern {kind!r}: use random, checkerboard or solid")


def wanet_flow(h: int, w: int, k: int, s: float, grid_rescale: float, g: torch.Generator) -> torch.Tensor:
    """WaNet's warp (Nguyen & Tran, 2021) as a displacement field [H, W, 2]: a random k x k field,
    upsampled bicubically, ``s / max(H, W)`` grid units at its mean magnitude."""
    ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    flow = s * noise / max(h, w)
    if grid_rescale != 1.0:  # WaNet scales the whole grid; as a displacement from the identity
        flow = (identity_grid(h, w).unsqueeze(0) + flow) * grid_rescale - identity_grid(h, w).unsqueeze(0)
    return flow[0]


def build_trigger(spec: AttackSpec, shape: tuple[int, int, int]) -> Trigger | Identity:
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
        pattern[:, r0 : r0 + k, c0 : c0 + k] = _stamp_pattern(p["pattern"], c, k, g)
        return Trigger(PATCH, {"mask": mask, "pattern": pattern})
    if spec.kind == "chessboard":
        rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        board = ((rr + cc) % 2).float() * 2 - 1
        return Trigger(PERTURBATION, {"delta": float(p["amplitude"]) * board.expand(c, h, w).clone()})
    if spec.kind == "single_pixel":
        r0, c0 = _location(p["location"], h, w, 1, g)
        delta = torch.zeros(c, h, w)
        delta[:, r0, c0] = float(p["delta"])
        return Trigger(PERTURBATION, {"delta": delta})
    if spec.kind == "blend":
        if p["pattern"] == "random":
            pattern = torch.rand(c, h, w, generator=g)
        else:
            pattern = ImageDecoder(c, (h, w)).read(Path(p["pattern"]))
        return Trigger(PATCH, {"mask": torch.full((1, h, w), float(p["alpha"])), "pattern": pattern})
    if spec.kind == "sig":
        cols = torch.arange(w).float()
        wave = float(p["delta"]) * torch.sin(2 * math.pi * cols * float(p["frequency"]) / w)
        return Trigger(PERTURBATION, {"delta": wave.view(1, 1, w).expand(c, h, w).clone()})
    if spec.kind == "wanet":
        return Trigger(WARP, {"flow": wanet_flow(h, w, int(p["k"]), float(p["s"]), float(p["grid_rescale"]), g)})
    raise ValueError(f"unknown attack {spec.kind!r}")


def wanet_noise(trigger: Trigger, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """WaNet's 'noise mode': ``x`` warped through the trigger's grid plus random jitter of up to a pixel
    (each image its own), used with the true label in training so the model learns the exact warp."""
    n, _, h, w = x.shape
    jitter = (torch.rand(n, h, w, 2, generator=g) * 2 - 1) / max(h, w)
    grid = (sampling_grid(trigger.flow.unsqueeze(0).cpu()) + jitter).clamp(-1, 1)
    return resample(x, grid.to(x.device))
