"""HTTP response bodies (the *encode* stage's output), as docs/http.md fixes them."""
from __future__ import annotations

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    label: int = Field(description="the gateway's answer: the twin's label when a trigger was detected, else f's")
    class_name: str = Field(description="name of `label`")
    trigger_detected: bool = Field(description="the twin disagreed with f: the image is taken to carry a trigger")
    original_label: int = Field(description="f's label")
    checked_by_twin: bool = Field(description="f's label is a detected target class, so its twin re-examined the image")
    confidence: float = Field(description="softmax probability of `label` (from the twin when it corrected f)")


class ClassifyResponse(BaseModel):
    request_id: str
    bundle_version: str
    predictions: list[Prediction]


class ErrorResponse(BaseModel):
    detail: str


class HealthResponse(BaseModel):
    status: str


class ModelSummary(BaseModel):
    bundle_version: str
    schema_version: int
    arch: str
    input_shape: list[int]
    classes: list[str]
    detected_targets: list[int]
    sources: dict[str, list[int]]
    twins: list[int]
    device: str
    max_batch_size: int
