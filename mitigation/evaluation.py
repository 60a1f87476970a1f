"""Evaluate a bundle against an attack: ACC / ASR / SIA of f and of the gateway's routing, TPR / FPR, DER."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bna_gateway.models.bundle import LoadedBundle
from bna_gateway.models.twins import RoutedBatch
from bna_gateway.mitigation.attacks import AttackSpec, build_trigger
from bna_gateway.mitigation.datasets import ImageSet
from bna_gateway.mitigation.metrics import attack_metrics, predict


def route_all(bundle: LoadedBundle, x: torch.Tensor, batch_size: int = 500) -> RoutedBatch:
    """The gateway's routing rule over a whole set, in chunks."""
    device = next(bundle.classifier.parameters()).device
    parts = [bundle.router(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    return RoutedBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in
                         ("label", "original_label", "checked_by_twin", "trigger_detected", "confidence")))


def der(vanilla: dict[str, Any], mitigated: dict[str, Any]) -> float | None:
    """BackdoorBench's defence effectiveness rating: (max(0, dASR) - max(0, dACC) + 1) / 2."""
    if vanilla.get("asr") is None or mitigated.get("asr") is None:
        return None
    d_asr = vanilla["asr"] - mitigated["asr"]
    d_acc = vanilla["acc"] - mitigated["acc"]
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1) / 2


def _per_source_class(y: torch.Tensor, target: torch.Tensor, f_pred: torch.Tensor, routed: torch.Tensor
                      ) -> list[dict[str, Any]]:
    """ASR of f and of the gateway, and the gateway's SIA, per true class of the triggered images."""
    out = []
    for c in y.unique().tolist():
        m = y == c
        out.append({"class": int(c), "targets": sorted(set(target[m].tolist())), "n": int(m.sum()),
                    "f_asr": round(float((f_pred[m] == target[m]).float().mean()), 4),
                    "asr": round(float((routed[m] == target[m]).float().mean()), 4),
                    "sia": round(float((routed[m] == c).float().mean()), 4)})
    return out


@dataclass
class Evaluation:
    doc: dict[str, Any]


def evaluate_bundle(bundle: LoadedBundle, attack: AttackSpec, test: ImageSet) -> dict[str, Any]:
    device = next(bundle.classifier.parameters()).device
    k = bundle.manifest.model.num_classes
    x, y = test.x, test.y
    trigger = build_trigger(attack, tuple(bundle.manifest.model.input.shape))
    victims = attack.victims(y)
    xt = torch.cat([trigger(x[victims][i : i + 500]) for i in range(0, int(victims.sum()), 500)]) if attack.kind != "none" else None

    f = bundle.classifier
    van_clean = predict(f, x, device=device)
    van_trig = predict(f, xt, device=device) if xt is not None else None
    routed_clean = route_all(bundle, x)
    routed_trig = route_all(bundle, xt) if xt is not None else None

    def metrics(pc: torch.Tensor, pt: torch.Tensor | None) -> dict[str, Any]:
        # attack_metrics expects predictions for every test image; spread victims' predictions back
        full_t = None
        if pt is not None:
            full_t = torch.full_like(y, -1)
            full_t[victims] = pt
        return attack_metrics(pc, y, full_t, attack, k).as_dict()

    vanilla = metrics(van_clean, van_trig)
    mitigated = metrics(routed_clean.label, routed_trig.label if routed_trig is not None else None)
    targets = bundle.router.targets
    clean_of_targets = torch.isin(y, torch.tensor(targets, dtype=y.dtype)) if targets else torch.zeros_like(y, dtype=torch.bool)
    fpr = float(routed_clean.trigger_detected[clean_of_targets].float().mean()) if clean_of_targets.any() else 0.0
    tpr = float(routed_trig.trigger_detected.float().mean()) if routed_trig is not None and len(routed_trig) else None
    true_targets = sorted(set(attack.target_of(y[victims], k).tolist())) if attack.kind != "none" else []
    per_class = _per_source_class(y[victims], attack.target_of(y[victims], k), van_trig, routed_trig.label) \
        if routed_trig is not None and van_trig is not None else []
    return {
        "vanilla": vanilla,
        "mitigated": mitigated,
        "trigger_detection": {"tpr": tpr, "fpr": fpr,
                              "fpr_all_clean": float(routed_clean.trigger_detected.float().mean())},
        "detected_targets": targets,
        "true_targets": true_targets,
        "der": der(vanilla, mitigated),
        "per_source_class": per_class,
        "outputs_identical_to_f_on_clean": bool((routed_clean.label == van_clean).all()),
        "attack": attack.model_dump(),
        "n_test": len(y),
        "n_triggered": int(victims.sum()) if attack.kind != "none" else 0,
        "bundle_version": bundle.manifest.bundle_version,
    }
