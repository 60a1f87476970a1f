"""One trigger model for the attack lab and the defence: the patch, perturbation and warp families.

``family(name)`` looks a family up by name, ``family_of(tensors)`` by its tensors, and
``Trigger(family, tensors)`` is one fixed trigger as a module. docs/method.md#trigger-families.
"""
from __future__ import annotations

from bna_gateway.mitigation.triggers.base import CandidateTriggers, Identity, Tensors, Trigger, TriggerFamily
from bna_gateway.mitigation.triggers.patch import PATCH, PatchFamily
from bna_gateway.mitigation.triggers.perturbation import PERTURBATION, PerturbationFamily
from bna_gateway.mitigation.triggers.warp import WARP, WarpFamily, identity_grid, pixel_scale, resample, sampling_grid

FAMILIES: dict[str, TriggerFamily] = {f.name: f for f in (PATCH, PERTURBATION, WARP)}


def family(name: str) -> TriggerFamily:
    """The family called ``name`` (patch, perturbation, warp)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown trigger family {name!r}: use one of {', '.join(FAMILIES)}") from None


def family_of(tensors: Tensors) -> TriggerFamily:
    """The family whose tensors these are (each family names its tensors differently)."""
    for fam in FAMILIES.values():
        if set(fam.tensor_names) <= set(tensors):
            return fam
    raise ValueError(f"tensors {sorted(tensors)} are no trigger of the families {', '.join(FAMILIES)}")


__all__ = [
    "CandidateTriggers", "FAMILIES", "Identity", "PATCH", "PERTURBATION", "PatchFamily", "PerturbationFamily",
    "Tensors", "Trigger", "TriggerFamily", "WARP", "WarpFamily", "family", "family_of", "identity_grid",
    "pixel_scale", "resample", "sampling_grid",
]
