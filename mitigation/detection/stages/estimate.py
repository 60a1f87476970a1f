"""Stage 5, per-target estimates: each candidate target's trigger re-estimated jointly on its sources.

- The joint estimate, and the smallest pair alone, in one batched run (the paper's all-to-all test):
  when the joint trigger is more than ``joint_ratio`` times larger, the sources do not share one
  trigger; only the smallest pair is kept, with the sources on which its own trigger also works.
- A target found by its column alone (no flagged pair) must pass that test as a *universality test*:
  an all-to-one backdoor's one trigger works for most sources, a naturally easy target needs a
  different change for each. It is kept only when the trigger kept works for at least
  ``universal_sources`` of its sources; otherwise it is dropped (recorded as eliminated).
- A patch estimate becomes a solid stamp when that is no weaker (``binarise_fraction``).
- A target anomalous in another family too is re-estimated there as well, and its twin is fitted on
  every estimate (which family describes the real trigger is unknown: a sinusoid is also fired by a
  small patch).
docs/method.md#5-per-target-estimates.
"""
from __future__ import annotations

import logging
import math

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.records import Elimination, TargetTrigger
from bna_gateway.mitigation.detection.stages.common import Estimate, Job, binarise, reestimate, sources_sharing
from bna_gateway.mitigation.detection.stages.select import Candidate
from bna_gateway.mitigation.detection.suspect import Suspect
from bna_gateway.mitigation.triggers import PATCH, family

log = logging.getLogger(__name__)


def estimate_targets(suspect: Suspect, candidates: list[Candidate], cfg: DetectionConfig
                     ) -> tuple[dict[int, TargetTrigger], list[Elimination]]:
    """The detected targets with their sources and trigger estimates; the pairs (and column-only
    targets) the all-to-all test dropped."""
    if not candidates:
        return {}, []
    rev = cfg.reestimate()
    joint = [Job(c.target, c.sources, family(c.family)) for c in candidates]
    alone = [Job(c.target, [c.smallest], family(c.family)) for c in candidates if c.smallest is not None]
    others = [Job(c.target, c.sources, family(f)) for c in candidates for f in c.other_families]
    found = reestimate(suspect, joint + alone + others, rev)
    estimates = dict(zip((c.target for c in candidates), found[: len(joint)]))
    singles = dict(zip((j.target for j in alone), found[len(joint): len(joint) + len(alone)]))
    sources = {c.target: c.sources for c in candidates}
    eliminated: list[Elimination] = []
    for c in candidates:
        if c.target in singles:
            kept, est, dropped = _all_to_all_test(suspect, c, estimates[c.target], singles[c.target], cfg)
            sources[c.target], estimates[c.target] = kept, est
            eliminated += dropped
    triggers = {}
    for c in candidates:
        if c.by_column and len(sources[c.target]) < math.ceil(cfg.universal_sources * len(c.sources)):
            log.info("target %d (found by its column, score %.2f): no one trigger works for most of its sources "
                     "(%d of %d): not a target", c.target, c.score, len(sources[c.target]), len(c.sources))
            eliminated += [Elimination(s, c.target, estimates[c.target].size, singles[c.target].size)
                           for s in sources[c.target]]
            continue
        triggers[c.target] = _target_trigger(suspect, c, sources[c.target], estimates[c.target], cfg)
    for job, est in zip(others, found[len(joint) + len(alone):]):
        if job.target not in triggers or job.sources != sources[job.target]:  # sources changed: no longer fits
            continue
        tensors, asr = est.tensors, est.asr
        if job.family is PATCH:
            tensors, asr = binarise(suspect, job.sources, job.target, tensors, cfg, rev)
        tr = triggers[job.target]
        triggers[job.target] = tr.with_(alternatives={**tr.alternatives, job.family.name: tensors})
        log.info("target %d is anomalous in the %s family too: its twin is fitted on that estimate as well "
                 "(success %.2f)", job.target, job.family.name, asr)
    return triggers, eliminated


def _all_to_all_test(suspect: Suspect, c: Candidate, joint: Estimate, alone: Estimate, cfg: DetectionConfig
                     ) -> tuple[list[int], Estimate, list[Elimination]]:
    """Keep the joint estimate, or (joint far larger than the smallest pair's alone) only the smallest pair
    with the sources its trigger also fires; the sources kept, the estimate, and the pairs dropped."""
    if not joint.size > cfg.joint_ratio * alone.size:
        return c.sources, joint, []
    assert c.smallest is not None
    rest = [r for r in c.sources if r != c.smallest]
    if c.family == PATCH.name:  # the stamped patch that would be served
        alone = Estimate(binarise(suspect, [c.smallest], c.target, alone.tensors, cfg, cfg.reestimate())[0],
                         alone.size, alone.asr)
    shared = sources_sharing(suspect, c.target, family(c.family), alone.tensors, rest, cfg)
    dropped = [Elimination(r, c.target, joint.size, alone.size) for r in rest if r not in shared]
    kept = sorted([c.smallest, *shared])
    log.info("target %d: joint trigger %.2f > %.1f x %.2f (source %d alone): keeping sources %s",
             c.target, joint.size, cfg.joint_ratio, alone.size, c.smallest, kept)
    return kept, alone, dropped


def _target_trigger(suspect: Suspect, c: Candidate, sources: list[int], est: Estimate,
                    cfg: DetectionConfig) -> TargetTrigger:
    tensors, size, asr = est.tensors, est.size, est.asr
    if c.family == PATCH.name:
        tensors, asr = binarise(suspect, sources, c.target, tensors, cfg, cfg.reestimate())
        size = float(tensors["mask"].sum())
    return TargetTrigger(c.target, sources, c.family, tensors, float(asr), float(size), c.score)
