"""Stage 1, the pair scan: a trigger for every ordered (source, target) pair, in each trigger family.

One batched optimisation per family over the pairs (``reverse.reverse_engineer``). Each family is
scored against its own population later: a patch's size (pixels) and a perturbation's (L2) live on
different scales. With many classes (more than ``max_pairs`` ordered pairs) the cost would grow with
K(K-1): only each source's ``pairs_per_source`` most likely targets are scanned (``choose_pairs``), those
whose universal triggers (the target scan) send most of its images there, weighted by how small each
trigger is against its family's median (``smallness``). That weight bounds a universal trigger's odds
before its reach is measured, so the screen measures the triggers in order of their bound and stops as
soon as no trigger left could enter any source's choice: the same pairs as screening all of them, for
the cost of the few small ones. docs/method.md#1-target-scan-and-pair-scan.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.reverse import ReverseResult
from bna_gateway.mitigation.detection.stages.targets import TargetScan, with_reach_rows
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


@dataclass(frozen=True)
class PairChoice:
    """The pairs the pair scan optimises, and the target scans with the reach the choice measured."""

    pairs: list[tuple[int, int]]
    complete: bool  # every ordered pair
    universal: dict[str, TargetScan]
    screened: int = 0  # universal triggers whose reach was measured
    seconds: float = 0.0


def choose_pairs(suspect: Suspect, universal: dict[str, TargetScan], cfg: DetectionConfig) -> PairChoice:
    """Every ordered pair, or (beyond ``max_pairs``) each source's ``pairs_per_source`` most likely targets.

    A pair's odds are the reach of the target's universal trigger on the source (the fraction of its screen
    images sent there) times the trigger's ``smallness``, the largest over the families. Reach is at most 1,
    so a trigger's smallness bounds its odds: triggers are measured in rounds of ``screen_batch``, the
    largest bound first, until every source's ``pairs_per_source``-th best odds is at least the bound of
    every trigger not measured; those could not enter any source's choice."""
    pairs = all_pairs(suspect.num_classes)
    if len(pairs) <= cfg.max_pairs or not universal:
        return PairChoice(pairs, True, universal)
    start = time.perf_counter()
    k = suspect.num_classes
    want = min(cfg.pairs_per_source, k - 1)
    small = {name: smallness(scan.result.size) for name, scan in universal.items()}
    order = sorted(((float(b), name, r) for name, s in small.items() for r, b in enumerate(s.tolist()) if b > 0),
                   key=lambda e: -e[0])
    likely = torch.zeros(k, k)
    likely.fill_diagonal_(float("-inf"))
    scans = dict(universal)
    screened, pos = 0, 0
    while pos < len(order):
        if bool((likely.topk(want, dim=1).values[:, -1] >= order[pos][0]).all()):
            break
        batch, pos = order[pos : pos + cfg.screen_batch], pos + cfg.screen_batch
        for name in dict.fromkeys(name for _, name, _ in batch):
            rows = [r for _, n, r in batch if n == name]
            screened += int(scans[name].known_reach(k)[rows].isnan().any(dim=1).sum())
            scans[name] = with_reach_rows(suspect, scans[name], rows, cfg)
            odds = scans[name].reach[rows].T * small[name][rows]  # [K, rows]
            cols = torch.tensor([scans[name].targets[r] for r in rows])
            likely[:, cols] = torch.maximum(likely[:, cols], odds)
            likely.fill_diagonal_(float("-inf"))  # a class is no target of its own
    top = likely.topk(want, dim=1).indices
    chosen = sorted({(s, int(t)) for s in range(k) for t in top[s].tolist()})
    seconds = time.perf_counter() - start
    log.info("%d classes: scanning %d of %d pairs (each source's %d most likely targets); reach of %d of %d "
             "universal triggers measured in %.1f s", k, len(chosen), len(pairs), want, screened, len(order), seconds)
    return PairChoice(chosen, False, scans, screened, seconds)


def smallness(size: torch.Tensor) -> torch.Tensor:
    """[T] the family's median universal-trigger size over each one's size (1 at the median; 0 where none
    was found)."""
    size = size.double()
    found = torch.isfinite(size) & (size > 0)
    out = torch.zeros(len(size), dtype=torch.double)
    if bool(found.any()):
        out[found] = size[found].median() / size[found]
    return out.float()


def scan_pairs(suspect: Suspect, cfg: DetectionConfig, choice: PairChoice) -> tuple[dict[str, PairScan], dict[str, float]]:
    """Every family's scan of the chosen pairs, and the seconds each took (``pairs_<family>``)."""
    groups, targets = [[s] for s, _ in choice.pairs], [t for _, t in choice.pairs]
    scans: dict[str, PairScan] = {}
    timings: dict[str, float] = {}
    for fam in cfg.families:
        start = time.perf_counter()
        result = suspect.reverse(groups, targets, fam, cfg.pair_for(fam), desc=f"pairs/{fam.name}")
        timings[f"pairs_{fam.name}"] = time.perf_counter() - start
        scans[fam.name] = PairScan(choice.pairs, result, choice.complete)
        log.info("%s: %d pairs in %.1f s", fam.name, len(choice.pairs), timings[f"pairs_{fam.name}"])
    return scans, timings
