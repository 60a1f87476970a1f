"""Stage 6b, the reach test: a trigger that moves only a few classes is not a backdoor's.

A backdoor trigger overrides what the image shows: stamped on any class, the network obeys it. An
all-to-one trigger sends every class to its target; an all-to-all trigger sends every class to its own
target (c -> c + 1). Either way it moves most classes off their label. A small trigger between two
look-alike classes (a "1" bent into a "7"; a warp that turns one digit into its neighbours) moves its own
source and perhaps one more class, and nothing else. Source expansion (stage 6) has just measured where
each target's trigger sends every class: its *reach* is its sources and the other classes it moves (the
twin's fit classes). A target whose reach is under ``min_reach`` of the other classes is dropped and
recorded. An all-to-one target with most of its sources passes by its sources alone.

This is the test that keeps single-pair evidence from becoming a target on a clean model. Its price: a
backdoor built to fire on a few source classes only and trained to be ignored on the others (a
source-specific attack) is dropped too; ``--min-reach 0`` turns the test off. docs/method.md#6b-reach-test.
"""
from __future__ import annotations

import logging
import math

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.records import NarrowTrigger, TargetTrigger

log = logging.getLogger(__name__)


def require_reach(triggers: dict[int, TargetTrigger], present: list[int], cfg: DetectionConfig
                  ) -> tuple[dict[int, TargetTrigger], list[NarrowTrigger]]:
    """The targets whose trigger reaches at least ``min_reach`` of the other present classes; the others,
    recorded. Off without source expansion (which measures the reach) or with ``min_reach`` 0."""
    if cfg.expand_sources is None or cfg.min_reach <= 0:
        return triggers, []
    kept: dict[int, TargetTrigger] = {}
    narrow: list[NarrowTrigger] = []
    for t, tr in sorted(triggers.items()):
        others = [c for c in present if c != t]
        reach = sorted(set(tr.sources) | set(tr.fit_classes))
        needed = math.ceil(cfg.min_reach * len(others))
        if len(reach) >= needed:
            kept[t] = tr
            continue
        log.info("target %d: its %s trigger moves only classes %s (%d of %d, needs %d): a natural pair, not a "
                 "backdoor", t, tr.family, reach, len(reach), len(others), needed)
        narrow.append(NarrowTrigger(t, list(tr.sources), reach, needed, tr.family, tr.score))
    return kept, narrow
