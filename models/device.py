"""Which torch device a job or the gateway runs on: one rule for both."""
from __future__ import annotations

import torch

AUTO = "auto"


def resolve_device(device: str | None = None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when a GPU is visible, else the CPU; otherwise the device named
    (``cpu``, ``cuda``, ``cuda:1``, ...). An unknown name is a ``ValueError`` that says what is accepted."""
    name = (device or AUTO).strip().lower()
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:  # e.g. 'gpu'
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
