"""What detection finds, as typed records: pairs, per-target triggers, and what each stage changed.

``DetectionResult`` is what ``detect_backdoor`` returns and BNA consumes in memory; ``as_dict`` is the
document saved as ``detection.json`` (keys fixed by docs/cli.md) and ``io.read_detection`` loads it back.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from bna_gateway.mitigation.triggers import Trigger, family, family_of

# the strengths at which a scalable estimate is fitted into a twin (docs/method.md#bna)
TWIN_STRENGTHS = (1.0, 2.0, 4.0)


@dataclass(frozen=True)
class FamilyEvidence:
    """One pair in one trigger family: its statistic, MAD score, the kept trigger's success and size."""

    statistic: float
    score: float
    asr: float
    size: float

    def as_dict(self) -> dict[str, float]:
        return {"statistic": self.statistic, "score": self.score, "asr": self.asr, "size": self.size}


@dataclass(frozen=True)
class TargetEvidence:
    """One family's evidence per target class (lists indexed by class): the median pair score of its
    column, the universal trigger of the target scan (size, success on the pooled sources), each scored
    against the other targets' (``column_score``, ``universal_score``), the count of its pairs whose
    optimisation succeeded against the family's rate (``found_score``), and the target's ``score``."""

    column: list[float]
    score: list[float]
    universal_size: list[float]
    universal_asr: list[float]
    column_score: list[float] = field(default_factory=list)
    universal_score: list[float] = field(default_factory=list)
    found_score: list[float] = field(default_factory=list)

    def flagged_targets(self, threshold: float) -> list[int]:
        return [t for t, z in enumerate(self.score) if z > threshold]

    def as_dict(self) -> dict[str, list[float]]:
        return {"column": self.column, "score": self.score, "universal_size": self.universal_size,
                "universal_asr": self.universal_asr, "column_score": self.column_score,
                "universal_score": self.universal_score, "found_score": self.found_score}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TargetEvidence":
        floats = lambda key: [float(v) for v in d.get(key, [])]  # noqa: E731
        return cls(floats("column"), floats("score"), floats("universal_size"), floats("universal_asr"),
                   floats("column_score"), floats("universal_score"), floats("found_score"))


@dataclass(frozen=True)
class PairRecord:
    """One ordered pair (source -> target): its evidence in every family, judged in the most anomalous one."""

    source: int
    target: int
    family: str
    statistic: float
    score: float
    asr: float
    size: float
    flagged: bool
    by_family: dict[str, FamilyEvidence] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "target": self.target, "family": self.family, "statistic": self.statistic,
            "score": self.score, "asr": self.asr, "size": self.size, "flagged": self.flagged,
            "by_family": {f: e.as_dict() for f, e in self.by_family.items()},
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "PairRecord":
        evidence = {f: FamilyEvidence(**e) for f, e in doc.get("by_family", {}).items()}
        return cls(int(doc["source"]), int(doc["target"]), doc.get("family", ""), float(doc["statistic"]),
                   float(doc["score"]), float(doc.get("asr", 0.0)), float(doc.get("size", 0.0)),
                   bool(doc["flagged"]), evidence)


@dataclass(frozen=True)
class TargetTrigger:
    """A detected target, its sources S(t) and the trigger estimate(s) its twin is fitted on."""

    target: int
    sources: list[int]
    family: str
    tensors: dict[str, torch.Tensor]  # one trigger (no group dimension)
    asr: float
    size: float
    score: float
    # classes the trigger moves to some *other* class (an all-to-all trigger sends c to c + 1): the twin
    # learns from these too, not only from S(t)'s images
    fit_classes: list[int] = field(default_factory=list)
    # more estimates of this target's trigger, by name (saved under "also"); the twin is fitted on each:
    # another family's name: the estimate in a family where its pairs are anomalous too (which family
    # describes the real trigger is unknown: a sinusoid also has a small patch that fires it);
    # "shared": the union of this stamp and those of the targets whose stamps also fire S(t)
    alternatives: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    shared_with: list[int] = field(default_factory=list)

    def module(self) -> Trigger:
        return Trigger(family(self.family), self.tensors)

    def variants(self, strengths: tuple[float, ...] = TWIN_STRENGTHS) -> list[Trigger]:
        """What the twin is fitted on: this estimate and its alternatives. A patch as it is; a perturbation
        or warp estimate is by construction the *weakest* copy of the trigger, and a twin only neutralises
        triggers up to the strength it was fitted on, so it is used at several strengths."""
        out: list[Trigger] = []
        for tensors in [self.tensors, *(v for _, v in sorted(self.alternatives.items()))]:
            fam = family_of(tensors)
            copies = [fam.scaled(tensors, s) for s in strengths] if fam.scalable else [dict(tensors)]
            out += [Trigger(fam, t) for t in copies]
        return out

    def with_(self, **changes: Any) -> "TargetTrigger":
        return replace(self, **changes)

    def summary(self) -> dict[str, Any]:
        return {"family": self.family, "sources": self.sources, "asr": self.asr, "size": self.size,
                "score": self.score, "fit_classes": self.fit_classes, "also": sorted(self.alternatives),
                "shared_with": self.shared_with}


