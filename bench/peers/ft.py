"""FT: plain fine-tuning of the whole network on the defender's clean images.

Hyper-parameters: BackdoorBench's ``ft`` defaults (SCLBD/BackdoorBench ``config/defense/ft/config.yaml``:
SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine annealing, 100 epochs, batch 256 on 2,500 clean
images), scaled as ``common.FinetuneConfig`` says: 100 epochs of 10 steps, batch = a tenth of the clean
set (at least 32), lr 0.1 (BackdoorBench's 0.01 is the rate its models are trained at; ours are trained
at 0.1). Seeded by ``FinetuneConfig.seed``.
"""
from __future__ import annotations

import torch
from torch import nn

from peers.common import FinetuneConfig, Repaired, clone, finetune, tuning_info


def defend(model: nn.Module, clean_x: torch.Tensor, clean_y: torch.Tensor,
           cfg: FinetuneConfig = FinetuneConfig()) -> Repaired:
    """A fine-tuned copy of ``model`` (``model`` itself is left as it is)."""
    return Repaired(finetune(clone(model), clean_x, clean_y, cfg, desc="ft"), tuning_info(cfg, len(clean_y)))
