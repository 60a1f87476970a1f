"""Stage 1, the target scan: one universal trigger per target class, from all its candidate sources at once.

Neural Cleanse's question, in each trigger family: how small a trigger sends *every* other class to t?
An all-to-one backdoor's trigger does, so its target's universal trigger is about as small as its
pairs' triggers; a class that is merely easy to reach needs a different change for each source, and
its universal trigger is far larger than its pairs'. K groups instead of K(K-1), so it scales with the
number of classes. The universal triggers serve twice: as evidence at the level where an all-to-one
attack acts (stage 3), and as donors that tighten the pairs they work on (stage 2).

Where a universal trigger sends each class (its *reach*) is measured on demand, entry by entry or row by
row, by the stages that read it (the many-class pair choice, the transfer): ``TargetScan.reach`` holds
what has been measured so far (NaN elsewhere). docs/method.md#1-target-scan-and-pair-scan.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.reverse import ReverseResult, group_pools, success_rate
from bna_gateway.mitigation.detection.suspect import Suspect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetScan:
    """One family's universal trigger for each target (``result`` aligned with ``targets``)."""

    targets: list[int]
    sources: list[list[int]]
    result: ReverseResult
    # [T, K]: the fraction of each class's screen images that target t's universal trigger sends to t, NaN
    # where it has not been measured; None: nothing measured yet
    reach: torch.Tensor | None = None

    @property
    def family(self) -> str:
        return self.result.family.name

    def size_of(self) -> dict[int, float]:
        return {t: float(s) for t, s in zip(self.targets, self.result.size.tolist())}

    def known_reach(self, num_classes: int) -> torch.Tensor:
        """[T, K] the reach measured so far (NaN where not)."""
        if self.reach is not None:
            return self.reach.clone()
        return torch.full((len(self.targets), num_classes), float("nan"))


def scan_targets(suspect: Suspect, cfg: DetectionConfig) -> tuple[dict[str, TargetScan], dict[str, float]]:
    """Every family's target scan, and the seconds each took (``targets_<family>``)."""
    present = suspect.present
    targets = list(range(suspect.num_classes))
    sources = [[c for c in present if c != t] for t in targets]
    rc = cfg.target_for(suspect.num_classes)
    scans: dict[str, TargetScan] = {}
    timings: dict[str, float] = {}
    for fam in cfg.families:
        start = time.perf_counter()
        result = suspect.reverse(sources, targets, fam, rc, desc=f"targets/{fam.name}")
        timings[f"targets_{fam.name}"] = time.perf_counter() - start
        log.info("%s: %d universal triggers in %.1f s", fam.name, len(targets), timings[f"targets_{fam.name}"])
        scans[fam.name] = TargetScan(targets, sources, result)
    return scans, timings


def screen_per_class(suspect: Suspect, cfg: DetectionConfig) -> int:
    """Screen images per class: an equal share of about ``screen_images`` (so a row costs the same at any K)."""
    return max(1, cfg.screen_images // suspect.num_classes)


def with_reach_rows(suspect: Suspect, scan: TargetScan, rows: list[int], cfg: DetectionConfig) -> TargetScan:
    """``scan`` with the whole reach of the universal triggers ``rows`` measured (rows already measured in
    full are not measured again): where each one sends each class's first ``screen_per_class`` images."""
    reach = scan.known_reach(suspect.num_classes)
    rows = [r for r in rows if bool(reach[r].isnan().any())]
    if not rows:
        return replace(scan, reach=reach)
    tensors = {n: v[rows] for n, v in scan.result.tensors.items()}
    frac = suspect.fractions(scan.result.family, tensors, cfg.pair, per_class=screen_per_class(suspect, cfg))
    reach[rows] = frac[torch.arange(len(rows)), :, torch.tensor([scan.targets[r] for r in rows])]
    return replace(scan, reach=reach)


def with_reach_entries(suspect: Suspect, scan: TargetScan, need: torch.Tensor, cfg: DetectionConfig) -> TargetScan:
    """``scan`` with the reach measured at every entry of ``need`` ([T, K] bool) not measured yet: universal
    trigger r stamped on class s's first ``screen_per_class`` images, all entries in one batched pass."""
    reach = scan.known_reach(suspect.num_classes)
    rows, cls = (need & reach.isnan()).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return replace(scan, reach=reach)
    xs, ys = suspect.subsample(screen_per_class(suspect, cfg))
    pools = group_pools(ys.cpu(), [[int(c)] for c in cls])
    tensors = {n: v[rows] for n, v in scan.result.tensors.items()}
    targets = torch.tensor(scan.targets)[rows]
    reach[rows, cls] = success_rate(suspect.model, xs, pools, targets, scan.result.family, tensors, cfg.pair).cpu()
    return replace(scan, reach=reach)
