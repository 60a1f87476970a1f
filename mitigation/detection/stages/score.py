"""Stage 3, scoring, at the two levels where attacks act (docs/method.md#3-scoring).

- Pairs: each family's pair statistic and its robust z-score (MAD) against all pairs of the family;
  a pair is judged in the family where it is most anomalous and flagged above ``threshold``.
- Targets: each family's column evidence of a target (the median of its pairs' scores over the
  sources) and its robust z-score against the other targets' columns (some classes are naturally
  easier to reach than others: that is the target level's null population); how many of its pairs'
  optimisations succeeded against the family's success rate elsewhere (a family that fails on most
  pairs leaves them no score, and then *where* it succeeds is the evidence); from
  ``universal_test_classes`` classes up, also its universal trigger's size against the other targets'
  (above ``universal_threshold``). A target above ``target_threshold`` is a candidate even when none of
  its pairs is flagged.
"""
from __future__ import annotations

import logging

import torch

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.records import FamilyEvidence, PairRecord, TargetEvidence
from bna_gateway.mitigation.detection.stages.scan import PairScan
from bna_gateway.mitigation.detection.stages.targets import TargetScan
from bna_gateway.mitigation.detection.statistic import (column_evidence, found_scores, pair_scores, target_scores,
                                                        universal_scores)

log = logging.getLogger(__name__)


def score_pairs(scans: dict[str, PairScan], num_classes: int, cfg: DetectionConfig) -> list[PairRecord]:
    """One record per pair, with its evidence in every family."""
    evidence: dict[str, list[FamilyEvidence]] = {}
    pairs: list[tuple[int, int]] = []
    for name, scan in scans.items():
        pairs = scan.pairs
        stat, score = pair_scores(scan.result.size, scan.pairs, num_classes, _statistic(scan, cfg))
        stat = torch.nan_to_num(stat, nan=0.0)
        evidence[name] = [FamilyEvidence(float(st), float(sc), float(a), float(sz)) for st, sc, a, sz in
                          zip(stat.tolist(), score.tolist(), scan.result.asr.tolist(), scan.result.size.tolist())]
        log.info("%s: max pair score %.2f", name, float(score.max()))
    records = []
    for i, (s, t) in enumerate(pairs):
        by_family = {name: ev[i] for name, ev in evidence.items()}
        fam = max(by_family, key=lambda f: by_family[f].score)
        e = by_family[fam]
        records.append(PairRecord(s, t, fam, e.statistic, e.score, e.asr, e.size, e.score > cfg.threshold, by_family))
    return records


def _statistic(scan: PairScan, cfg: DetectionConfig) -> str:
    """A scan of only some pairs per source has no source median to normalise by: plain 1/size."""
    return cfg.statistic if scan.complete else "plain"


def score_targets(scans: dict[str, PairScan], universal: dict[str, TargetScan], num_classes: int,
                  cfg: DetectionConfig) -> dict[str, TargetEvidence]:
    """Each family's evidence per target: its column of pair scores and the universal trigger, each scored
    against the other targets', and its count of successful pair optimisations against the family's rate;
    the target's score is the largest of the three (the count only where every pair was scanned; the
    universal one only with at least ``universal_test_classes`` classes, and scaled so that it passes
    ``target_threshold`` where it passes its own ``universal_threshold``)."""
    out: dict[str, TargetEvidence] = {}
    for name, scan in scans.items():
        _, score = pair_scores(scan.result.size, scan.pairs, num_classes, _statistic(scan, cfg))
        column = column_evidence(score, scan.pairs, num_classes)
        column_z = target_scores(column, num_classes - 1)
        uni = universal.get(name)
        size = uni.result.size if uni is not None else torch.full((num_classes,), float("nan"))
        asr = uni.result.asr if uni is not None else torch.full((num_classes,), float("nan"))
        universal_z = universal_scores(size)
        found_z = found_scores(scan.result.size, scan.pairs, num_classes) if scan.complete \
            else torch.zeros(num_classes)
        combined = torch.maximum(column_z, found_z)
        if num_classes >= cfg.universal_test_classes:  # on the column's scale: above target_threshold iff above its own
            combined = torch.maximum(combined, universal_z * (cfg.target_threshold / cfg.universal_threshold))
        out[name] = TargetEvidence(_rounded(column), _rounded(combined), size.tolist(), asr.tolist(),
                                   _rounded(column_z), _rounded(universal_z), _rounded(found_z))
        log.info("%s: target scores %s", name, " ".join(f"{v:.1f}" for v in combined.tolist()))
    return out


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 4) for v in values.tolist()]
