"""Orchestration: all ordered pairs -> MAD -> detected pairs, targets, sources -> per-target triggers."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bna_gateway.mitigation.attacks import Trigger
from bna_gateway.mitigation.detection.mad import mad_scores
from bna_gateway.mitigation.detection.reverse import (ReverseConfig, ReverseResult, group_index, prediction_fractions,
                                          reverse_engineer, success_rate)
from bna_gateway.mitigation.detection.triggers import FAMILIES, STRENGTH, PairTriggers, family_of

log = logging.getLogger(__name__)


@dataclass
class DetectionConfig:
    # patch | perturbation | warp | both (patch and perturbation) | all (the three): the trigger families
    # reverse-engineered for every pair, each judged against its own median
    trigger_type: str = "all"
    threshold: float = 7.0
    # pair statistic: "plain" = 1 / size (the paper); "source" = (median size of the source's triggers
    # to every class) / size, so that a source that is easy to turn into anything (MNIST's thin "1")
    # does not look backdoored towards every class; "auto" = "source" from 5 classes up (each source
    # then has enough targets for its median), else "plain"
    statistic: str = "auto"
    pair: ReverseConfig = field(default_factory=ReverseConfig)
    reestimate_steps: int = 300
    reestimate_images: int = 24
    # all-to-all false-pair test: a joint trigger this much larger than the smallest pair's alone (re-estimated
    # with the same settings) means the sources do not all share one trigger; only the smallest pair is kept,
    # with the sources on which its trigger also succeeds (at least ``expand_sources``)
    joint_ratio: float = 2.0
    # re-estimated perturbations are scaled up by the first of these factors that makes them succeed on
    # ReverseConfig.success_threshold of their whole pool (see ReverseConfig.calibrate_scales)
    reestimate_scales: tuple[float, ...] = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
    binarise_fraction: float = 0.1  # patch estimate: mask -> 1 where it exceeds this fraction of its max
    # a class joins S(t) when t's re-estimated trigger sends at least this fraction of its clean images
    # to t (None: off). An all-to-one backdoor's trigger works on every class, also on the sources whose
    # pair stayed under the threshold; a natural or all-to-all pair's trigger does not transfer.
    expand_sources: float | None = 0.5
    # a target whose trigger also moves other classes elsewhere (``TargetTrigger.fit_classes``: an
    # all-to-all backdoor) has its trigger re-fitted on that whole domain, each class towards where the
    # trigger sends it: one source class gives the estimate 50 images to learn from, the domain all of them
    domain_refit: bool = True
    # patch targets whose triggers also work on each other's sources share one stamp: each twin is also fitted
    # on the union of their estimates (``TargetTrigger.also["shared"]``)
    shared_patch: bool = True
    # trigger transfer: a reverse-engineered trigger is only an upper bound on its pair's smallest trigger,
    # and so is any other pair's trigger that works there. Each flagged pair's trigger is stamped on every
    # class's clean images; where it sends at least this fraction of class c to one class t', the pair
    # (c, t') takes that trigger if it is smaller than its own, and MAD is recomputed (None: off). This
    # finds the pairs whose own optimisation missed the backdoor (an all-to-all attack's pairs share one
    # patch). Up to ``transfer_rounds`` rounds, each with the newly flagged pairs' triggers.
    transfer_success: float | None = 0.5
    transfer_rounds: int = 3


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
    # other classes whose clean images the trigger moves to some other class (not to this target): the twin
    # is fitted on these too. An all-to-all trigger sends c to c + 1 for every c: one source class gives a
    # twin only 50 images to learn from, the trigger's whole domain gives it all of them
    fit_classes: list[int] = field(default_factory=list)
    # more estimates of this target's trigger, by name; the twin is fitted on every one:
    # - "patch" / "perturbation" / "warp": the estimate in another family in which its pairs are anomalous
    #   too. Which family describes the real trigger is then unknown: a sinusoid (SIG) also has a small
    #   patch that fires it, and a patch a small perturbation;
    # - "shared": the union of this patch and those of the other targets whose triggers also send S(t) to t.
    #   An all-to-all backdoor's targets share one stamp, and each estimate holds a different few of its
    #   pixels (a minimal trigger is the weakest version of the real one); together they hold most of them
    also: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    shared_with: list[int] = field(default_factory=list)

    def module(self) -> Trigger:
        return PairTriggers.export(self.family, {k: v.unsqueeze(0) for k, v in self.tensors.items()}, 0)

    def variants(self, scales: tuple[float, ...] = (1.0, 2.0, 4.0)) -> list[Trigger]:
        """What the twin is fitted on: this estimate and those of ``also``. A patch estimate as it is. A
        perturbation or warp estimate is by construction the *weakest* version of the trigger, and a twin
        only neutralises triggers up to the strength it was fitted on, so it is used at several strengths."""
        out: list[Trigger] = []
        for tensors in [self.tensors, *(v for _, v in sorted(self.also.items()))]:
            fam = family_of(tensors)
            strengths = [{**tensors, STRENGTH[fam]: tensors[STRENGTH[fam]] * s} for s in scales] \
                if fam in STRENGTH else [tensors]
            out += [PairTriggers.export(fam, {k: v.unsqueeze(0) for k, v in ts.items()}, 0) for ts in strengths]
        return out


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
    transferred: list[dict[str, Any]] = field(default_factory=list)
    refitted: list[dict[str, Any]] = field(default_factory=list)

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
                str(t): {"family": tr.family, "sources": tr.sources, "asr": tr.asr, "size": tr.size, "score": tr.score,
                         "fit_classes": tr.fit_classes, "also": sorted(tr.also), "shared_with": tr.shared_with}
                for t, tr in sorted(self.triggers.items())
            },
            "eliminated_pairs": self.eliminated,
            "added_sources": self.added_sources,
            "transferred": self.transferred,
            "refitted_on_domain": self.refitted,
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
    # where no trigger succeeded the size counts as the largest one found, a large size in the median. Not as
    # inf: a warping backdoor leaves most pairs without a warp (every warp sends the image to its target),
    # and a source's median of inf would leave its backdoored pair no statistic
    largest = size[found].max() if bool(found.any()) else torch.tensor(float("nan"), dtype=torch.double)
    table[src, tgt] = torch.where(torch.isinf(size), largest, size)
    med = table.nanmedian(dim=1).values[src]
    return torch.where(found & torch.isfinite(med), med / size, nan).float()


TRIGGER_TYPES = (*FAMILIES, "both", "all")


def _families(trigger_type: str) -> tuple[str, ...]:
    if trigger_type == "all":
        return FAMILIES
    if trigger_type == "both":
        return ("patch", "perturbation")
    if trigger_type not in FAMILIES:
        raise ValueError(f"--trigger-type must be one of {', '.join(TRIGGER_TYPES)}, not {trigger_type!r}")
    return (trigger_type,)


def _binarise(model: nn.Module, x: torch.Tensor, index: torch.Tensor, target: int | torch.Tensor,
              tensors: dict[str, torch.Tensor], frac: float, cfg: ReverseConfig,
              y: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """A solid stamped patch: mask -> 1 where it exceeds ``frac`` of its maximum. Kept only if no weaker.
    ``target``: a class, or a per-class mapping [1, K] (with the labels ``y``)."""
    mask = tensors["mask"]
    hard = (mask > frac * mask.max()).float()
    cand = {"mask": hard, "pattern": tensors["pattern"]}
    tgt = torch.tensor([target]) if isinstance(target, int) else target
    asr_soft = float(success_rate(model, x, index, tgt, "patch", {k: v.unsqueeze(0) for k, v in tensors.items()}, cfg,
                                  y)[0])
    asr_hard = float(success_rate(model, x, index, tgt, "patch", {k: v.unsqueeze(0) for k, v in cand.items()}, cfg,
                                  y)[0])
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
    transferred: list[dict[str, Any]] = []
    if cfg.transfer_success is not None:
        t = time.perf_counter()
        for fam, res in results.items():
            transferred += _transfer(model, x, y, res, pairs, num_classes, cfg)
            stats[fam] = pair_statistic(res.size, pairs, num_classes, cfg.statistic)
            scores[fam] = mad_scores(stats[fam])
        timings["transfer"] = time.perf_counter() - t

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
    refitted = _refit_on_domain(model, x, y, triggers, num_classes, cfg) if cfg.domain_refit else []
    if cfg.shared_patch and cfg.expand_sources is not None:
        _share_patches(model, x, y, triggers, num_classes, cfg)
    timings["reestimate"] = time.perf_counter() - t
    for e in eliminated:
        for r in records:
            if r.source == e["source"] and r.target == e["target"]:
                r.flagged = False
    return DetectionResult(records, cfg.threshold, cfg.trigger_type, triggers, time.perf_counter() - t0, timings,
                           eliminated, added, resolve_statistic(cfg.statistic, num_classes), transferred, refitted)


def _transfer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, res: ReverseResult, pairs: list[tuple[int, int]],
              num_classes: int, cfg: DetectionConfig) -> list[dict[str, Any]]:
    """Tighten pair sizes with the flagged pairs' triggers (in place on ``res``); what moved, for the record."""
    assert cfg.transfer_success is not None
    where = {p: i for i, p in enumerate(pairs)}
    present = torch.zeros(num_classes, dtype=torch.bool)
    present[y.unique().cpu()] = True
    moved: list[dict[str, Any]] = []
    used: set[int] = set()
    for _ in range(cfg.transfer_rounds):
        scores = mad_scores(pair_statistic(res.size, pairs, num_classes, cfg.statistic))
        donors = [i for i in (scores > cfg.threshold).nonzero(as_tuple=True)[0].tolist() if i not in used]
        if not donors:
            break
        used.update(donors)
        given = {k: v[donors].clone() for k, v in res.tensors.items()}
        given_size = res.size[donors].clone()
        frac = prediction_fractions(model, x, y, num_classes, res.family, given, cfg.pair).cpu()  # [D, K, K]
        frac[:, torch.arange(num_classes), torch.arange(num_classes)] = 0.0  # staying in one's class is no success
        rate, dest = frac.max(dim=2)  # [D, K]: where each donor sends each class, and how often
        changed = False
        for d, i in enumerate(donors):
            for c in (present & (rate[d] >= cfg.transfer_success)).nonzero(as_tuple=True)[0].tolist():
                j = where[(c, int(dest[d, c]))]
                if j == i or not bool(given_size[d] < res.size[j]):
                    continue
                moved.append({"source": c, "target": pairs[j][1], "family": res.family, "from": list(pairs[i]),
                              "asr": round(float(rate[d, c]), 4), "size_before": float(res.size[j]),
                              "size": float(given_size[d])})
                log.info("%s: the trigger of %d -> %d sends %.0f%% of class %d to %d: pair size %.2f -> %.2f",
                         res.family, *pairs[i], 100 * float(rate[d, c]), c, pairs[j][1], float(res.size[j]),
                         float(given_size[d]))
                res.size[j], res.asr[j] = given_size[d], rate[d, c]
                for k in res.tensors:
                    res.tensors[k][j] = given[k][d]
                changed = True
        if not changed:
            break
    return moved


