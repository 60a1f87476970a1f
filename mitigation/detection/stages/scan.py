"""Stage 1, the pair scan: a trigger for every ordered (source, target) pair, in each trigger family.

One batched optimisation per family over all K (K - 1) pairs (``reverse.reverse_engineer``). Each
family is scored against its own population later: a patch's size (pixels) and a perturbation's
(L2) live on different scales. docs/method.md#1-pair-scan.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.reverse import ReverseResult
from bna_gateway.mitigation.detection.statistic import all_pairs
from bna_gateway.mitigation.detection.suspect import Suspect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairScan:
    """One family's kept trigger for every pair of ``pairs`` (``result`` is aligned with it)."""

    pairs: list[tuple[int, int]]
    result: ReverseResult

    @property
    def family(self) -> str:
        return self.result.family.name


def scan_pairs(suspect: Suspect, cfg: DetectionConfig) -> tuple[dict[str, PairScan], dict[str, float]]:
    """Every family's pair scan, and the seconds each took (``pairs_<family>``)."""
    pairs = all_pairs(suspect.num_classes)
    groups, targets = [[s] for s, _ in pairs], [t for _, t in pairs]
    scans: dict[str, PairScan] = {}
    timings: dict[str, float] = {}
    for fam in cfg.families:
        start = time.perf_counter()
        result = suspect.reverse(groups, targets, fam, cfg.pair, desc=f"pairs/{fam.name}")
        timings[f"pairs_{fam.name}"] = time.perf_counter() - start
        scans[fam.name] = PairScan(pairs, result)
        log.info("%s: %d pairs in %.1f s", fam.name, len(pairs), timings[f"pairs_{fam.name}"])
    return scans, timings
