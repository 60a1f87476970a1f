"""Median-absolute-deviation anomaly scores (one-sided: only unusually small triggers are suspicious)."""
from __future__ import annotations

import torch

MAD_CONSISTENCY = 1.4826  # makes MAD a consistent estimator of the standard deviation for normal data


def mad_scores(statistic: torch.Tensor) -> torch.Tensor:
    """``(stat - median) / (1.4826 * MAD)``; large positive = anomalously large statistic (small trigger).

    Non-finite statistics (no trigger found) get score 0 and do not enter the median.
    """
    stat = statistic.double()
    finite = torch.isfinite(stat)
    if finite.sum() < 3:
        return torch.zeros_like(stat)
    vals = stat[finite]
    med = vals.median()
    mad = (vals - med).abs().median() * MAD_CONSISTENCY
    mad = torch.clamp(mad, min=1e-12 * max(1.0, float(med.abs())))
    score = torch.zeros_like(stat)
    score[finite] = (vals - med) / mad
    return score.float()