def _expand_sources(model: nn.Module, x: torch.Tensor, y: torch.Tensor, triggers: dict[int, TargetTrigger],
                    num_classes: int, cfg: DetectionConfig) -> list[dict[str, Any]]:
    """Stamp each target's trigger on every class's clean images (batched over triggers and images).

    A class that the trigger sends to its target joins S(t). A class that it sends, just as reliably, to
    another class t' that is not a target yet makes t' a target with that source and this trigger: an
    all-to-all backdoor's pairs share one trigger, so one found pair reveals a missed one.
    """
    assert cfg.expand_sources is not None
    if not triggers:
        return []
    present = set(y.unique().tolist())
    found = sorted(triggers.items())
    added: list[dict[str, Any]] = []
    for fam in sorted({tr.family for _, tr in found}):
        group = [(t, tr) for t, tr in found if tr.family == fam]
        tensors = {k: torch.stack([tr.tensors[k] for _, tr in group]).to(x.device) for k in group[0][1].tensors}
        frac = prediction_fractions(model, x, y, num_classes, fam, tensors, cfg.pair).cpu()  # [T, K, K]
        for d, (t, trig) in enumerate(group):
            revealed: list[int] = []
            for c in sorted(present - set(trig.sources)):  # class t itself may still reveal a target t'
                dest = int(frac[d, c].argmax())
                if c != t and float(frac[d, c, t]) >= cfg.expand_sources:
                    dest = t
                rate = float(frac[d, c, dest])
                if rate < cfg.expand_sources or dest == c:
                    continue
                if dest == t:
                    trig.sources = sorted(trig.sources + [c])
                    log.info("target %d: its trigger also sends %.0f%% of class %d to it: source added", t, 100 * rate, c)
                elif dest not in triggers:
                    revealed.append(dest)
                    triggers[dest] = TargetTrigger(dest, [c], fam, {k: v.clone() for k, v in trig.tensors.items()},
                                                    rate, trig.size, trig.score)
                    log.info("target %d's trigger sends %.0f%% of class %d to %d: %d is a target too, source %d",
                             t, 100 * rate, c, dest, dest, c)
                else:
                    continue
                added.append({"source": c, "target": dest, "asr": round(rate, 4), "trigger_of": t})
            moved = [c for c in sorted(present) if 1.0 - float(frac[d, c, c]) >= cfg.expand_sources]
            for u in [t, *revealed]:  # this target, and those its trigger revealed
                triggers[u].fit_classes = [c for c in moved if c not in triggers[u].sources and c != u]
    return added


