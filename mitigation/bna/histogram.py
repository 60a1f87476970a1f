"""Per-channel histograms of activations, batched over all channels of a layer.

Bins of width ``w`` span each channel's clean [min, max]; the first and last bins are open
(semi-infinite). The soft histogram uses the sigmoid indicator ``sigma(tau (a - e))`` of the paper.
Because ``tau * w`` is large (150 x 0.1 = 15), a value's indicator is saturated (0 or 1, to within
3e-7) at every edge but the two around it, so each value only touches its own bin and the two
neighbours: three scatter-adds per value instead of one sigmoid per (value, bin).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BinSpec:
    """Per-channel bin layout: ``lo`` [C], bin width ``width``, ``nbins`` [C] (padded to ``max_bins``)."""

    lo: torch.Tensor
    nbins: torch.Tensor
    width: float
    max_bins: int

    @classmethod
    def from_range(cls, lo: torch.Tensor, hi: torch.Tensor, width: float, max_bins: int = 400) -> "BinSpec":
        span = (hi - lo).clamp(min=width)
        n = torch.ceil(span / width).long().clamp(min=2, max=max_bins)
        # widen the bins of very wide channels so that no channel needs more than max_bins
        return cls(lo.detach(), n, width, int(n.max()))

    def widths(self, span: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.full_like(span, self.width), span / self.max_bins)


def _positions(a: torch.Tensor, bins: BinSpec, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin index (detached, clamped into [0, nbins-1]) and offset from the bin's lower edge."""
    rel = (a - bins.lo.unsqueeze(1)) / w.unsqueeze(1)
    k = torch.floor(rel.detach()).long()
    k = torch.minimum(k.clamp(min=0), (bins.nbins - 1).unsqueeze(1))
    return k, rel - k


def hard_histogram(a: torch.Tensor, bins: BinSpec, w: torch.Tensor) -> torch.Tensor:
    """[C, max_bins] counts for activations ``a`` of shape [C, M]."""
    k, _ = _positions(a, bins, w)
    hist = torch.zeros(a.shape[0], bins.max_bins, device=a.device, dtype=a.dtype)
    return hist.scatter_add_(1, k, torch.ones_like(a))


def soft_histogram(a: torch.Tensor, bins: BinSpec, w: torch.Tensor, tau: float) -> torch.Tensor:
    """[C, max_bins] differentiable counts (sigmoid indicator with temperature ``tau``)."""
    c = a.shape[0]
    k, frac = _positions(a, bins, w)
    scale = (tau * w).unsqueeze(1)
    s_lo = torch.sigmoid(frac * scale)  # indicator at the bin's lower edge
    s_hi = torch.sigmoid((frac - 1) * scale)  # ... and at its upper edge
    has_lo = k >= 1  # bin 0 is open below
    has_hi = k <= (bins.nbins - 2).unsqueeze(1)  # the last bin is open above
    s_lo = torch.where(has_lo, s_lo, torch.ones_like(s_lo))
    s_hi = torch.where(has_hi, s_hi, torch.zeros_like(s_hi))
    hist = torch.zeros(c, bins.max_bins + 2, device=a.device, dtype=a.dtype)  # one pad bin each side
    hist = hist.scatter_add(1, k + 1, s_lo - s_hi)
    hist = hist.scatter_add(1, k, 1 - s_lo)  # spill into the bin below
    hist = hist.scatter_add(1, k + 2, s_hi)  # spill into the bin above
    return hist[:, 1:-1]


def divergence(p_counts: torch.Tensor, q_counts: torch.Tensor, kind: str = "tv", eps: float = 1e-6) -> torch.Tensor:
    """Per-channel divergence [C] between reference counts ``p`` and candidate counts ``q``."""
    p = p_counts / p_counts.sum(1, keepdim=True).clamp(min=1e-12)
    q = q_counts / q_counts.sum(1, keepdim=True).clamp(min=1e-12)
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(1)
    if kind == "kl":
        return (p * ((p + eps) / (q + eps)).log()).sum(1)
    if kind == "js":
        m = 0.5 * (p + q)
        return 0.5 * (p * ((p + eps) / (m + eps)).log()).sum(1) + 0.5 * (q * ((q + eps) / (m + eps)).log()).sum(1)
    raise ValueError(f"unknown divergence {kind!r}: use tv, js or kl")
