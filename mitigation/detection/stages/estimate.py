"""Stage 5, per-target estimates: each candidate target's trigger re-estimated jointly on its sources.

- The joint estimate, and the smallest pair alone, in one batched run (the paper's all-to-all test):
  when the joint trigger is more than ``joint_ratio`` times larger, the sources do not share one
  trigger; only the smallest pair is kept, with the sources on which its own trigger also works.
- A target found by its column alone (no flagged pair) must pass that test as a *universality test*:
  an all-to-one backdoor's one trigger works for most sources, a naturally easy target needs a
  different change for each. It is kept only when the trigger kept works for at least
  ``universal_sources`` of its sources; otherwise it is dropped (recorded as eliminated).
- A patch estimate becomes a solid stamp when that is no weaker (``binarise_fraction``).
- A target anomalous in another family too is re-estimated there as well, with the same test; the
  family in which one trigger explains the most sources becomes the target's (a blended trigger first
  seen as a few small patches is one perturbation), and its twin is fitted on every estimate made on
  those same sources (which family describes the real trigger is unknown: a sinusoid is also fired by a
  small patch).
docs/method.md#5-per-target-estimates.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace

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
    joint = [Job(c.target, c.sources, family(f)) for c in candidates for f in _families(c)]
    alone = [Job(c.target, [s], family(f)) for c in candidates for f, s in _smallest(c).items()]
    found = reestimate(suspect, joint + alone, rev)
    estimates = {(j.target, j.family.name): e for j, e in zip(joint, found[: len(joint)])}
    singles = {(j.target, j.family.name): e for j, e in zip(alone, found[len(joint):])}
    triggers: dict[int, TargetTrigger] = {}
    eliminated: list[Elimination] = []
    for c in candidates:
        tests = {f: _all_to_all_test(suspect, c, f, s, estimates[(c.target, f)], singles[(c.target, f)], cfg)
                 for f, s in _smallest(c).items()}
        if c.family not in tests:  # a single source: nothing to test
            tests[c.family] = (c.sources, estimates[(c.target, c.family)], [])
        # the family in which one trigger explains the most sources (the candidate's own on a tie): a blended
        # trigger scored in the patch family may need a different patch per source, and one perturbation
        best = max([c.family, *(f for f in c.other_families if f in tests)], key=lambda f: len(tests[f][0]))
        sources, est, dropped = tests[best]
        if best != c.family:
            log.info("target %d: one %s trigger serves %d sources, one %s trigger %d: estimated as a %s", c.target,
                     best, len(sources), c.family, len(tests[c.family][0]), best)
        if c.by_column and len(sources) < math.ceil(cfg.universal_sources * len(c.sources)):
            log.info("target %d (found by its column, score %.2f): no one trigger works for most of its sources "
                     "(%d of %d): not a target", c.target, c.score, len(sources), len(c.sources))
            single = singles.get((c.target, best))
            eliminated += [Elimination(s, c.target, est.size, single.size if single else est.size) for s in sources]
            continue
        eliminated += dropped
        chosen = replace(c, family=best, other_families=sorted(f for f in _families(c) if f != best))
        trigger = _target_trigger(suspect, chosen, sources, est, cfg)
        for f in chosen.other_families:  # every other family's estimate, where it fits the same (all) sources
            kept_there = tests[f][0] if f in tests else c.sources  # untested: a single source, kept
            if sources != c.sources or kept_there != c.sources:
                continue
            tensors, asr = estimates[(c.target, f)].tensors, estimates[(c.target, f)].asr
            if f == PATCH.name:
                tensors, asr = binarise(suspect, sources, c.target, tensors, cfg, rev)
            trigger = trigger.with_(alternatives={**trigger.alternatives, f: tensors})
            log.info("target %d is anomalous in the %s family too: its twin is fitted on that estimate as well "
                     "(success %.2f)", c.target, f, asr)
        triggers[c.target] = trigger
    return triggers, eliminated


def _families(c: Candidate) -> list[str]:
    """The candidate's family first, then the other families it is anomalous in."""
    return [c.family, *c.other_families]


def _smallest(c: Candidate) -> dict[str, int]:
    """Each family's smallest single pair, estimated alone for the all-to-all test (the candidate's own first)."""
    own = {c.family: c.smallest} if c.smallest is not None else {}
    return {**own, **{f: s for f, s in c.smallest_in.items() if f in c.other_families}}


def _all_to_all_test(suspect: Suspect, c: Candidate, fam: str, smallest: int, joint: Estimate, alone: Estimate,
                     cfg: DetectionConfig) -> tuple[list[int], Estimate, list[Elimination]]:
    """Keep the joint estimate, or (joint far larger than the smallest pair's alone) only the smallest pair
    with the sources its trigger also fires; the sources kept, the estimate, and the pairs dropped."""
    if not joint.size > cfg.joint_ratio * alone.size:
        return c.sources, joint, []
    rest = [r for r in c.sources if r != smallest]
    if fam == PATCH.name:  # the stamped patch that would be served
        alone = Estimate(binarise(suspect, [smallest], c.target, alone.tensors, cfg, cfg.reestimate())[0],
                         alone.size, alone.asr)
    shared = sources_sharing(suspect, c.target, family(fam), alone.tensors, rest, cfg)
    dropped = [Elimination(r, c.target, joint.size, alone.size) for r in rest if r not in shared]
    kept = sorted([smallest, *shared])
    log.info("target %d (%s): joint trigger %.2f > %.1f x %.2f (source %d alone): keeping sources %s",
             c.target, fam, joint.size, cfg.joint_ratio, alone.size, smallest, kept)
    return kept, alone, dropped


def _target_trigger(suspect: Suspect, c: Candidate, sources: list[int], est: Estimate,
                    cfg: DetectionConfig) -> TargetTrigger:
    tensors, size, asr = est.tensors, est.size, est.asr
    if c.family == PATCH.name:
        tensors, asr = binarise(suspect, sources, c.target, tensors, cfg, cfg.reestimate())
        size = float(tensors["mask"].sum())
    return TargetTrigger(c.target, sources, c.family, tensors, float(asr), float(size), c.score)
