"""Stage 6, source expansion: each target's trigger is stamped on every class's clean images.

A class that the trigger sends to its target joins S(t): an all-to-one backdoor's trigger works on every
class, also on the sources whose pair stayed under the threshold. A class that it sends just as reliably
to another class t' that is not a target yet makes t' a target with that source and this trigger: an
all-to-all backdoor's pairs share one trigger, so one found pair reveals a missed one. The classes a
trigger moves elsewhere become its twin's fit classes. docs/method.md#6-source-expansion.
"""
from __future__ import annotations

import logging

import torch

from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.records import AddedSource, TargetTrigger
from bna_gateway.mitigation.detection.suspect import Suspect
from bna_gateway.mitigation.triggers import family

log = logging.getLogger(__name__)


def expand_sources(suspect: Suspect, triggers: dict[int, TargetTrigger], cfg: DetectionConfig
                   ) -> tuple[dict[int, TargetTrigger], list[AddedSource]]:
    """The targets with their sources and fit classes grown, revealed targets added; what was added."""
    if cfg.expand_sources is None or not triggers:
        return triggers, []
    out = dict(sorted(triggers.items()))
    found = list(out.items())  # the targets found so far; revealed ones are not expanded in turn
    added: list[AddedSource] = []
    for name in sorted({tr.family for _, tr in found}):
        group = [(t, tr) for t, tr in found if tr.family == name]
        tensors = {k: torch.stack([tr.tensors[k] for _, tr in group]).to(suspect.x.device) for k in group[0][1].tensors}
        frac = suspect.fractions(family(name), tensors, cfg.pair)  # [T, K, K]
        for d, (t, _) in enumerate(group):
            revealed, more = _expand_one(suspect, out, t, frac[d], cfg.expand_sources)
            added += more
            moved = [c for c in suspect.present if 1.0 - float(frac[d, c, c]) >= cfg.expand_sources]
            for u in [t, *revealed]:  # this target, and those its trigger revealed
                out[u] = out[u].with_(fit_classes=[c for c in moved if c not in out[u].sources and c != u])
    return dict(sorted(out.items())), added


def _expand_one(suspect: Suspect, out: dict[int, TargetTrigger], t: int, frac: torch.Tensor, threshold: float
                ) -> tuple[list[int], list[AddedSource]]:
    """Grow target ``t`` (in ``out``) from where its trigger sends each class (``frac`` [K, K]); the targets
    it revealed (added to ``out``) and the record of what was added."""
    trig = out[t]
    revealed: list[int] = []
    added: list[AddedSource] = []
    for c in sorted(set(suspect.present) - set(trig.sources)):  # class t itself may still reveal a target t'
        dest = int(frac[c].argmax())
        if c != t and float(frac[c, t]) >= threshold:
            dest = t
        rate = float(frac[c, dest])
        if rate < threshold or dest == c:
            continue
        if dest == t:
            out[t] = out[t].with_(sources=sorted(out[t].sources + [c]))
            log.info("target %d: its trigger also sends %.0f%% of class %d to it: source added", t, 100 * rate, c)
        elif dest not in out:
            revealed.append(dest)
            out[dest] = TargetTrigger(dest, [c], trig.family, {k: v.clone() for k, v in trig.tensors.items()},
                                      rate, trig.size, trig.score)
            log.info("target %d's trigger sends %.0f%% of class %d to %d: %d is a target too, source %d",
                     t, 100 * rate, c, dest, dest, c)
        else:
            continue
        added.append(AddedSource(c, dest, round(rate, 4), t))
    return revealed, added
