"""What every trigger family defines, and the fixed-trigger module built from one.

A *trigger family* is one way to put a trigger into an image. Its tensors describe one trigger (or,
with a leading group dimension, one trigger per group of images):

- ``embed(x, tensors)``: images ``x`` [G or 1, B, C, H, W] in [0, 1] with group g's trigger embedded
  (tensors [G or 1, ...]; a single group broadcasts over the other side);
- ``size(tensors)`` [G]: how large each trigger is, the quantity detection's statistic is built on;
- ``strength``: the tensor that sets a trigger's strength (``None`` when it has none), scaled by
  ``scaled``: a minimal reverse-engineered trigger is the weakest copy of the real one, so detection
  calibrates it and BNA fits twins on stronger copies;
- ``candidates(shape, generators)``: one trainable trigger per generator (each group's random start is
  drawn from its own generator), the parametrisation reverse engineering optimises (``CandidateTriggers``);
- ``panels(tensors)``: pictures of one trigger for the detection report.

The attack lab builds its triggers from the same families (``Trigger``), so the backdoors we evaluate
and the triggers the defence estimates are embedded by one formula. docs/method.md describes them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Mapping, Sequence

import torch
from torch import nn

Tensors = Mapping[str, torch.Tensor]


class CandidateTriggers(nn.Module, ABC):
    """Trainable triggers of one family, optimised together (one per group of images).

    ``rows`` (a 1-D index tensor) restricts a call to some of the triggers, in that order: the groups
    still being optimised (converged ones drop out of the batch)."""

    family: TriggerFamily

    @abstractmethod
    def tensors(self, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The triggers as the family's plain tensors, differentiable in the parameters."""

    @abstractmethod
    def normalised_size(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[G] size scaled to about [0, 1] whatever the input shape, so one penalty schedule suits all."""

    def embed(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Group g's images ``x[g]`` ([G or 1, B, C, H, W]) with trigger g embedded."""
        return self.family.embed(x, self.tensors(rows))

    def size(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[G] the family's size of each trigger."""
        return self.family.size(self.tensors(rows))

    def snapshot(self, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The current triggers as plain tensors (detached copies)."""
        return {k: v.detach().clone() for k, v in self.tensors(rows).items()}


class TriggerFamily(ABC):
    """One way to embed a trigger; see the module docstring."""

    name: ClassVar[str]
    tensor_names: ClassVar[tuple[str, ...]]
    strength: ClassVar[str | None] = None

    @abstractmethod
    def embed(self, x: torch.Tensor, tensors: Tensors) -> torch.Tensor:
        """Images [G or 1, B, C, H, W] -> triggered images [G, B, C, H, W], in [0, 1]."""

    @abstractmethod
    def size(self, tensors: Tensors) -> torch.Tensor:
        """[G] size of each of the G triggers ``tensors`` (leading group dimension)."""

    @abstractmethod
    def candidates(self, shape: tuple[int, int, int], generators: Sequence[torch.Generator]) -> CandidateTriggers:
        """One trainable trigger per generator for images of ``shape`` (C, H, W); trigger i's random start
        is drawn from ``generators[i]`` alone, so it does not depend on which other triggers share the batch."""

    @abstractmethod
    def panels(self, tensors: Tensors) -> list[tuple[str, torch.Tensor]]:
        """Titled [C, H, W] pictures in [0, 1] of one trigger (no group dimension)."""

    @property
    def scalable(self) -> bool:
        return self.strength is not None

    def scaled(self, tensors: Tensors, factor: torch.Tensor | float) -> dict[str, torch.Tensor]:
        """The triggers at ``factor`` times their strength (a scalar, or [G]: one factor per trigger)."""
        if self.strength is None:
            raise ValueError(f"the {self.name} family has no strength to scale")
        value = tensors[self.strength]
        if isinstance(factor, torch.Tensor) and factor.dim() == 1:
            factor = factor.to(value.device, value.dtype).view(-1, *[1] * (value.dim() - 1))
        return {**tensors, self.strength: value * factor}


def randn_per_group(generators: Sequence[torch.Generator], *shape: int) -> torch.Tensor:
    """[len(generators), *shape] standard normal draws, row i from ``generators[i]``."""
    return torch.stack([torch.randn(*shape, generator=g) for g in generators])


class Trigger(nn.Module):
    """One fixed trigger of a family: ``forward(x)`` embeds it into a batch [N, C, H, W] of [0, 1] images.

    The attack lab's backdoors and the defence's estimates alike; the tensors are buffers (they move
    with ``.to(device)`` and never train)."""

    def __init__(self, family: TriggerFamily, tensors: Tensors) -> None:
        super().__init__()
        missing = set(family.tensor_names) - set(tensors)
        if missing:
            raise ValueError(f"a {family.name} trigger needs the tensors {sorted(missing)}")
        self.family = family
        for name in family.tensor_names:
            self.register_buffer(name, tensors[name].float())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.family.tensor_names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = {k: v.unsqueeze(0) for k, v in self.tensors().items()}
        return self.family.embed(x.unsqueeze(0), batched)[0]

    def size(self) -> float:
        return float(self.family.size({k: v.unsqueeze(0) for k, v in self.tensors().items()})[0])

    def scaled(self, factor: float) -> "Trigger":
        return Trigger(self.family, self.family.scaled(self.tensors(), factor))


class Identity(nn.Module):
    """No trigger (a clean model's attack): images pass through unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