def _reestimate_config(cfg: DetectionConfig) -> ReverseConfig:
    return ReverseConfig(**{**cfg.pair.__dict__, "steps": cfg.reestimate_steps,
                            "images_per_group": cfg.reestimate_images, "calibrate_scales": cfg.reestimate_scales})


def _refit_on_domain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, triggers: dict[int, TargetTrigger],
                     num_classes: int, cfg: DetectionConfig) -> list[dict[str, Any]]:
    """Re-fit each target's trigger that moves other classes too (``fit_classes``) on its whole domain.

    A trigger estimated from one source class (an all-to-all pair: 50 images) is a partial copy of the
    real one, a few of its pixels. Where it sends its sources to t and each fit class c to some d(c), one
    trigger is fitted to do all of that at once, on every image of the domain (batched over targets, one
    run per family); the real trigger is what does. It replaces the estimate when it works on S(t) as
    well (or at the success threshold). What was re-fitted, for the record.
    """
    todo = [(t, tr) for t, tr in sorted(triggers.items()) if tr.fit_classes]
    if not todo:
        return []
    re_cfg = _reestimate_config(cfg)
    diag = torch.arange(num_classes)
    done: list[dict[str, Any]] = []
    for fam in sorted({tr.family for _, tr in todo}):
        group = [(t, tr) for t, tr in todo if tr.family == fam]
        tensors = {k: torch.stack([tr.tensors[k] for _, tr in group]).to(x.device) for k in group[0][1].tensors}
        frac = prediction_fractions(model, x, y, num_classes, fam, tensors, cfg.pair).cpu()  # [T, K, K]
        frac[:, diag, diag] = 0.0
        mapping = frac.argmax(dim=2)  # [T, K]: where each trigger sends each class
        for d, (t, tr) in enumerate(group):
            mapping[d, tr.sources] = t
        domains = [sorted(tr.sources + tr.fit_classes) for _, tr in group]
        res = reverse_engineer(model, x, y, domains, mapping, fam, re_cfg, desc=f"domain/{fam}")
        own_index = group_index(y.cpu(), [tr.sources for _, tr in group])
        for d, (t, tr) in enumerate(group):
            new = {k: v[d] for k, v in res.tensors.items()}
            size, asr = float(res.size[d]), float(res.asr[d])
            if fam == "patch":
                new, asr = _binarise(model, x, group_index(y.cpu(), [domains[d]]), mapping[d : d + 1], new,
                                     cfg.binarise_fraction, re_cfg, y)
                size = float(new["mask"].sum())
            own = float(success_rate(model, x, own_index[d : d + 1], torch.tensor([t]), fam,
                                     {k: v.unsqueeze(0) for k, v in new.items()}, cfg.pair)[0])
            kept = bool(own >= min(tr.asr, re_cfg.success_threshold) and asr >= 0.5)
            log.info("target %d: trigger re-fitted on its domain %s (success %.2f there, %.2f on S(t) against %.2f, "
                     "size %.2f against %.2f): %s", t, domains[d], asr, own, tr.asr, size, tr.size,
                     "kept" if kept else "not kept")
            done.append({"target": t, "domain": domains[d], "domain_asr": round(asr, 4), "asr": round(own, 4),
                         "asr_before": round(tr.asr, 4), "size": size, "size_before": tr.size, "kept": kept})
            if kept:
                tr.tensors, tr.asr, tr.size = {k: v.cpu() for k, v in new.items()}, own, size
    return done


