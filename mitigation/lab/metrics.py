"""ACC / ASR / SIA of a classifier and batched prediction helpers."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from bna_gateway.mitigation.lab.attacks import AttackSpec


@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor] | nn.Module, x: torch.Tensor, batch_size: int = 500,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Labels of ``fn`` on ``x`` (``fn`` returns logits), in chunks that fit memory."""
    out = []
    for i in range(0, len(x), batch_size):
        out.append(fn(x[i : i + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


@dataclass
class AttackMetrics:
    acc: float
    asr: float | None
    sia: float | None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def attack_metrics(pred_clean: torch.Tensor, y: torch.Tensor, pred_trig: torch.Tensor | None,
                   spec: AttackSpec, num_classes: int) -> AttackMetrics:
    """ACC on clean images; ASR and SIA on triggered images of the attack's victims."""
    acc = float((pred_clean == y).float().mean())
    if pred_trig is None or spec.kind == "none":
        return AttackMetrics(acc, None, None)
    victims = spec.victims(y)
    tgt = spec.target_of(y, num_classes)
    asr = float((pred_trig[victims] == tgt[victims]).float().mean())
    sia = float((pred_trig[victims] == y[victims]).float().mean())
    return AttackMetrics(acc, asr, sia)
