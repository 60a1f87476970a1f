"""SCALE-UP (Guo, Li, Chen, Fan & Wang, ICLR 2023): amplifying every pixel value of a triggered input
keeps its (target) prediction more often than it does for a clean one.

The scaled prediction consistency of x is ``SPC(x) = mean_n [f(clip(n * x, 0, 1)) == f(x)]`` over the
scale set; the score is SPC (higher: more likely triggered). SCALE-UP's data-limited variant
standardises SPC by the clean images' mean and standard deviation, which is monotone and so leaves a
threshold set on the same clean images where it is.

Hyper-parameters: scale set {3, 5, 7, 9, 11} (SCALE-UP's code, ``scale_set = [3, 5, 7, 9, 11]``); the
threshold at the 5 % false-alarm budget on the defender's clean images (``common.FALSE_ALARM_BUDGET``).
SPC takes only six values, so the budget is met with ties counted against the detector: when more
than 5 % of clean images have SPC 1, nothing is flagged. Forward passes per input: 6.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ScaleUp:
    scales: tuple[int, ...] = (3, 5, 7, 9, 11)
    chunk: int = 1000
    name: str = "scale_up"
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def forwards_per_input(self) -> int:
        return 1 + len(self.scales)

    def fit(self, model: nn.Module, clean_x: torch.Tensor, clean_y: torch.Tensor) -> "ScaleUp":
        self.model = model.eval()
        return self

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        assert self.model is not None, "fit first"
        device = next(self.model.parameters()).device
        per = max(1, self.chunk // (1 + len(self.scales)))
        out = []
        for i in range(0, len(x), per):
            xb = x[i : i + per]
            copies = torch.stack([xb] + [(xb * s).clamp(0, 1) for s in self.scales], 1).flatten(0, 1)
            pred = self.model(copies.to(device)).argmax(1).cpu().view(len(xb), -1)
            out.append((pred[:, 1:] == pred[:, :1]).float().mean(1))
        return torch.cat(out) if out else torch.empty(0)
