"""Stage 2, trigger transfer: a reverse-engineered trigger is only an upper bound on its pair's smallest
trigger, and so is any other trigger that works there.

First the target scan's universal triggers: where target t's sends at least ``transfer_success`` of
class s to t, the pair (s, t) takes it if it is smaller than its own (an all-to-one backdoor's pairs
whose own short optimisation fell short, or never succeeded, get the backdoor's size). Then each
flagged pair's trigger is stamped on every class's clean images (batched over triggers and images);
where it sends at least ``transfer_success`` of class c to one class t', the pair (c, t') takes it if
smaller, and the scores are recomputed; up to ``transfer_rounds`` rounds, each with the newly flagged
pairs' triggers (an all-to-all attack's pairs share one patch). docs/method.md#2-trigger-transfer.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.records import Transfer
from bna_gateway.mitigation.detection.stages.scan import PairScan
from bna_gateway.mitigation.detection.stages.targets import TargetScan, with_reach_entries
from bna_gateway.mitigation.detection.statistic import pair_scores
from bna_gateway.mitigation.detection.suspect import Suspect

log = logging.getLogger(__name__)


def transfer_triggers(suspect: Suspect, scans: dict[str, PairScan], universal: dict[str, TargetScan],
                      cfg: DetectionConfig) -> tuple[dict[str, PairScan], list[Transfer]]:
    """Every family's scan with pair triggers tightened by transfer (new scans; the inputs are kept)."""
    if cfg.transfer_success is None:
        return scans, []
    out: dict[str, PairScan] = {}
    moved: list[Transfer] = []
    for name, scan in scans.items():
        result = scan.result
        size, asr = result.size.clone(), result.asr.clone()
        tensors = {k: v.clone() for k, v in result.tensors.items()}
        if name in universal:
            moved += _from_universal(suspect, scan, universal[name], size, asr, tensors, cfg)
        moved += _from_flagged(suspect, scan, size, asr, tensors, cfg)
        out[name] = PairScan(scan.pairs, replace(result, size=size, asr=asr, tensors=tensors))
    return out, moved


def _from_universal(suspect: Suspect, scan: PairScan, universal: TargetScan, size: torch.Tensor, asr: torch.Tensor,
                    tensors: dict[str, torch.Tensor], cfg: DetectionConfig) -> list[Transfer]:
    """Pairs (s, t) tightened, in place on the copies given, by target t's universal trigger."""
    assert cfg.transfer_success is not None
    uni = universal.result
    found = torch.isfinite(uni.size)
    if not bool(found.any()):
        return []
    row = {t: r for r, t in enumerate(universal.targets)}
    # (row, source, pair) where target t's universal trigger is found and smaller than the pair's own: only
    # there can it tighten a pair, so only there is its reach measured (where the pair choice has not)
    cand = sorted((row[t], s, j) for j, (s, t) in enumerate(scan.pairs)
                  if t in row and bool(found[row[t]]) and s in universal.sources[row[t]]
                  and bool(uni.size[row[t]] < size[j]))
    need = torch.zeros(len(universal.targets), suspect.num_classes, dtype=torch.bool)
    for r, s, _ in cand:
        need[r, s] = True
    reach = with_reach_entries(suspect, universal, need, cfg).known_reach(suspect.num_classes)
    moved: list[Transfer] = []
    for r, s, j in cand:
        rate = float(reach[r, s])
        if rate < cfg.transfer_success:
            continue
        t = universal.targets[r]
        moved.append(Transfer(s, t, scan.family, (-1, t), round(rate, 4), float(size[j]), float(uni.size[r])))
        size[j], asr[j] = uni.size[r], rate
        for n in tensors:
            tensors[n][j] = uni.tensors[n][r]
    if moved:
        log.info("%s: universal triggers tightened %d pairs", scan.family, len(moved))
    return moved


def _from_flagged(suspect: Suspect, scan: PairScan, size: torch.Tensor, asr: torch.Tensor,
                  tensors: dict[str, torch.Tensor], cfg: DetectionConfig) -> list[Transfer]:
    """Pairs tightened, in place on the copies given, by the flagged pairs' triggers, round by round."""
    assert cfg.transfer_success is not None
    res = scan.result
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
                j = where.get((c, int(dest[d, c])))
                if j is None or j == i or not bool(given_size[d] < size[j]):
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
    return moved
