"""``detect_backdoor``: the detection stages, in the one order they run, and why that order.

1. ``scan_pairs``: a trigger for every ordered pair in each family (the expensive, batched stage).
2. ``transfer_triggers``: tighten each pair's trigger size with the flagged pairs' triggers. Before
   scoring, because a pair's own optimisation can miss a backdoor that another pair's trigger shows.
3. ``score_pairs``: statistic + MAD per family; each pair judged in its most anomalous family.
4. ``estimate_targets``: re-estimate each target's trigger on all its flagged sources; the all-to-all
   false-pair test. Needs the flagged pairs, so after scoring.
5. ``expand_sources``: the estimate stamped on every class adds sources and reveals missed targets.
   Needs a good (joint, solid) estimate, so after stage 4.
6. ``refit_on_domain``: triggers that move other classes are re-fitted on their whole domain. Needs the
   fit classes that stage 5 finds.
7. ``share_patches``: patch targets whose stamps fire each other's sources get their union. Last,
   because it needs every target's final stamp.
Each stage takes its inputs and returns new values; none edits another's. docs/method.md#detection.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch
from torch import nn

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.records import DetectionResult, Elimination, PairRecord
from bna_gateway.mitigation.detection.reverse import reverse_engineer
from bna_gateway.mitigation.detection.stages.domain import refit_on_domain
from bna_gateway.mitigation.detection.stages.estimate import estimate_targets
from bna_gateway.mitigation.detection.stages.expand import expand_sources
from bna_gateway.mitigation.detection.stages.scan import scan_pairs
from bna_gateway.mitigation.detection.stages.score import score_pairs
from bna_gateway.mitigation.detection.stages.share import share_patches
from bna_gateway.mitigation.detection.stages.transfer import transfer_triggers
from bna_gateway.mitigation.detection.statistic import resolve_statistic
from bna_gateway.mitigation.detection.suspect import Optimiser, Suspect

log = logging.getLogger(__name__)


def detect_backdoor(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                    cfg: DetectionConfig | None = None, optimiser: Optimiser = reverse_engineer) -> DetectionResult:
    """Detect a backdoor in ``model`` from the defender's clean set ``(x, y)`` (images in [0, 1], on the
    model's device). ``optimiser`` is the batched trigger optimiser every stage runs."""
    cfg = cfg or DetectionConfig()
    suspect = Suspect(model, x, y, num_classes, optimiser)
    start = time.perf_counter()
    scans, timings = scan_pairs(suspect, cfg)
    t = time.perf_counter()
    scans, transferred = transfer_triggers(suspect, scans, cfg)
    if cfg.transfer_success is not None:
        timings["transfer"] = time.perf_counter() - t
    records = score_pairs(scans, num_classes, cfg)
    t = time.perf_counter()
    triggers, eliminated = estimate_targets(suspect, records, cfg)
    triggers, added = expand_sources(suspect, triggers, cfg)
    triggers, refitted = refit_on_domain(suspect, triggers, cfg)
    triggers = share_patches(suspect, triggers, cfg)
    timings["reestimate"] = time.perf_counter() - t
    return DetectionResult(_unflag(records, eliminated), cfg.threshold, cfg.trigger_type, triggers,
                           time.perf_counter() - start, timings, eliminated, added,
                           resolve_statistic(cfg.statistic, num_classes), transferred, refitted)


def _unflag(records: list[PairRecord], eliminated: list[Elimination]) -> list[PairRecord]:
    """The pair records with the pairs the all-to-all test eliminated no longer flagged."""
    dropped = {(e.source, e.target) for e in eliminated}
    return [replace(r, flagged=False) if (r.source, r.target) in dropped else r for r in records]
