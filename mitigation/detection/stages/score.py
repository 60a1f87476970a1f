"""Stage 3, scoring: each family's pair statistic and MAD score; a pair is judged in the family where it is
most anomalous and flagged above the threshold. docs/method.md#3-scoring.
"""
from __future__ import annotations

import logging

import torch

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.records import FamilyEvidence, PairRecord
from bna_gateway.mitigation.detection.stages.scan import PairScan
from bna_gateway.mitigation.detection.statistic import pair_scores

log = logging.getLogger(__name__)


def score_pairs(scans: dict[str, PairScan], num_classes: int, cfg: DetectionConfig) -> list[PairRecord]:
    """One record per pair, with its evidence in every family."""
    evidence: dict[str, list[FamilyEvidence]] = {}
    pairs: list[tuple[int, int]] = []
    for name, scan in scans.items():
        pairs = scan.pairs
        stat, score = pair_scores(scan.result.size, scan.pairs, num_classes, cfg.statistic)
        stat = torch.nan_to_num(stat, nan=0.0)
        evidence[name] = [FamilyEvidence(float(st), float(sc), float(a), float(sz)) for st, sc, a, sz in
                          zip(stat.tolist(), score.tolist(), scan.result.asr.tolist(), scan.result.size.tolist())]
        log.info("%s: max score %.2f", name, float(score.max()))
    records = []
    for i, (s, t) in enumerate(pairs):
        by_family = {name: ev[i] for name, ev in evidence.items()}
        fam = max(by_family, key=lambda f: by_family[f].score)
        e = by_family[fam]
        records.append(PairRecord(s, t, fam, e.statistic, e.score, e.asr, e.size, e.score > cfg.threshold, by_family))
    return records
