"""From trigger sizes to anomaly scores: the pair statistic and the MAD test (docs/method.md#3-scoring)."""
from __future__ import annotations

import math

import torch

MAD_CONSISTENCY = 1.4826  # makes MAD a consistent estimator of the standard deviation for normal data


def all_pairs(num_classes: int) -> list[tuple[int, int]]:
    """Every ordered (source, target) pair, source-major."""
    return [(s, t) for s in range(num_classes) for t in range(num_classes) if s != t]


def resolve_statistic(kind: str, num_classes: int) -> str:
    """``auto`` is the source-normalised statistic from 5 classes up (each source then has enough
    targets for its median), else plain."""
    if kind not in ("plain", "source", "auto"):
        raise ValueError(f"unknown pair statistic {kind!r}: use plain, source or auto")
    return ("source" if num_classes >= 5 else "plain") if kind == "auto" else kind


def pair_statistic(size: torch.Tensor, pairs: list[tuple[int, int]], num_classes: int, kind: str = "auto") -> torch.Tensor:
    """Per-pair anomaly statistic from trigger sizes (large = suspiciously small trigger; NaN = no trigger).

    plain: ``1 / size`` (the paper). source: the median size of the source's triggers to every class,
    divided by this pair's size, so a source that is easy to turn into anything is not flagged towards
    every class. A pair with no successful trigger counts in its source's median as the largest size
    found (not inf: a warping backdoor leaves most pairs without a warp, and a median of inf would
    leave its own pairs no statistic)."""
    kind = resolve_statistic(kind, num_classes)
    size = size.double()
    found = torch.isfinite(size) & (size > 0)
    nan = torch.full_like(size, float("nan"))
    if kind == "plain":
        return torch.where(found, 1.0 / size, nan).float()
    src = torch.tensor([s for s, _ in pairs])
    tgt = torch.tensor([t for _, t in pairs])
    table = torch.full((num_classes, num_classes), float("nan"), dtype=torch.double)
    largest = size[found].max() if bool(found.any()) else torch.tensor(float("nan"), dtype=torch.double)
    table[src, tgt] = torch.where(torch.isinf(size), largest, size)
    med = table.nanmedian(dim=1).values[src]
    return torch.where(found & torch.isfinite(med), med / size, nan).float()


def mad_scores(statistic: torch.Tensor, scale_floor: float = 0.0) -> torch.Tensor:
    """``(stat - median) / (1.4826 * MAD)``; large positive = anomalously large statistic (small trigger).

    One-sided: only unusually small triggers are suspicious. Non-finite statistics (no trigger found)
    get score 0 and do not enter the median. The scale is never below ``scale_floor``."""
    stat = statistic.double()
    finite = torch.isfinite(stat)
    if finite.sum() < 3:
        return torch.zeros_like(statistic)
    vals = stat[finite]
    med = vals.median()
    mad = float((vals - med).abs().median()) * MAD_CONSISTENCY
    scale = max(mad, scale_floor, 1e-12 * max(1.0, float(med.abs())))
    score = torch.zeros_like(stat)
    score[finite] = (vals - med) / scale
    return score.float()


def pair_scores(size: torch.Tensor, pairs: list[tuple[int, int]], num_classes: int, kind: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistic and MAD score of every pair, from one family's trigger sizes."""
    stat = pair_statistic(size, pairs, num_classes, kind)
    return stat, mad_scores(stat)


def pair_matrix(values: torch.Tensor, pairs: list[tuple[int, int]], num_classes: int) -> torch.Tensor:
    """[K, K] of per-pair ``values`` (NaN on the diagonal and for pairs not given)."""
    out = torch.full((num_classes, num_classes), float("nan"), dtype=values.dtype)
    src = torch.tensor([s for s, _ in pairs])
    tgt = torch.tensor([t for _, t in pairs])
    out[src, tgt] = values
    return out


def column_evidence(scores: torch.Tensor, pairs: list[tuple[int, int]], num_classes: int) -> torch.Tensor:
    """[K] each target's median pair score over its sources: how far *every* source's way to t is
    unusually short. An all-to-one backdoor shifts its target's whole column; a natural pair shifts one
    cell. A pair with no trigger (score 0) counts as 0, so a few failed optimisations cannot hide a
    target (a median of nine needs five of them)."""
    table = pair_matrix(scores.double(), pairs, num_classes)
    return table.nanmedian(dim=0).values.float()


def target_scores(column: torch.Tensor, sources: int) -> torch.Tensor:
    """[K] robust z-scores of the targets' column evidence against the other targets' (the target
    level's own null population: some classes are naturally easier to reach than others).

    The scale is the targets' MAD (x 1.4826), but never below the spread that the pair scores' own noise
    gives a median of ``sources`` of them (1.2533 / sqrt(n) for unit-scale scores): with ten targets the
    MAD of ten numbers can be small by chance, and a noise column would then look anomalous."""
    return mad_scores(column, scale_floor=1.2533 / math.sqrt(max(1, sources)))


def found_scores(size: torch.Tensor, pairs: list[tuple[int, int]], num_classes: int) -> torch.Tensor:
    """[K] how many of each target's pair optimisations succeeded, against the family's success rate on the
    other targets' pairs: the one-sided binomial tail P(X >= found_t), X ~ Binomial(scanned_t, rate), as a
    standard normal z (0 where no more succeeded than the rate predicts).

    A family whose optimisation fails on most pairs (a warp on a network trained against random warps, as
    WaNet's "noise mode" does) gives those pairs no size, so they leave no statistic and no column score;
    the backdoor then shows only in *where* the optimisation succeeds: every source into its target,
    hardly anything elsewhere (9 of 9 against 4 of 81). The rate is the other targets' (leave-one-column-out,
    with half a success and half a failure added so it is never 0 or 1), so a backdoor's own column does not
    raise its own null."""
    size = size.double()
    tgt = torch.tensor([t for _, t in pairs], dtype=torch.long)
    found = (torch.isfinite(size) & (size > 0)).double()
    n = torch.bincount(tgt, minlength=num_classes).double()
    x = torch.bincount(tgt, weights=found, minlength=num_classes)
    rate = (x.sum() - x + 0.5) / (n.sum() - n + 1.0)
    k = torch.arange(int(n.max().item()) + 1, dtype=torch.double)  # n has num_classes entries, 0 without pairs
    nn, kk, pp = n[:, None], k[None, :], rate[:, None]
    log_pmf = (torch.lgamma(nn + 1) - torch.lgamma(kk + 1) - torch.lgamma((nn - kk).clamp(min=0) + 1)
               + kk * pp.log() + (nn - kk) * torch.log1p(-pp))
    tail = torch.where((kk >= x[:, None]) & (kk <= nn), log_pmf, torch.tensor(float("-inf"), dtype=torch.double))
    log_tail = torch.logsumexp(tail, dim=1).clamp(min=-700.0)  # exp(-700) is still a double
    z = -torch.special.ndtri(log_tail.exp())
    excess = (n > 0) & (x > n * rate)
    return torch.where(excess, z.clamp(min=0.0), torch.zeros_like(z)).float()


def universal_scores(size: torch.Tensor) -> torch.Tensor:
    """[K] Neural Cleanse's anomaly index of each target's universal trigger: the robust z-score of
    -log(size) against the other targets' (a trigger found for no target counts as the largest found)."""
    size = size.double()
    found = torch.isfinite(size) & (size > 0)
    if int(found.sum()) < 3:
        return torch.zeros_like(size).float()
    filled = torch.where(found, size, size[found].max())
    return mad_scores(-filled.log())
