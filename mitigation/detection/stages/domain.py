"""Stage 7, domain re-fit: a target's trigger that also moves other classes is re-fitted on its whole domain.

A trigger estimated from one source class (an all-to-all pair: 50 images) is a partial copy of the
real one, a few of its pixels. Where it sends its sources to t and each fit class c to some d(c), one
trigger is fitted to do all of that at once, on every image of the domain (batched over targets, one
run per family); the real trigger is what does. It replaces the estimate when it works on S(t) as well
(or at the success threshold). docs/method.md#7-domain-re-fit.
"""
from __future__ import annotations

import logging

import torch

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.records import DomainRefit, TargetTrigger
from bna_gateway.mitigation.detection.stages.common import binarise
from bna_gateway.mitigation.detection.suspect import Suspect
from bna_gateway.mitigation.triggers import PATCH, family

log = logging.getLogger(__name__)


def refit_on_domain(suspect: Suspect, triggers: dict[int, TargetTrigger], cfg: DetectionConfig
                    ) -> tuple[dict[int, TargetTrigger], list[DomainRefit]]:
    """The targets with their triggers re-fitted where that was kept; a record of every re-fit."""
    todo = [(t, tr) for t, tr in sorted(triggers.items()) if tr.fit_classes]
    if not cfg.domain_refit or not todo:
        return triggers, []
    out = dict(triggers)
    done: list[DomainRefit] = []
    for name in sorted({tr.family for _, tr in todo}):
        group = [(t, tr) for t, tr in todo if tr.family == name]
        for t, new, record in _refit_family(suspect, group, cfg):
            done.append(record)
            if new is not None:
                out[t] = new
    return out, done


def _refit_family(suspect: Suspect, group: list[tuple[int, TargetTrigger]], cfg: DetectionConfig
                  ) -> list[tuple[int, TargetTrigger | None, DomainRefit]]:
    fam = family(group[0][1].family)
    rev = cfg.reestimate()
    k = suspect.num_classes
    tensors = {n: torch.stack([tr.tensors[n] for _, tr in group]).to(suspect.x.device) for n in group[0][1].tensors}
    frac = suspect.fractions(fam, tensors, cfg.pair)  # [T, K, K]
    frac[:, torch.arange(k), torch.arange(k)] = 0.0
    mapping = frac.argmax(dim=2)  # [T, K]: where each trigger sends each class
    for d, (t, tr) in enumerate(group):
        mapping[d, tr.sources] = t
    domains = [sorted(tr.sources + tr.fit_classes) for _, tr in group]
    res = suspect.reverse(domains, mapping, fam, rev, desc=f"domain/{fam.name}")
    out = []
    for d, (t, tr) in enumerate(group):
        new, size, asr = res.one(d), float(res.size[d]), float(res.asr[d])
        if fam is PATCH:
            new, asr = binarise(suspect, domains[d], mapping[d : d + 1], new, cfg, rev)
            size = float(new["mask"].sum())
        one = {n: v.unsqueeze(0) for n, v in new.items()}
        own = float(suspect.success([tr.sources], torch.tensor([t]), fam, one, cfg.pair)[0])
        kept = bool(own >= min(tr.asr, rev.success_threshold) and asr >= 0.5)
        log.info("target %d: trigger re-fitted on its domain %s (success %.2f there, %.2f on S(t) against %.2f, "
                 "size %.2f against %.2f): %s", t, domains[d], asr, own, tr.asr, size, tr.size,
                 "kept" if kept else "not kept")
        record = DomainRefit(t, domains[d], round(asr, 4), round(own, 4), round(tr.asr, 4), size, tr.size, kept)
        new_trigger = tr.with_(tensors={n: v.cpu() for n, v in new.items()}, asr=own, size=size) if kept else None
        out.append((t, new_trigger, record))
    return out
