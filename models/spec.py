"""What a model directory and a bundle say about the network: architecture, input, normalisation."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator


class InputSpec(BaseModel):
    """Input the network expects: images scaled to [0, 1], then ``(x - mean) / std`` per channel."""

    shape: tuple[int, int, int] = Field(description="C, H, W")
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @model_validator(mode="after")
    def _check(self) -> "InputSpec":
        c = self.shape[0]
        if c not in (1, 3):
            raise ValueError(f"input channels must be 1 or 3, got {c}")
        if min(self.shape) <= 0:
            raise ValueError(f"input shape must be positive, got {self.shape}")
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean and std need {c} values (one per channel), got {len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self

    @property
    def channels(self) -> int:
        return self.shape[0]


class DatasetRef(BaseModel):
    """How to reload the dataset a model was trained on (for evaluation's held-out split)."""

    name: str
    root: str | None = None
    clean_per_class: int = 50
    seed: int = 0


class ModelSpec(BaseModel):
    """Content of ``model.json`` and of the manifest's model section."""

    arch: str
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    input: InputSpec
    class_names: list[str]
    dataset: DatasetRef | None = None
    weights_file: str = "weights.safetensors"

    @field_validator("class_names")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError("a classifier needs at least two classes")
        return v

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
