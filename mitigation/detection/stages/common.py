"""Small steps several stages share: batched re-estimation of triggers, solid stamps, shared sources."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bna_gateway.mitigation.detection.config import DetectionConfig, ReverseConfig
from bna_gateway.mitigation.detection.suspect import Suspect
from bna_gateway.mitigation.triggers import PATCH, TriggerFamily


@dataclass(frozen=True)
class Job:
    """Re-estimate one trigger: ``sources`` -> ``target`` in ``family``."""

    target: int
    sources: list[int]
    family: TriggerFamily


@dataclass(frozen=True)
class Estimate:
    """A re-estimated trigger (no group dimension), its size and its success on its pool."""

    tensors: dict[str, torch.Tensor]
    size: float
    asr: float


def reestimate(suspect: Suspect, jobs: list[Job], cfg: ReverseConfig, stage: str = "re-estimate") -> list[Estimate]:
    """One trigger per job, aligned with ``jobs``; one batched optimisation per family (by name), each
    holding that family's jobs in their given order (a batch's image draws depend on its groups)."""
    out: list[Estimate | None] = [None] * len(jobs)
    for name in sorted({j.family.name for j in jobs}):
        idx = [i for i, j in enumerate(jobs) if j.family.name == name]
        res = suspect.reverse([jobs[i].sources for i in idx], [jobs[i].target for i in idx], jobs[idx[0]].family, cfg,
                              desc=f"{stage}/{name}")
        for k, i in enumerate(idx):
            out[i] = Estimate(res.one(k), float(res.size[k]), float(res.asr[k]))
    return [e for e in out if e is not None]


def binarise(suspect: Suspect, pool: list[int], target: int | torch.Tensor, tensors: dict[str, torch.Tensor],
             cfg: DetectionConfig, rev: ReverseConfig) -> tuple[dict[str, torch.Tensor], float]:
    """The estimate as a solid stamp (``PatchFamily.binarised``) when that is no weaker on ``pool``'s
    images, else as it is; with its success. ``target``: a class, or a per-class mapping [1, K]."""
    hard = PATCH.binarised(tensors, cfg.binarise_fraction)
    mapping = isinstance(target, torch.Tensor)
    tgt = target if mapping else torch.tensor([target])

    def success(t: dict[str, torch.Tensor]) -> float:
        one = {k: v.unsqueeze(0) for k, v in t.items()}
        return float(suspect.success([pool], tgt, PATCH, one, rev, per_class_targets=mapping)[0])

    asr_soft, asr_hard = success(tensors), success(hard)
    return (hard, asr_hard) if asr_hard >= asr_soft else (dict(tensors), asr_soft)


def sources_sharing(suspect: Suspect, target: int, family: TriggerFamily, tensors: dict[str, torch.Tensor],
                    sources: list[int], cfg: DetectionConfig) -> list[int]:
    """The ``sources`` on which this trigger also sends at least ``expand_sources`` of the images to
    ``target`` (none when ``expand_sources`` is off)."""
    if cfg.expand_sources is None or not sources:
        return []
    stacked = {k: v.unsqueeze(0).expand(len(sources), *v.shape).to(suspect.x.device) for k, v in tensors.items()}
    asr = suspect.success([[r] for r in sources], torch.full((len(sources),), target), family, stacked, cfg.pair)
    return [r for r, a in zip(sources, asr.tolist()) if a >= cfg.expand_sources]