@dataclass(frozen=True)
class Transfer:
    """Pair (source, target) took the smaller trigger of flagged pair ``donor``, which also works there
    (``donor`` (-1, t): the target scan's universal trigger of t)."""

    source: int
    target: int
    family: str
    donor: tuple[int, int]
    asr: float
    size_before: float
    size: float

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "family": self.family, "from": list(self.donor),
                "asr": self.asr, "size_before": self.size_before, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Transfer":
        donor = (int(d["from"][0]), int(d["from"][1]))
        return cls(int(d["source"]), int(d["target"]), d["family"], donor, d["asr"], d["size_before"], d["size"])


@dataclass(frozen=True)
class AddedSource:
    """Class ``source`` joined S(``target``): the trigger of ``trigger_of`` sends ``asr`` of its images there
    (``trigger_of != target``: a target revealed by another target's trigger)."""

    source: int
    target: int
    asr: float
    trigger_of: int

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "asr": self.asr, "trigger_of": self.trigger_of}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AddedSource":
        return cls(int(d["source"]), int(d["target"]), d["asr"], int(d.get("trigger_of", d["target"])))


@dataclass(frozen=True)
class Elimination:
    """A flagged pair dropped by the all-to-all test: its target's joint trigger was far larger."""

    source: int
    target: int
    joint_size: float
    smallest_size: float

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "joint_size": self.joint_size,
                "smallest_size": self.smallest_size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Elimination":
        return cls(int(d["source"]), int(d["target"]), d["joint_size"], d["smallest_size"])


@dataclass(frozen=True)
class NarrowTrigger:
    """A target dropped by the reach test: its trigger moves only the classes ``reach`` (sources and
    classes sent elsewhere), fewer than ``needed``."""

    target: int
    sources: list[int]
    reach: list[int]
    needed: int
    family: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "sources": self.sources, "reach": self.reach, "needed": self.needed,
                "family": self.family, "score": self.score}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NarrowTrigger":
        return cls(int(d["target"]), [int(s) for s in d["sources"]], [int(c) for c in d["reach"]], int(d["needed"]),
                   d.get("family", ""), float(d.get("score", 0.0)))


@dataclass(frozen=True)
class MemoryCheck:
    """A target the memory test examined: the share of its trigger that the BN running statistics remember
    (``memory.memory_share``), the trigger evidence it was weighed against, whether it was kept, and its
    sources (whose pairs are unflagged when it is not)."""

    target: int
    family: str
    share: float
    level: float
    kept: bool
    sources: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "family": self.family, "share": round(self.share, 4),
                "level": round(self.level, 3), "kept": self.kept, "sources": self.sources}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MemoryCheck":
        return cls(int(d["target"]), d.get("family", ""), float(d["share"]), float(d.get("level", 0.0)),
                   bool(d["kept"]), [int(s) for s in d.get("sources", [])])


@dataclass(frozen=True)
class DomainRefit:
    """A target's trigger re-fitted on its whole domain (sources + fit classes), kept or not."""

    target: int
    domain: list[int]
    domain_asr: float
    asr: float
    asr_before: float
    size: float
    size_before: float
    kept: bool

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "domain": self.domain, "domain_asr": self.domain_asr, "asr": self.asr,
                "asr_before": self.asr_before, "size": self.size, "size_before": self.size_before, "kept": self.kept}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DomainRefit":
        return cls(int(d["target"]), [int(c) for c in d["domain"]], d["domain_asr"], d["asr"], d["asr_before"],
                   d["size"], d["size_before"], bool(d["kept"]))


@dataclass(frozen=True)
class DetectionResult:
    pairs: list[PairRecord]
    threshold: float
    trigger_type: str
    triggers: dict[int, TargetTrigger]
    seconds: float
    timings: dict[str, float]
    eliminated: list[Elimination] = field(default_factory=list)
    added_sources: list[AddedSource] = field(default_factory=list)
    statistic: str = "plain"
    transferred: list[Transfer] = field(default_factory=list)
    refitted: list[DomainRefit] = field(default_factory=list)
    target_evidence: dict[str, TargetEvidence] = field(default_factory=dict)
    target_threshold: float | None = None
    narrow: list[NarrowTrigger] = field(default_factory=list)
    memory: list[MemoryCheck] = field(default_factory=list)
    precision: str = "float32"  # the format of the model's passes (precision.py)

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
            "triggers": {str(t): tr.summary() for t, tr in sorted(self.triggers.items())},
            "eliminated_pairs": [e.as_dict() for e in self.eliminated],
            "added_sources": [a.as_dict() for a in self.added_sources],
            "narrow_triggers": [n.as_dict() for n in self.narrow],
            "memory_checks": [m.as_dict() for m in self.memory],
            "transferred": [m.as_dict() for m in self.transferred],
            "refitted_on_domain": [r.as_dict() for r in self.refitted],
            "target_threshold": self.target_threshold,
            "targets": {f: e.as_dict() for f, e in self.target_evidence.items()},
            "statistic": self.statistic,
            "precision": self.precision,
            "seconds": round(self.seconds, 2),
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
        }
