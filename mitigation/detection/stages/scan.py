"""Stage 1, the pair scan: a trigger for every ordered (source, target) pair, in each trigger family.

One batched optimisation per family over the pairs (``reverse.reverse_engineer``). Each family is
scored against its own population later: a patch's size (pixels) and a perturbation's (L2) live on
different scales. With many classes (more than ``max_pairs`` ordered pairs) the cost would grow with
K(K-1): only each source's ``pairs_per_source`` most likely targets are scanned, those whose universal
triggers (the target scan) send most of its images there, weighted by how small each trigger is against
its family's median (``smallness``), so the cost grows with K.
docs/method.md#1-target-scan-and-pair-scan.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.reverse import ReverseResult
from bna_gateway.mitigation.detection.stages.targets import TargetScan, reach_of
from bna_gateway.mitigation.detection.statistic import all_pairs
from bna_gateway.mitigation.detection.suspect import Suspect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairScan:
    """One family's kept trigger for every pair of ``pairs`` (``result`` is aligned with it)."""

    pairs: list[tuple[int, int]]
    result: ReverseResult
    complete: bool = True  # every ordered pair was scanned

    @property
    def family(self) -> str:
        return self.result.family.name


def pairs_to_scan(suspect: Suspect, universal: dict[str, TargetScan], cfg: DetectionConfig
                  ) -> tuple[list[tuple[int, int]], bool]:
    """Every ordered pair, or (beyond ``max_pairs``) each source's most likely targets; complete or not."""
    pairs = all_pairs(suspect.num_classes)
    if len(pairs) <= cfg.max_pairs or not universal:
        return pairs, True
    k = suspect.num_classes
    # [source, target]: how much of the source the target's universal trigger sends there, times how small
    # that trigger is against its family's median (a universal trigger of the usual size for K classes is
    # large enough to send nearly everything anywhere; a backdoor's is the small one)
    likely = torch.zeros(k, k)
    for scan in universal.values():
        odds = reach_of(suspect, scan, cfg).T * smallness(scan.result.size)
        likely[:, scan.targets] = torch.maximum(likely[:, scan.targets], odds)
    likely.fill_diagonal_(-1.0)
    top = likely.topk(min(cfg.pairs_per_source, k - 1), dim=1).indices
    chosen = sorted({(s, int(t)) for s in range(k) for t in top[s].tolist()})
    log.info("%d classes: scanning %d of %d pairs (each source's %d most likely targets)", k, len(chosen),
             len(pairs), cfg.pairs_per_source)
    return chosen, False


def smallness(size: torch.Tensor) -> torch.Tensor:
    """[T] the family's median universal-trigger size over each one's size (1 at the median; 0 where none
    was found)."""
    size = size.double()
    found = torch.isfinite(size) & (size > 0)
    out = torch.zeros(len(size), dtype=torch.double)
    if bool(found.any()):
        out[found] = size[found].median() / size[found]
    return out.float()


def scan_pairs(suspect: Suspect, cfg: DetectionConfig, universal: dict[str, TargetScan] | None = None
               ) -> tuple[dict[str, PairScan], dict[str, float]]:
    """Every family's pair scan, and the seconds each took (``pairs_<family>``)."""
    pairs, complete = pairs_to_scan(suspect, universal or {}, cfg)
    groups, targets = [[s] for s, _ in pairs], [t for _, t in pairs]
    scans: dict[str, PairScan] = {}
    timings: dict[str, float] = {}
    for fam in cfg.families:
        start = time.perf_counter()
        result = suspect.reverse(groups, targets, fam, cfg.pair_for(fam), desc=f"pairs/{fam.name}")
        timings[f"pairs_{fam.name}"] = time.perf_counter() - start
        scans[fam.name] = PairScan(pairs, result, complete)
        log.info("%s: %d pairs in %.1f s", fam.name, len(pairs), timings[f"pairs_{fam.name}"])
    return scans, timings
