"""FT-SAM: fine-tuning with sharpness-aware minimisation (Zhu, Wei, Zha & Wu, ICCV 2023).

Each step perturbs the weights towards higher loss within an adaptive (ASAM) ball of radius ``rho``,
``e_w = rho * w**2 * g / || |w| * g ||``, takes the gradient there, restores the weights and steps the
base optimiser with it; labels are smoothed. BatchNorm running statistics are updated by the first of
the two forward passes only.

Hyper-parameters: BackdoorBench's ``ft-sam`` defaults (SCLBD/BackdoorBench ``config/defense/ft-
sam/config.yaml`` and ``defense/ft-sam.py``: ``rho_max = rho_min = 2.0``, adaptive SAM on,
``label_smoothing 0.1``, base optimiser SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine annealing,
100 epochs, batch 256 on 5 % of CIFAR-10), the tuning scaled as ``common.FinetuneConfig`` says (lr 0.1
for models trained at 0.1). Two forward and backward passes a step: twice the cost of ``ft``. Seeded by
``FinetuneConfig.seed``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from peers.common import FinetuneConfig, Repaired, Step, clone, finetune, tuning_info


@dataclass(frozen=True)
class SamConfig:
    rho: float = 2.0
    adaptive: bool = True
    label_smoothing: float = 0.1


def _bn_momentum(model: nn.Module, value: float | None) -> dict[nn.Module, float | None]:
    saved = {}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved[m] = m.momentum
            m.momentum = value
    return saved


def sam_step(cfg: SamConfig) -> Step:
    def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)

    def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, x, y)
        loss.backward()
        with torch.no_grad():
            live = [p for p in params if p.grad is not None]
            scaled = [(p.abs() * p.grad) if cfg.adaptive else p.grad for p in live]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
            shifts = []
            for p in live:
                e = (p.pow(2) if cfg.adaptive else 1.0) * p.grad * (cfg.rho / (norm + 1e-12))
                p.add_(e)
                shifts.append(e)
        opt.zero_grad(set_to_none=True)
        saved = _bn_momentum(model, 0.0)  # the perturbed pass leaves BN's running statistics alone
        loss_of(model, x, y).backward()
        for m, momentum in saved.items():
            m.momentum = momentum
        with torch.no_grad():
            for p, e in zip(live, shifts):
                p.sub_(e)
        opt.step()
        return loss.detach()

    return step


def defend(model: nn.Module, clean_x: torch.Tensor, clean_y: torch.Tensor,
           cfg: FinetuneConfig = FinetuneConfig(), sam: SamConfig = SamConfig()) -> Repaired:
    """A copy of ``model`` fine-tuned with adaptive SAM."""
    tuned = replace(cfg, label_smoothing=sam.label_smoothing)
    out = finetune(clone(model), clean_x, clean_y, tuned, step=sam_step(sam), desc="ft_sam")
    return Repaired(out, {"rho": sam.rho, "adaptive": sam.adaptive, "label_smoothing": sam.label_smoothing,
                          **tuning_info(cfg, len(clean_y))})
