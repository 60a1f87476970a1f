"""Stage 4, per-target estimates: each target's trigger re-estimated jointly on all its flagged sources.

- The target's family is the one in which its flagged pairs are most anomalous (summed scores).
- All-to-all false pairs (the paper's test): a target with several sources also has its smallest pair
  re-estimated alone, in the same batched run and with the same settings. When the joint trigger is
  more than ``joint_ratio`` times larger, the sources do not share one trigger: only the smallest pair
  is kept, with the sources on which its own trigger also works.
- A patch estimate becomes a solid stamp when that is no weaker (``binarise_fraction``).
- A target whose pairs are anomalous in another family too is re-estimated there as well (in a run of
  its own), and its twin is fitted on both estimates.
docs/method.md#4-per-target-estimates.
"""
from __future__ import annotations

import logging

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.records import Elimination, PairRecord, TargetTrigger
from bna_gateway.mitigation.detection.stages.common import Estimate, Job, binarise, reestimate, sources_sharing
from bna_gateway.mitigation.detection.suspect import Suspect
from bna_gateway.mitigation.triggers import PATCH, family

log = logging.getLogger(__name__)


def flagged_by_target(records: list[PairRecord]) -> dict[int, list[PairRecord]]:
    """The flagged pairs grouped by target, targets in increasing order."""
    out: dict[int, list[PairRecord]] = {}
    for r in records:
        if r.flagged:
            out.setdefault(r.target, []).append(r)
    return dict(sorted(out.items()))


def family_of_target(recs: list[PairRecord]) -> str:
    """The family in which this target's pairs are most anomalous (sum of their scores)."""
    totals: dict[str, float] = {}
    for r in recs:
        for fam, e in r.by_family.items():
            totals[fam] = totals.get(fam, 0.0) + e.score
    return max(totals, key=totals.__getitem__)


def estimate_targets(suspect: Suspect, records: list[PairRecord], cfg: DetectionConfig
                     ) -> tuple[dict[int, TargetTrigger], list[Elimination]]:
    """The detected targets with their sources and trigger estimates, and the pairs the all-to-all test dropped."""
    flagged = flagged_by_target(records)
    if not flagged:
        return {}, []
    rev = cfg.reestimate()
    fams = {t: family(family_of_target(recs)) for t, recs in flagged.items()}
    sources = {t: sorted(r.source for r in recs) for t, recs in flagged.items()}
    smallest = {t: min(recs, key=lambda r: r.by_family[fams[t].name].size).source
                for t, recs in flagged.items() if len(recs) > 1}
    jobs = [Job(t, sources[t], fams[t]) for t in sources] + [Job(t, [s], fams[t]) for t, s in smallest.items()]
    found = reestimate(suspect, jobs, rev)
    estimates = dict(zip(sources, found[: len(sources)]))
    # in runs of their own: a batch's image draws depend on its groups, and the all-to-all test below
    # compares two estimates of one batch
    other_jobs = [Job(t, sources[t], family(f)) for t, recs in flagged.items() for f in sorted(recs[0].by_family)
                  if f != fams[t].name and any(r.by_family[f].score > cfg.threshold for r in recs)]
    others = reestimate(suspect, other_jobs, rev) if other_jobs else []
    eliminated: list[Elimination] = []
    for (t, s), alone in zip(smallest.items(), found[len(sources):]):
        kept, est, dropped = _all_to_all_test(suspect, t, s, sources[t], estimates[t], alone, fams[t].name, cfg)
        sources[t], estimates[t] = kept, est
        eliminated += dropped
    triggers = {t: _target_trigger(suspect, t, sources[t], fams[t].name, est, flagged[t], cfg)
                for t, est in estimates.items()}
    for job, est in zip(other_jobs, others):
        if job.sources != sources[job.target]:  # the all-to-all test removed sources: the estimate no longer fits
            continue
        tensors, asr = est.tensors, est.asr
        if job.family is PATCH:
            tensors, asr = binarise(suspect, job.sources, job.target, tensors, cfg, rev)
        tr = triggers[job.target]
        triggers[job.target] = tr.with_(alternatives={**tr.alternatives, job.family.name: tensors})
        log.info("target %d is anomalous in the %s family too: its twin is fitted on that estimate as well "
                 "(success %.2f)", job.target, job.family.name, asr)
    return triggers, eliminated


def _all_to_all_test(suspect: Suspect, target: int, smallest: int, sources: list[int], joint: Estimate,
                     alone: Estimate, fam: str, cfg: DetectionConfig
                     ) -> tuple[list[int], Estimate, list[Elimination]]:
    """Keep the joint estimate, or (joint far larger than the smallest pair's alone) only the smallest pair
    with the sources its trigger also fires; the sources kept, the estimate, and the pairs dropped."""
    if not joint.size > cfg.joint_ratio * alone.size:
        return sources, joint, []
    rest = [r for r in sources if r != smallest]
    if fam == PATCH.name:  # the stamped patch that would be served
        alone = Estimate(binarise(suspect, [smallest], target, alone.tensors, cfg, cfg.reestimate())[0],
                         alone.size, alone.asr)
    shared = sources_sharing(suspect, target, family(fam), alone.tensors, rest, cfg)
    dropped = [Elimination(r, target, joint.size, alone.size) for r in rest if r not in shared]
    kept = sorted([smallest, *shared])
    log.info("target %d: joint trigger %.2f > %.1f x %.2f (source %d alone): keeping sources %s",
             target, joint.size, cfg.joint_ratio, alone.size, smallest, kept)
    return kept, alone, dropped


def _target_trigger(suspect: Suspect, target: int, sources: list[int], fam: str, est: Estimate,
                    recs: list[PairRecord], cfg: DetectionConfig) -> TargetTrigger:
    tensors, size, asr = est.tensors, est.size, est.asr
    if fam == PATCH.name:
        tensors, asr = binarise(suspect, sources, target, tensors, cfg, cfg.reestimate())
        size = float(tensors["mask"].sum())
    score = max(r.score for r in recs if r.source in sources)
    return TargetTrigger(target, sources, fam, tensors, float(asr), float(size), float(score))
