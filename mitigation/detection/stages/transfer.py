"""Stage 2, trigger transfer: a reverse-engineered trigger is only an upper bound on its pair's smallest
trigger, and so is any other pair's trigger that works there.

Each flagged pair's trigger is stamped on every class's clean images (batched over triggers and images);
where it sends at least ``transfer_success`` of class c to one class t', the pair (c, t') takes it if it
is smaller than its own, and the scores are recomputed; up to ``transfer_rounds`` rounds, each with the
newly flagged pairs' triggers. This finds the pairs whose own optimisation missed the backdoor (an
all-to-all attack's pairs share one patch). docs/method.md#2-trigger-transfer.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.records import Transfer
from bna_gateway.mitigation.detection.reverse import ReverseResult
from bna_gateway.mitigation.detection.stages.scan import PairScan
from bna_gateway.mitigation.detection.statistic import pair_scores
from bna_gateway.mitigation.detection.suspect import Suspect

log = logging.getLogger(__name__)


def transfer_triggers(suspect: Suspect, scans: dict[str, PairScan], cfg: DetectionConfig
                      ) -> tuple[dict[str, PairScan], list[Transfer]]:
    """Every family's scan with pair triggers tightened by transfer (new scans; the inputs are kept)."""
    if cfg.transfer_success is None:
        return scans, []
    out: dict[str, PairScan] = {}
    moved: list[Transfer] = []
    for name, scan in scans.items():
        result, m = _transfer_family(suspect, scan, cfg)
        out[name] = PairScan(scan.pairs, result)
        moved += m
    return out, moved


def _transfer_family(suspect: Suspect, scan: PairScan, cfg: DetectionConfig) -> tuple[ReverseResult, list[Transfer]]:
    assert cfg.transfer_success is not None
    res = scan.result
    size, asr = res.size.clone(), res.asr.clone()
    tensors = {k: v.clone() for k, v in res.tensors.items()}
    where = {p: i for i, p in enumerate(scan.pairs)}
    k = suspect.num_classes
    present = torch.zeros(k, dtype=torch.bool)
    present[suspect.present] = True
    moved: list[Transfer] = []
    used: set[int] = set()
    for _ in range(cfg.transfer_rounds):
        _, scores = pair_scores(size, scan.pairs, k, cfg.statistic)
        donors = [i for i in (scores > cfg.threshold).nonzero(as_tuple=True)[0].tolist() if i not in used]
        if not donors:
            break
        used.update(donors)
        given = {n: v[donors].clone() for n, v in tensors.items()}
        given_size = size[donors].clone()
        frac = suspect.fractions(res.family, given, cfg.pair)  # [D, K, K]
        frac[:, torch.arange(k), torch.arange(k)] = 0.0  # staying in one's class is no success
        rate, dest = frac.max(dim=2)  # [D, K]: where each donor sends each class, and how often
        changed = False
        for d, i in enumerate(donors):
            for c in (present & (rate[d] >= cfg.transfer_success)).nonzero(as_tuple=True)[0].tolist():
                j = where[(c, int(dest[d, c]))]
                if j == i or not bool(given_size[d] < size[j]):
                    continue
                moved.append(Transfer(c, scan.pairs[j][1], scan.family, scan.pairs[i], round(float(rate[d, c]), 4),
                                      float(size[j]), float(given_size[d])))
                log.info("%s: the trigger of %d -> %d sends %.0f%% of class %d to %d: pair size %.2f -> %.2f",
                         scan.family, *scan.pairs[i], 100 * float(rate[d, c]), c, scan.pairs[j][1], float(size[j]),
                         float(given_size[d]))
                size[j], asr[j] = given_size[d], rate[d, c]
                for n in tensors:
                    tensors[n][j] = given[n][d]
                changed = True
        if not changed:
            break
    return replace(res, size=size, asr=asr, tensors=tensors), moved
