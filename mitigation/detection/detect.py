"""Orchestration: all ordered pairs -> MAD -> detected pairs, targets, sources -> per-target triggers."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mitigation.attacks import Additive, Trigger
from mitigation.detection.mad import mad_scores
from mitigation.detection.reverse import ReverseConfig, ReverseResult, reverse_engineer, success_rate, group_index
from mitigation.detection.triggers import FAMILIES, PairTriggers

log = logging.getLogger(__name__)


@dataclass
class DetectionConfig:
    trigger_type: str = "both"  # patch | perturbation | both
    threshold: float = 7.0
    # pair statistic: "plain" = 1 / size (the paper); "source" = (median size of the source's triggers
    # to every class) / size, so that a source that is easy to turn into anything (MNIST's thin "1")
    # does not look backdoored towards every class; "auto" = "source" from 5 classes up (each source
    # then has enough targets for its median), else "plain"
    statistic: str = "auto"
    pair: ReverseConfig = field(default_factory=ReverseConfig)
    reestimate_steps: int = 300
    reestimate_images: int = 24
    joint_ratio: float = 2.0  # A2A false-pair test: joint trigger this much larger than the smallest alone
    binarise_fraction: float = 0.1  # patch estimate: mask -> 1 where it exceeds this fraction of its max
    # a class joins S(t) when t's re-estimated trigger sends at least this fraction of its clean images
    # to t (None: off). An all-to-one backdoor's trigger works on every class, also on the sources whose
    # pair stayed under the threshold; a natural or all-to-all pair's trigger does not transfer.
    expand_sources: float | None = 0.5


@dataclass
class PairRecord:
    source: int
    target: int
    family: str
    statistic: float
    score: float
    asr: float
    size: float
    flagged: bool
    by_family: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "target": self.target, "family": self.family, "statistic": self.statistic,
            "score": self.score, "asr": self.asr, "size": self.size, "flagged": self.flagged,
            "by_family": self.by_family,
        }


@dataclass
class TargetTrigger:
    target: int
    sources: list[int]
    family: str
    tensors: dict[str, torch.Tensor]  # single trigger (no leading group dim)
    asr: float
    size: float
    score: float

    def module(self) -> Trigger:
        return PairTriggers.export(self.family, {k: v.unsqueeze(0) for k, v in self.tensors.items()}, 0)

    def variants(self, scales: tuple[float, ...] = (1.0, 2.0, 4.0)) -> list[Trigger]:
        """What the twin is fitted on. A patch estimate as it is. A perturbation estimate is by
        construction the *weakest* version of the trigger, and a twin only neutralises triggers up to
        the strength it was fitted on, so it is used at several strengths."""
        if self.family == "patch":
            return [self.module()]
        return [Additive(self.tensors["delta"] * s) for s in scales]


@dataclass
class DetectionResult:
    pairs: list[PairRecord]
    threshold: float
    trigger_type: str
    triggers: dict[int, TargetTrigger]
    seconds: float
    timings: dict[str, float]
    eliminated: list[dict[str, Any]] = field(default_factory=list)
    added_sources: list[dict[str, Any]] = field(default_factory=list)
    statistic: str = "plain"

    @property
    def detected_targets(self) -> list[int]:
        return sorted(self.triggers)

    @property
    def sources(self) -> dict[int, list[int]]:
        return {t: tr.sources for t, tr in sorted(self.triggers.items())}

    def as_dict(self) -> dict[str, Any]:
        return {
            "detected_targets": self.detected_targets,
            "sources": {str(t): s for t, s in self.sources.items()},
            "pairs": [p.as_dict() for p in self.pairs],
            "threshold": self.threshold,
            "trigger_type": self.trigger_type,
            "triggers": {
                str(t): {"family": tr.family, "sources": tr.sources, "asr": tr.asr, "size": tr.size, "score": tr.score}
                for t, tr in sorted(self.triggers.items())
            },
            "eliminated_pairs": self.eliminated,
            "added_sources": self.added_sources,
            "statistic": self.statistic,
            "seconds": round(self.seconds, 2),
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
        }


def all_pairs(num_classes: int) -> list[tuple[int, int]]:
    return [(s, t) for s in range(num_classes) for t in range(num_classes) if s != t]


def resolve_statistic(kind: str, num_classes: int) -> str:
    if kind not in ("plain", "source", "auto"):
        raise ValueError(f"unknown pair statistic {kind!r}: use plain, source or auto")
    return ("source" if num_classes >= 5 else "plain") if kind == "auto" else kind


def pair_statistic(size: torch.Tensor, pairs: list[tuple[int, int]], num_classes: int, kind: str = "auto") -> torch.Tensor:
    """Per-pair anomaly statistic from trigger sizes (large = suspiciously small trigger; NaN = no trigger)."""
    kind = resolve_statistic(kind, num_classes)
    size = size.double()
    found = torch.isfinite(size) & (size > 0)
    nan = torch.full_like(size, float("nan"))
    if kind == "plain":
        return torch.where(found, 1.0 / size, nan).float()
    src = torch.tensor([s for s, _ in pairs])
    tgt = torch.tensor([t for _, t in pairs])
    table = torch.full((num_classes, num_classes), float("nan"), dtype=torch.double)
    table[src, tgt] = size  # inf where no trigger succeeded: it counts as a large size in the median
    med = table.nanmedian(dim=1).values[src]
    return torch.where(found & torch.isfinite(med), med / size, nan).float()


def _families(trigger_type: str) -> tuple[str, ...]:
    if trigger_type == "both":
        return FAMILIES
    if trigger_type not in FAMILIES:
        raise ValueError(f"--trigger-type must be patch, perturbation or both, not {trigger_type!r}")
    return (trigger_type,)


def _binarise(model: nn.Module, x: torch.Tensor, index: torch.Tensor, target: int, tensors: dict[str, torch.Tensor],
              frac: float, cfg: ReverseConfig) -> tuple[dict[str, torch.Tensor], float]:
    """A solid stamped patch: mask -> 1 where it exceeds ``frac`` of its maximum. Kept only if no weaker."""
    mask = tensors["mask"]
    hard = (mask > frac * mask.max()).float()
    cand = {"mask": hard, "pattern": tensors["pattern"]}
    tgt = torch.tensor([target])
    asr_soft = float(success_rate(model, x, index, tgt, "patch", {k: v.unsqueeze(0) for k, v in tensors.items()}, cfg)[0])
    asr_hard = float(success_rate(model, x, index, tgt, "patch", {k: v.unsqueeze(0) for k, v in cand.items()}, cfg)[0])
    return (cand, asr_hard) if asr_hard >= asr_soft else (tensors, asr_soft)


def detect_backdoor(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                    cfg: DetectionConfig | None = None) -> DetectionResult:
    """Detect a backdoor from the defender's clean set ``(x, y)`` (images in [0, 1])."""
    cfg = cfg or DetectionConfig()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    pairs = all_pairs(num_classes)
    groups = [[s] for s, _ in pairs]
    targets = [t for _, t in pairs]
    results: dict[str, ReverseResult] = {}
    scores: dict[str, torch.Tensor] = {}
    stats: dict[str, torch.Tensor] = {}
    for fam in _families(cfg.trigger_type):
        t = time.perf_counter()
        results[fam] = reverse_engineer(model, x, y, groups, targets, fam, cfg.pair, desc=f"pairs/{fam}")
        timings[f"pairs_{fam}"] = time.perf_counter() - t
        stats[fam] = pair_statistic(results[fam].size, pairs, num_classes, cfg.statistic)
        scores[fam] = mad_scores(stats[fam])
        log.info("%s: %d pairs in %.1f s, max score %.2f", fam, len(pairs), timings[f"pairs_{fam}"], float(scores[fam].max()))

    records: list[PairRecord] = []
    for i, (s, t) in enumerate(pairs):
        by_family = {
            fam: {"statistic": float(torch.nan_to_num(stats[fam][i], nan=0.0)), "score": float(scores[fam][i]), "asr": float(r.asr[i]),
                  "size": float(r.size[i])}
            for fam, r in results.items()
        }
        fam = max(by_family, key=lambda f: by_family[f]["score"])
        rec = by_family[fam]
        records.append(PairRecord(s, t, fam, rec["statistic"], rec["score"], rec["asr"], rec["size"],
                                  rec["score"] > cfg.threshold, by_family))

    flagged: dict[int, list[PairRecord]] = {}
    for r in records:
        if r.flagged:
            flagged.setdefault(r.target, []).append(r)
    t = time.perf_counter()
    triggers, eliminated = _estimate_targets(model, x, y, flagged, cfg)
    added = _expand_sources(model, x, y, triggers, num_classes, cfg) if cfg.expand_sources is not None else []
    timings["reestimate"] = time.perf_counter() - t
    for e in eliminated:
        for r in records:
            if r.source == e["source"] and r.target == e["target"]:
                r.flagged = False
    return DetectionResult(records, cfg.threshold, cfg.trigger_type, triggers, time.perf_counter() - t0, timings,
                           eliminated, added, resolve_statistic(cfg.statistic, num_classes))


