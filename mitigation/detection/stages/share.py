"""Stage 8, shared stamps: patch targets whose stamps also fire each other's sources share one stamp.

An all-to-all backdoor's targets share one stamp, and each estimate holds a different few of its
pixels (a minimal trigger is the weakest version of the real one); together they hold most of them.
Each such target gets the union of those stamps (mask: the maximum; pattern: the mask-weighted mean)
as its ``shared`` alternative, and its twin is fitted on it too. docs/method.md#8-shared-stamps.
"""
from __future__ import annotations

import logging

import torch

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.records import TargetTrigger
from bna_gateway.mitigation.detection.suspect import Suspect
from bna_gateway.mitigation.triggers import PATCH

log = logging.getLogger(__name__)


def share_patches(suspect: Suspect, triggers: dict[int, TargetTrigger], cfg: DetectionConfig) -> dict[int, TargetTrigger]:
    """The targets, each patch target whose sources other targets' stamps fire given their union."""
    group = [(t, tr) for t, tr in sorted(triggers.items()) if tr.family == PATCH.name]
    if not cfg.shared_patch or cfg.expand_sources is None or len(group) < 2:
        return triggers
    masks = torch.stack([tr.tensors["mask"] for _, tr in group]).to(suspect.x.device)
    patterns = torch.stack([tr.tensors["pattern"] for _, tr in group]).to(suspect.x.device)
    frac = suspect.fractions(PATCH, {"mask": masks, "pattern": patterns}, cfg.pair)  # [T, K, K]
    masks, patterns = masks.cpu(), patterns.cpu()
    out = dict(triggers)
    for d, (t, tr) in enumerate(group):
        works = frac[:, tr.sources, t].mean(dim=1) >= cfg.expand_sources  # [T]: which stamps fire S(t) -> t
        works[d] = True
        others = [u for (u, _), w in zip(group, works.tolist()) if w and u != t]
        if not others:
            continue
        m, p = masks[works], patterns[works]
        mask = m.amax(dim=0)
        pattern = (m * p).sum(dim=0) / m.sum(dim=0).clamp(min=1e-6)
        pattern = torch.where(mask > 0, pattern, tr.tensors["pattern"])
        out[t] = tr.with_(alternatives={**tr.alternatives, "shared": {"mask": mask, "pattern": pattern}},
                          shared_with=others)
        log.info("target %d: the stamps of targets %s also send its sources to it: its twin is fitted on their "
                 "union too (%d pixels, its own %d)", t, others, int((mask > 0).sum()), int((tr.tensors["mask"] > 0).sum()))
    return out
