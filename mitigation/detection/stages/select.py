"""Stage 4, candidate targets: which targets to estimate a trigger for, in which family, from which sources.

Evidence at the level where an attack acts:
- a *pair* flagged above the pair threshold (an all-to-all backdoor acts on single pairs);
- a *target* whose column of pair scores is anomalous against the other targets' columns (an
  all-to-one backdoor shortens every source's way to its target, though each pair may be only
  moderately short: many sources agreeing on one target is strong evidence).
A target with an anomalous column is estimated from all its sources (an estimate from the flagged
sources alone may miss the others: on a blended trigger, two of nine); one found by its column alone
must then show that one trigger works for most of them (stage 5's universality test).
docs/method.md#4-candidate-targets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.records import PairRecord, TargetEvidence


@dataclass(frozen=True)
class Candidate:
    """A target to estimate: its family, the sources the joint estimate is fitted on, the source whose
    pair is the smallest (estimated alone for the all-to-all test), and the other families in which
    it is anomalous too (estimated there as well, each with its own smallest pair in ``smallest_in``)."""

    target: int
    family: str
    sources: list[int]
    smallest: int | None
    score: float
    by_column: bool  # found by its column alone, no pair flagged
    other_families: list[str] = field(default_factory=list)
    smallest_in: dict[str, int] = field(default_factory=dict)


def select_candidates(records: list[PairRecord], evidence: dict[str, TargetEvidence], present: list[int],
                      cfg: DetectionConfig) -> list[Candidate]:
    """The candidate targets, in increasing order."""
    flagged: dict[int, list[PairRecord]] = {}
    for r in records:
        if r.flagged:
            flagged.setdefault(r.target, []).append(r)
    by_column = {t for ev in evidence.values() for t in ev.flagged_targets(cfg.target_threshold)}
    out = []
    for t in sorted(set(flagged) | by_column):
        anomalous = _families(t, flagged.get(t, []), evidence, cfg)
        if t in flagged:
            recs = flagged[t]
            fam = max(recs[0].by_family, key=lambda f: sum(r.by_family[f].score for r in recs))
            # an anomalous column says the attack acts on the whole target: estimate from every source
            sources = [c for c in present if c != t] if t in by_column else sorted(r.source for r in recs)
            smallest = min(recs, key=lambda r: r.by_family[fam].size).source if len(sources) > 1 else None
            score = max(r.score for r in recs)
        else:  # all its sources; the smallest scanned pair (with many classes, not every pair is scanned)
            fam = max(anomalous, key=lambda f: evidence[f].score[t])
            column = [r for r in records if r.target == t]
            sources = [c for c in present if c != t]
            smallest = min(column, key=lambda r: r.by_family[fam].size).source if column else None
            score = evidence[fam].score[t]
        others = sorted(f for f in anomalous if f != fam)
        out.append(Candidate(t, fam, sources, smallest, float(score), t not in flagged, others,
                             _smallest_in(others, [r for r in records if r.target == t and r.source in sources])))
    return out


def _smallest_in(families: list[str], column: list[PairRecord]) -> dict[str, int]:
    """Each family's source with the smallest found trigger among ``column`` (none where none was found)."""
    out = {}
    for f in families:
        found = [r for r in column if f in r.by_family and math.isfinite(r.by_family[f].size)]
        if len(column) > 1 and found:
            out[f] = min(found, key=lambda r: r.by_family[f].size).source
    return out


def _families(target: int, recs: list[PairRecord], evidence: dict[str, TargetEvidence],
              cfg: DetectionConfig) -> list[str]:
    """The families in which this target is anomalous: a flagged pair, or its column."""
    fams = {f for r in recs for f, e in r.by_family.items() if e.score > cfg.threshold}
    fams |= {f for f, ev in evidence.items() if ev.score[target] > cfg.target_threshold}
    return sorted(fams)
