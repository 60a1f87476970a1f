"""FP: fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018), as BackdoorBench runs it, then fine-tuning.

1. Forward the defender's clean images and record the input of the network's last linear layer
   (ResNet-18: the pooled ``layer4`` channels, 128 at width 16); sort channels by mean activation.
2. Prune (mask the linear layer's weights of) the least active channels, ``ceil(1 %)`` of them at a
   time, while clean accuracy stays within 10 % (relative) of the unpruned model's.
3. Fine-tune the pruned network (mask kept) as ``ft`` does.

Hyper-parameters: BackdoorBench's ``fp`` defaults (SCLBD/BackdoorBench
``config/defense/fp/cifar10.yaml``: ``once_prune_ratio 0.01``, ``acc_ratio 0.1``, then SGD / cosine / 100
epochs as for ``ft``), with the fine-tuning scaled as ``common.FinetuneConfig`` says (lr 0.1 for models
trained at 0.1). One deliberate difference: BackdoorBench measures the accuracy that stops the pruning on
the *test* split; a defender has only its clean set, so here it is measured on the defender's clean
images. Seeded by ``FinetuneConfig.seed``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils import prune

from peers.common import FinetuneConfig, Repaired, clone, finetune, tuning_info


@dataclass(frozen=True)
class PruneConfig:
    once_prune_ratio: float = 0.01
    acc_ratio: float = 0.1


@dataclass(frozen=True)
class PruneOutcome:
    pruned: int
    channels: int
    clean_acc_before: float
    clean_acc_after: float


def last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("fine-pruning needs a final nn.Linear layer")
    return linears[-1]


def channel_activity(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[C] mean activation of each input channel of the last linear layer over ``x`` (the pruning order)."""
    return _features(model, last_linear(model), x).mean(0)


@torch.no_grad()
def _features(model: nn.Module, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The inputs of ``layer`` for every image of ``x`` (eval mode), [N, C]."""
    feats: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach().flatten(1).cpu()))
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, len(x), 500):
            model(x[i : i + 500].to(device))
    finally:
        hook.remove()
    return torch.cat(feats)


def prune_mask(model: nn.Module, clean_x: torch.Tensor, clean_y: torch.Tensor,
               cfg: PruneConfig = PruneConfig()) -> tuple[torch.Tensor, PruneOutcome]:
    """Channel mask (1 keep, 0 pruned) over the last linear layer's inputs, chosen as BackdoorBench does."""
    layer = last_linear(model)
    feats = _features(model, layer, clean_x)
    order = feats.mean(0).argsort()  # least active first
    w, b = layer.weight.detach().cpu(), layer.bias.detach().cpu() if layer.bias is not None else None

    def acc(mask: torch.Tensor) -> float:
        logits = (feats * mask) @ w.T + (b if b is not None else 0)
        return float((logits.argmax(1) == clean_y.cpu()).float().mean())

    channels = feats.shape[1]
    keep = torch.ones(channels)
    acc0 = acc(keep)
    best, best_acc = keep.clone(), acc0
    for n in range(0, channels, math.ceil(channels * cfg.once_prune_ratio)):
        mask = torch.ones(channels)
        mask[order[:n]] = 0
        a = acc(mask)
        if abs(a - acc0) / max(acc0, 1e-12) < cfg.acc_ratio:
            best, best_acc = mask, a
        else:
            break
    return best, PruneOutcome(int((best == 0).sum()), channels, acc0, best_acc)


def defend(model: nn.Module, clean_x: torch.Tensor, clean_y: torch.Tensor,
           cfg: FinetuneConfig = FinetuneConfig(), prune_cfg: PruneConfig = PruneConfig()) -> Repaired:
    """A pruned and fine-tuned copy of ``model``, and how many channels went."""
    out = clone(model)
    mask, outcome = prune_mask(out, clean_x, clean_y, prune_cfg)
    layer = last_linear(out)
    prune.custom_from_mask(layer, "weight", mask.view(1, -1).expand_as(layer.weight).to(layer.weight.device))
    finetune(out, clean_x, clean_y, cfg, desc="fp")
    prune.remove(layer, "weight")  # the zeros stay, the re-parametrisation goes
    return Repaired(out, {**asdict(outcome), **tuning_info(cfg, len(clean_y))})