def _share_patches(model: nn.Module, x: torch.Tensor, y: torch.Tensor, triggers: dict[int, TargetTrigger],
                   num_classes: int, cfg: DetectionConfig) -> None:
    """Give each patch target whose sources the other targets' patches also send to it the union of those
    patches (mask: the maximum; pattern: the mask-weighted mean), as ``also["shared"]``."""
    assert cfg.expand_sources is not None
    group = [(t, tr) for t, tr in sorted(triggers.items()) if tr.family == "patch"]
    if len(group) < 2:
        return
    masks = torch.stack([tr.tensors["mask"] for _, tr in group]).to(x.device)
    patterns = torch.stack([tr.tensors["pattern"] for _, tr in group]).to(x.device)
    frac = prediction_fractions(model, x, y, num_classes, "patch", {"mask": masks, "pattern": patterns},
                                cfg.pair).cpu()  # [T, K, K]
    masks, patterns = masks.cpu(), patterns.cpu()
    for d, (t, tr) in enumerate(group):
        works = frac[:, tr.sources, t].mean(dim=1) >= cfg.expand_sources  # [T]: which patches fire S(t) -> t
        works[d] = True
        kin = [u for (u, _), w in zip(group, works.tolist()) if w and u != t]
        if not kin:
            continue
        m, p = masks[works], patterns[works]
        mask = m.amax(dim=0)
        pattern = (m * p).sum(dim=0) / m.sum(dim=0).clamp(min=1e-6)
        pattern = torch.where(mask > 0, pattern, tr.tensors["pattern"])
        tr.also["shared"] = {"mask": mask, "pattern": pattern}
        tr.shared_with = kin
        log.info("target %d: the patches of targets %s also send its sources to it: its twin is fitted on their "
                 "union too (%d pixels, its own %d)", t, kin, int((mask > 0).sum()), int((tr.tensors["mask"] > 0).sum()))