def _expand_sources(model: nn.Module, x: torch.Tensor, y: torch.Tensor, triggers: dict[int, TargetTrigger],
                    num_classes: int, cfg: DetectionConfig) -> list[dict[str, Any]]:
    """Add to S(t) every other class on which t's trigger succeeds (batched over classes; few targets)."""
    added: list[dict[str, Any]] = []
    present = set(y.unique().tolist())
    for t, trig in sorted(triggers.items()):
        others = [c for c in range(num_classes) if c != t and c not in trig.sources and c in present]
        if not others:
            continue
        index = group_index(y.cpu(), [[c] for c in others])
        tensors = {k: v.unsqueeze(0).expand(len(others), *v.shape).to(x.device) for k, v in trig.tensors.items()}
        asr = success_rate(model, x, index, torch.full((len(others),), t), trig.family, tensors, cfg.pair)
        joined = [(c, a) for c, a in zip(others, asr.tolist()) if a >= cfg.expand_sources]
        for c, a in joined:
            added.append({"source": c, "target": t, "asr": round(a, 4)})
            log.info("target %d: its trigger also sends %.0f%% of class %d to it: source added", t, 100 * a, c)
        trig.sources = sorted(trig.sources + [c for c, _ in joined])
    return added


def _family_of(recs: list[PairRecord]) -> str:
    """The family in which this target's pairs are most anomalous."""
    totals: dict[str, float] = {}
    for r in recs:
        for fam, v in r.by_family.items():
            totals[fam] = totals.get(fam, 0.0) + v["score"]
    return max(totals, key=totals.__getitem__)


