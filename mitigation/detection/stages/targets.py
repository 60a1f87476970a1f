"""Stage 1, the target scan: one universal trigger per target class, from all its candidate sources at once.

Neural Cleanse's question, in each trigger family: how small a trigger sends *every* other class to t?
An all-to-one backdoor's trigger does, so its target's universal trigger is about as small as its
pairs' triggers; a class that is merely easy to reach needs a different change for each source, and
its universal trigger is far larger than its pairs'. K groups instead of K(K-1), so it scales with the
number of classes. The universal triggers serve twice: as evidence at the level where an all-to-one
attack acts (stage 3), and as donors that tighten the pairs they work on (stage 2).
docs/method.md#1-target-scan-and-pair-scan.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.reverse import ReverseResult
from bna_gateway.mitigation.detection.statistic import all_pairs
from bna_gateway.mitigation.detection.suspect import Suspect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetScan:
    """One family's universal trigger for each target (``result`` aligned with ``targets``)."""

    targets: list[int]
    sources: list[list[int]]
    result: ReverseResult
    # [T, K]: the fraction of each class's screen images that target t's universal trigger sends to t
    # (``universal_reach``); None where no later stage needs it
    reach: torch.Tensor | None = None

    @property
    def family(self) -> str:
        return self.result.family.name

    def size_of(self) -> dict[int, float]:
        return {t: float(s) for t, s in zip(self.targets, self.result.size.tolist())}


def scan_targets(suspect: Suspect, cfg: DetectionConfig) -> tuple[dict[str, TargetScan], dict[str, float]]:
    """Every family's target scan with its reach screen, and the seconds each took (``targets_<family>``,
    ``screen_<family>``). The screen is measured once here for the two stages that read it: the pair
    choice beyond ``max_pairs`` pairs and the transfer from universal triggers."""
    present = suspect.present
    targets = list(range(suspect.num_classes))
    sources = [[c for c in present if c != t] for t in targets]
    screen = cfg.transfer_success is not None or len(all_pairs(suspect.num_classes)) > cfg.max_pairs
    scans: dict[str, TargetScan] = {}
    timings: dict[str, float] = {}
    for fam in cfg.families:
        start = time.perf_counter()
        result = suspect.reverse(sources, targets, fam, cfg.target, desc=f"targets/{fam.name}")
        timings[f"targets_{fam.name}"] = time.perf_counter() - start
        log.info("%s: %d universal triggers in %.1f s", fam.name, len(targets), timings[f"targets_{fam.name}"])
        reach = None
        if screen:
            start = time.perf_counter()
            reach = universal_reach(suspect, result, targets, cfg)
            timings[f"screen_{fam.name}"] = time.perf_counter() - start
        scans[fam.name] = TargetScan(targets, sources, result, reach)
    return scans, timings


def universal_reach(suspect: Suspect, result: ReverseResult, targets: list[int], cfg: DetectionConfig
                    ) -> torch.Tensor:
    """[T, K]: the fraction of each class's screen images (about ``screen_images`` in all, an equal share
    per class, so the cost grows with K) that each target's universal trigger sends to that target."""
    per_class = max(1, cfg.screen_images // suspect.num_classes)
    frac = suspect.fractions(result.family, result.tensors, cfg.pair, per_class=per_class)  # [T, K, K]
    return frac[torch.arange(len(targets)), :, torch.tensor(targets)]


def reach_of(suspect: Suspect, scan: TargetScan, cfg: DetectionConfig) -> torch.Tensor:
    """``scan.reach``, measured now if the scan was made without it."""
    return scan.reach if scan.reach is not None else universal_reach(suspect, scan.result, scan.targets, cfg)
