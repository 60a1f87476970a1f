"""What every job shares: the run options (seed, device, progress)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bna_gateway.models.device import resolve_device


@dataclass(frozen=True)
class RunOptions:
    seed: int = 0
    device: str | None = None  # None / "auto": CUDA when visible, else the CPU
    progress: bool = True  # progress bars (``--quiet`` turns them off)

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def seed_everything(self) -> None:
        torch.manual_seed(self.seed)