def _estimate_targets(model: nn.Module, x: torch.Tensor, y: torch.Tensor, flagged: dict[int, list[PairRecord]],
                      cfg: DetectionConfig) -> tuple[dict[int, TargetTrigger], list[dict[str, Any]]]:
    """Re-estimate each target's trigger jointly on all its sources (batched over targets and families).

    All-to-all false pairs: when a target has several sources but the joint trigger is much larger than
    the smallest single-source one, the sources do not share a trigger: keep only the smallest pair.
    """
    if not flagged:
        return {}, []
    re_cfg = ReverseConfig(**{**cfg.pair.__dict__, "steps": cfg.reestimate_steps,
                              "images_per_group": cfg.reestimate_images})
    plan = {t: sorted(r.source for r in recs) for t, recs in flagged.items()}
    fams = {t: _family_of(recs) for t, recs in flagged.items()}
    estimates = _joint(model, x, y, plan, fams, re_cfg)
    eliminated: list[dict[str, Any]] = []
    retry: dict[int, list[int]] = {}
    for t, recs in flagged.items():
        if len(recs) < 2:
            continue
        fam = fams[t]
        smallest = min(recs, key=lambda r: r.by_family[fam]["size"])
        alone = smallest.by_family[fam]["size"]
        joint = float(estimates[t][1])
        if joint > cfg.joint_ratio * alone:
            retry[t] = [smallest.source]
            for r in recs:
                if r.source != smallest.source:
                    eliminated.append({"source": r.source, "target": t, "joint_size": joint, "smallest_size": alone})
            log.info("target %d: joint trigger %.2f > %.1f x %.2f: keeping only source %d",
                     t, joint, cfg.joint_ratio, alone, smallest.source)
    if retry:
        estimates.update(_joint(model, x, y, retry, {t: fams[t] for t in retry}, re_cfg))
        plan.update(retry)
    triggers: dict[int, TargetTrigger] = {}
    for t, (tensors, size, asr) in estimates.items():
        fam = fams[t]
        if fam == "patch":
            index = group_index(y.cpu(), [plan[t]])
            tensors, asr = _binarise(model, x, index, t, tensors, cfg.binarise_fraction, re_cfg)
            size = float(tensors["mask"].sum())
        score = max(r.score for r in flagged[t] if r.source in plan[t])
        triggers[t] = TargetTrigger(t, plan[t], fam, tensors, float(asr), float(size), float(score))
    return triggers, eliminated


def _joint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: dict[int, list[int]], fams: dict[int, str],
           cfg: ReverseConfig) -> dict[int, tuple[dict[str, torch.Tensor], float, float]]:
    out: dict[int, tuple[dict[str, torch.Tensor], float, float]] = {}
    for fam in sorted(set(fams.values())):
        ts = [t for t in sorted(plan) if fams[t] == fam]
        res = reverse_engineer(model, x, y, [plan[t] for t in ts], ts, fam, cfg, desc=f"re-estimate/{fam}")
        for i, t in enumerate(ts):
            out[t] = ({k: v[i] for k, v in res.tensors.items()}, float(res.size[i]), float(res.asr[i]))
    return out
