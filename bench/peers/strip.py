"""STRIP (Gao et al., ACSAC 2019): a triggered input keeps its (target) prediction when another image is
superimposed on it, so the predictions on superimposed copies have *low entropy*.

For an input x, ``n_overlays`` images are drawn (seeded) from the defender's clean set and superimposed
as STRIP's code does (``cv2.addWeighted(x, 1, overlay, 1, 0)``: the pixel sum, saturated at white);
the score is minus the mean Shannon entropy of the softmax outputs on the copies.

Hyper-parameters: ``n_overlays = 20``, the default of ART's ``STRIP`` defence (``num_samples=20``;
STRIP's paper used N = 100 and reported that small N already separates); the threshold at the 5 %
false-alarm budget on the defender's clean images (``common.FALSE_ALARM_BUDGET``; STRIP's paper chose it
from a normal fit to clean entropies at a 1-2 % false rejection rate). Forward passes per input: 21
(the plain prediction and 20 copies).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Strip:
    n_overlays: int = 20
    seed: int = 0
    chunk: int = 1000  # copies per forward pass
    name: str = "strip"
    model: nn.Module | None = field(default=None, repr=False)
    overlays: torch.Tensor | None = field(default=None, repr=False)

    @property
    def forwards_per_input(self) -> int:
        return 1 + self.n_overlays

    def fit(self, model: nn.Module, clean_x: torch.Tensor, clean_y: torch.Tensor) -> "Strip":
        self.model, self.overlays = model.eval(), clean_x
        return self

    @torch.no_grad()
    def entropy(self, x: torch.Tensor) -> torch.Tensor:
        """[N] mean entropy of the predictions on ``n_overlays`` superimposed copies of each image."""
        assert self.model is not None and self.overlays is not None, "fit first"
        g = torch.Generator().manual_seed(self.seed)
        device = next(self.model.parameters()).device
        per = max(1, self.chunk // self.n_overlays)
        out = []
        for i in range(0, len(x), per):
            xb = x[i : i + per]
            pick = torch.randint(len(self.overlays), (len(xb), self.n_overlays), generator=g)
            blend = (xb.unsqueeze(1) + self.overlays[pick]).clamp(0, 1).flatten(0, 1)
            logp = self.model(blend.to(device)).double().log_softmax(1).cpu()  # float64: confident copies do
            h = -(logp.exp() * logp).nan_to_num().sum(1)  # not all tie at entropy 0
            out.append(h.view(len(xb), self.n_overlays).mean(1))
        return torch.cat(out) if out else torch.empty(0)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return -self.entropy(x)
