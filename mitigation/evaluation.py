"""Evaluate a bundle against an attack: ACC / ASR / SIA of f and of the gateway's routing, TPR / FPR, DER.

The gateway's answers come from the same routing code as serving (``models.twins.TwinRouter``).
``Evaluation.as_dict`` is the evaluation JSON (keys fixed by docs/cli.md#evaluation-json).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bna_gateway.mitigation.imagefolder import ImageSet
from bna_gateway.mitigation.lab.attacks import AttackSpec, build_trigger
from bna_gateway.mitigation.lab.metrics import AttackMetrics, attack_metrics, predict
from bna_gateway.models.bundle import LoadedBundle
from bna_gateway.models.twins import RoutedBatch


@dataclass(frozen=True)
class SourceClassResult:
    """ASR of f and of the gateway, and the gateway's SIA, on the triggered images of one true class."""

    cls: int
    targets: list[int]
    n: int
    f_asr: float
    asr: float
    sia: float

    def as_dict(self) -> dict[str, Any]:
        return {"class": self.cls, "targets": self.targets, "n": self.n, "f_asr": self.f_asr, "asr": self.asr,
                "sia": self.sia}


@dataclass(frozen=True)
class Evaluation:
    vanilla: AttackMetrics
    mitigated: AttackMetrics
    tpr: float | None  # triggered images flagged
    tpr_when_f_fooled: float | None  # triggered images f gives the attack's target, flagged (what must be caught)
    fpr: float  # clean images of the detected target classes flagged
    fpr_all_clean: float
    detected_targets: list[int]
    true_targets: list[int]
    attack: AttackSpec
    n_test: int
    n_triggered: int
    bundle_version: str
    outputs_identical_to_f_on_clean: bool
    per_source_class: list[SourceClassResult] = field(default_factory=list)

    @property
    def der(self) -> float | None:
        return der(self.vanilla, self.mitigated)

    def as_dict(self) -> dict[str, Any]:
        return {
            "vanilla": self.vanilla.as_dict(),
            "mitigated": self.mitigated.as_dict(),
            "trigger_detection": {"tpr": self.tpr, "tpr_when_f_fooled": self.tpr_when_f_fooled, "fpr": self.fpr,
                                  "fpr_all_clean": self.fpr_all_clean},
            "detected_targets": self.detected_targets,
            "true_targets": self.true_targets,
            "der": self.der,
            "per_source_class": [p.as_dict() for p in self.per_source_class],
            "outputs_identical_to_f_on_clean": self.outputs_identical_to_f_on_clean,
            "attack": self.attack.model_dump(),
            "n_test": self.n_test,
            "n_triggered": self.n_triggered,
            "bundle_version": self.bundle_version,
        }


def der(vanilla: AttackMetrics, mitigated: AttackMetrics) -> float | None:
    """BackdoorBench's defence effectiveness rating: (max(0, dASR) - max(0, dACC) + 1) / 2."""
    if vanilla.asr is None or mitigated.asr is None:
        return None
    return (max(0.0, vanilla.asr - mitigated.asr) - max(0.0, vanilla.acc - mitigated.acc) + 1) / 2


def route_all(bundle: LoadedBundle, x: torch.Tensor, batch_size: int = 500) -> RoutedBatch:
    """The gateway's routing rule over a whole set, in chunks."""
    device = next(bundle.classifier.parameters()).device
    parts = [bundle.router(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    return RoutedBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in
                         ("label", "original_label", "checked_by_twin", "trigger_detected", "confidence")))


def per_source_class(y: torch.Tensor, target: torch.Tensor, f_pred: torch.Tensor, routed: torch.Tensor
                     ) -> list[SourceClassResult]:
    out = []
    for c in y.unique().tolist():
        m = y == c
        out.append(SourceClassResult(int(c), sorted(set(target[m].tolist())), int(m.sum()),
                                     round(float((f_pred[m] == target[m]).float().mean()), 4),
                                     round(float((routed[m] == target[m]).float().mean()), 4),
                                     round(float((routed[m] == c).float().mean()), 4)))
    return out


def evaluate_bundle(bundle: LoadedBundle, attack: AttackSpec, test: ImageSet) -> Evaluation:
    device = next(bundle.classifier.parameters()).device
    k = bundle.manifest.model.num_classes
    x, y = test.x, test.y
    victims = attack.victims(y)
    xt = None
    if attack.kind != "none":
        trigger = build_trigger(attack, tuple(bundle.manifest.model.input.shape))
        xt = torch.cat([trigger(x[victims][i : i + 500]) for i in range(0, int(victims.sum()), 500)])
    van_clean = predict(bundle.classifier, x, device=device)
    routed_clean = route_all(bundle, x)
    van_trig = predict(bundle.classifier, xt, device=device) if xt is not None else None
    routed_trig = route_all(bundle, xt) if xt is not None else None

    def metrics(pred_clean: torch.Tensor, pred_trig: torch.Tensor | None) -> AttackMetrics:
        full = None
        if pred_trig is not None:  # attack_metrics expects a prediction for every test image
            full = torch.full_like(y, -1)
            full[victims] = pred_trig
        return attack_metrics(pred_clean, y, full, attack, k)

    targets = bundle.router.targets
    of_targets = torch.isin(y, torch.tensor(targets, dtype=y.dtype))
    tgt = attack.target_of(y[victims], k)
    fooled = (van_trig == tgt.to(van_trig.device)).cpu() if van_trig is not None else None
    return Evaluation(
        vanilla=metrics(van_clean, van_trig),
        mitigated=metrics(routed_clean.label, routed_trig.label if routed_trig is not None else None),
        tpr=float(routed_trig.trigger_detected.float().mean()) if routed_trig is not None and len(routed_trig) else None,
        tpr_when_f_fooled=float(routed_trig.trigger_detected[fooled].float().mean())
        if routed_trig is not None and fooled is not None and bool(fooled.any()) else None,
        fpr=float(routed_clean.trigger_detected[of_targets].float().mean()) if of_targets.any() else 0.0,
        fpr_all_clean=float(routed_clean.trigger_detected.float().mean()),
        detected_targets=targets,
        true_targets=sorted(set(tgt.tolist())) if attack.kind != "none" else [],
        attack=attack,
        n_test=len(y),
        n_triggered=int(victims.sum()) if attack.kind != "none" else 0,
        bundle_version=bundle.manifest.bundle_version,
        outputs_identical_to_f_on_clean=bool((routed_clean.label == van_clean).all()),
        per_source_class=per_source_class(y[victims], tgt, van_trig, routed_trig.label)
        if routed_trig is not None and van_trig is not None else [],
    )