def _family_of(recs: list[PairRecord]) -> str:
    """The family in which this target's pairs are most anomalous."""
    totals: dict[str, float] = {}
    for r in recs:
        for fam, v in r.by_family.items():
            totals[fam] = totals.get(fam, 0.0) + v["score"]
    return max(totals, key=totals.__getitem__)


def _estimate_targets(model: nn.Module, x: torch.Tensor, y: torch.Tensor, flagged: dict[int, list[PairRecord]],
                      cfg: DetectionConfig) -> tuple[dict[int, TargetTrigger], list[dict[str, Any]]]:
    """Re-estimate each target's trigger jointly on all its sources (one batched run per family).

    All-to-all false pairs: a target with several sources also has its smallest pair re-estimated alone,
    in the same run and with the same settings; when the joint trigger is much larger than that one, the
    sources do not share a trigger: only the smallest pair is kept, with its own estimate.
    A target whose pairs are flagged in another family as well is re-estimated there too (``also``).
    """
    if not flagged:
        return {}, []
    re_cfg = _reestimate_config(cfg)
    fams = {t: _family_of(recs) for t, recs in flagged.items()}
    plan = {t: sorted(r.source for r in recs) for t, recs in sorted(flagged.items())}
    alone = {t: min(recs, key=lambda r: r.by_family[fams[t]]["size"]).source
             for t, recs in sorted(flagged.items()) if len(recs) > 1}
    extra = [(t, plan[t], f) for t, recs in sorted(flagged.items()) for f in sorted(recs[0].by_family)
             if f != fams[t] and any(r.by_family[f]["score"] > cfg.threshold for r in recs)]
    jobs = [(t, srcs, fams[t]) for t, srcs in plan.items()] + [(t, [s], fams[t]) for t, s in alone.items()]
    found = _reestimate(model, x, y, jobs, re_cfg)
    # in runs of their own: a batch's image draws depend on its groups, and the all-to-all test below
    # compares two estimates of the same batch
    others_found = _reestimate(model, x, y, extra, re_cfg) if extra else []
    estimates = dict(zip(plan, found[: len(plan)]))
    eliminated: list[dict[str, Any]] = []
    for (t, s), single in zip(alone.items(), found[len(plan):]):
        joint, smallest = estimates[t][1], single[1]
        if joint > cfg.joint_ratio * smallest:
            others = [r for r in plan[t] if r != s]
            if fams[t] == "patch":  # the stamped patch that would be served, as below
                single = (_binarise(model, x, group_index(y.cpu(), [[s]]), t, single[0], cfg.binarise_fraction,
                                    re_cfg)[0], single[1], single[2])
            shared = _shared(model, x, y, t, fams[t], single[0], others, cfg)
            eliminated += [{"source": r, "target": t, "joint_size": joint, "smallest_size": smallest}
                           for r in others if r not in shared]
            plan[t], estimates[t] = sorted([s, *shared]), single
            log.info("target %d: joint trigger %.2f > %.1f x %.2f (source %d alone): keeping sources %s",
                     t, joint, cfg.joint_ratio, smallest, s, plan[t])
    triggers: dict[int, TargetTrigger] = {}
    for t, (tensors, size, asr) in estimates.items():
        fam = fams[t]
        if fam == "patch":
            index = group_index(y.cpu(), [plan[t]])
            tensors, asr = _binarise(model, x, index, t, tensors, cfg.binarise_fraction, re_cfg)
            size = float(tensors["mask"].sum())
        score = max(r.score for r in flagged[t] if r.source in plan[t])
        triggers[t] = TargetTrigger(t, plan[t], fam, tensors, float(asr), float(size), float(score))
    for (t, srcs, f), (tensors, _, asr) in zip(extra, others_found):
        if srcs != plan[t]:  # the all-to-all test removed sources: the joint estimate no longer fits them
            continue
        if f == "patch":
            tensors, asr = _binarise(model, x, group_index(y.cpu(), [srcs]), t, tensors, cfg.binarise_fraction, re_cfg)
        triggers[t].also[f] = tensors
        log.info("target %d is anomalous in the %s family too: its twin is fitted on that estimate as well "
                 "(success %.2f)", t, f, asr)
    return triggers, eliminated


