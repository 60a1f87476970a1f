"""``detect_backdoor``: the detection stages, in the one order they run, and why that order.

1. ``scan_targets``: one universal trigger per target and family, from all its sources (K groups).
   ``choose_pairs``: every ordered pair, or with many classes each source's likeliest targets (from the
   universal triggers' reach and smallness). ``scan_pairs``: a trigger for each chosen pair in each
   family (K(K-1) groups, a shorter budget).
2. ``transfer_triggers``: tighten each pair's trigger size with any trigger that works there: the
   universal ones, then the flagged pairs'. Before scoring, because a pair's own optimisation can miss
   a backdoor that another trigger shows.
3. ``score_pairs`` and ``score_targets``: MAD per family at the pair level, and each target's column of
   pair scores against the other targets'. Needs the tightened sizes, so after transfer.
4. ``select_candidates``: targets with a flagged pair or an anomalous column, in which family, from
   which sources. Needs both scores.
5. ``estimate_targets``: re-estimate each candidate's trigger jointly; the all-to-all / universality
   test. Needs the candidates' sources.
6. ``expand_sources``: the estimate stamped on every class adds sources and reveals missed targets.
   Needs a good (joint, solid) estimate, so after stage 5. ``require_reach``: a target whose trigger
   moves only a few classes (sources and classes sent elsewhere) is a natural pair, dropped. Needs where
   each trigger sends every class, which stage 6 measures; before the re-fits, which it spares.
   ``require_memory``: a target with inconclusive evidence is kept only when the BatchNorm running
   statistics remember its trigger (a trained backdoor, not a natural universal perturbation). Needs
   the final candidates' estimates and their evidence; before the re-fits, which it spares.
7. ``refit_on_domain``: triggers that move other classes are re-fitted on their whole domain. Needs the
   fit classes that stage 6 finds.
8. ``share_patches``: patch targets whose stamps fire each other's sources get their union. Last,
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
from bna_gateway.mitigation.detection.records import (DetectionResult, Elimination, MemoryCheck, NarrowTrigger,
                                                      PairRecord)
from bna_gateway.mitigation.detection.reverse import reverse_engineer
from bna_gateway.mitigation.detection.stages.domain import refit_on_domain
from bna_gateway.mitigation.detection.stages.estimate import estimate_targets
from bna_gateway.mitigation.detection.stages.expand import expand_sources
from bna_gateway.mitigation.detection.stages.memory import require_memory
from bna_gateway.mitigation.detection.stages.reach import require_reach
from bna_gateway.mitigation.detection.stages.scan import choose_pairs, scan_pairs
from bna_gateway.mitigation.detection.stages.score import score_pairs, score_targets
from bna_gateway.mitigation.detection.stages.select import select_candidates
from bna_gateway.mitigation.detection.stages.share import share_patches
from bna_gateway.mitigation.detection.stages.targets import scan_targets
from bna_gateway.mitigation.detection.stages.transfer import transfer_triggers
from bna_gateway.mitigation.detection.statistic import resolve_statistic
from bna_gateway.mitigation.detection.suspect import Optimiser, Suspect

log = logging.getLogger(__name__)


def detect_backdoor(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                    cfg: DetectionConfig | None = None, optimiser: Optimiser = reverse_engineer) -> DetectionResult:
    """Detect a backdoor in ``model`` from the defender's clean set ``(x, y)`` (images in [0, 1], on the
    model's device). ``optimiser`` is the batched trigger optimiser every stage runs."""
    cfg = (cfg or DetectionConfig()).for_device(x.device)
    suspect = Suspect(model, x, y, num_classes, optimiser)
    start = time.perf_counter()
    universal, timings = scan_targets(suspect, cfg)
    choice = choose_pairs(suspect, universal, cfg)
    if not choice.complete:
        timings["screen"] = choice.seconds
    scans, pair_timings = scan_pairs(suspect, cfg, choice)
    timings.update(pair_timings)
    t = time.perf_counter()
    scans, transferred = transfer_triggers(suspect, scans, choice.universal, cfg)
    if cfg.transfer_success is not None:
        timings["transfer"] = time.perf_counter() - t
    records = score_pairs(scans, num_classes, cfg)
    evidence = score_targets(scans, universal, num_classes, cfg)
    t = time.perf_counter()
    candidates = select_candidates(records, evidence, suspect.present, cfg)
    triggers, eliminated = estimate_targets(suspect, candidates, cfg)
    triggers, added = expand_sources(suspect, triggers, cfg)
    triggers, narrow = require_reach(triggers, suspect.present, cfg)
    triggers, memory = require_memory(suspect, triggers, evidence, cfg)
    triggers, refitted = refit_on_domain(suspect, triggers, cfg)
    triggers = share_patches(suspect, triggers, cfg)
    timings["reestimate"] = time.perf_counter() - t
    return DetectionResult(_unflag(records, eliminated, narrow, memory), cfg.threshold, cfg.trigger_type, triggers,
                           time.perf_counter() - start, timings, eliminated, added,
                           resolve_statistic(cfg.statistic, num_classes), transferred, refitted,
                           evidence, cfg.target_threshold, narrow, memory, cfg.precision)


def _unflag(records: list[PairRecord], eliminated: list[Elimination], narrow: list[NarrowTrigger],
            memory: list[MemoryCheck]) -> list[PairRecord]:
    """The pair records with the pairs the all-to-all, reach and memory tests dropped no longer flagged."""
    dropped = {(e.source, e.target) for e in eliminated} | {(s, n.target) for n in narrow for s in n.sources}
    dropped |= {(s, m.target) for m in memory if not m.kept for s in m.sources}
    return [replace(r, flagged=False) if (r.source, r.target) in dropped else r for r in records]