def _shared(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: int, family: str,
            tensors: dict[str, torch.Tensor], sources: list[int], cfg: DetectionConfig) -> list[int]:
    """The sources on which the smallest pair's own trigger also works (they share it, whatever the size
    of a trigger fitted to all of them at once: one fitted to nine diverse classes needs a few more
    pixels than one fitted to a single class). Without ``expand_sources``: none."""
    if cfg.expand_sources is None or not sources:
        return []
    index = group_index(y.cpu(), [[r] for r in sources])
    stacked = {k: v.unsqueeze(0).expand(len(sources), *v.shape).to(x.device) for k, v in tensors.items()}
    asr = success_rate(model, x, index, torch.full((len(sources),), target), family, stacked, cfg.pair)
    return [r for r, a in zip(sources, asr.tolist()) if a >= cfg.expand_sources]


def _reestimate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, jobs: list[tuple[int, list[int], str]],
                cfg: ReverseConfig) -> list[tuple[dict[str, torch.Tensor], float, float]]:
    """One trigger per job (target, its sources, family): tensors, size, success; one batched run per family."""
    out: list[tuple[dict[str, torch.Tensor], float, float]] = [({}, 0.0, 0.0)] * len(jobs)
    for fam in sorted({f for _, _, f in jobs}):
        idx = [i for i, job in enumerate(jobs) if job[2] == fam]
        res = reverse_engineer(model, x, y, [jobs[i][1] for i in idx], [jobs[i][0] for i in idx], fam, cfg,
                               desc=f"re-estimate/{fam}")
        for k, i in enumerate(idx):
            out[i] = ({n: v[k] for n, v in res.tensors.items()}, float(res.size[k]), float(res.asr[k]))
    return out
