"""What the peers share: BackdoorBench's fine-tuning loop scaled to a small clean set, and detector thresholds.

Fine-tuning (FT, and the tuning stage of FP, NC and FT-SAM). BackdoorBench's defaults
(``config/defense/ft/config.yaml`` in SCLBD/BackdoorBench, the same in ``fp``, ``nc``, ``ft-sam``):
SGD, lr 0.01, momentum 0.9, weight decay 5e-4, ``CosineAnnealingLR`` over 100 epochs, batch 256 on
``ratio: 0.05`` of CIFAR-10's training set, i.e. 2,500 images: 10 steps an epoch, 1,000 steps in all.
Scaled to our clean sets (500 images at 50 per class, 100 at 10 per class): the same 100 epochs and
the same 10 steps an epoch, so the batch is a tenth of the clean set, but never under 32 images (a
BatchNorm layer in training mode normalises by the batch: 10 images would change what it does more
than the defence does). 500 images: batch 50, 1,000 steps; 100 images: batch 32, 400 steps.

The learning rate is scaled to the *model* instead: BackdoorBench fine-tunes at 0.01, the rate it trains
its attacked models at (``config/attack/prototype/cifar10.yaml``: SGD lr 0.01, cosine), and fine-tuning's
effect on a backdoor depends on its rate relative to training's. The attack lab trains at a OneCycle peak
of 0.1 (``bna train --lr``, default 0.1), so the peers fine-tune at 0.1. At BackdoorBench's absolute 0.01
(``bench/peers.py --finetune-lr 0.01``) FT, FP and FT-SAM left BadNet and Blend in place on our models
at 50 images per class (docs/peers.md has both runs). No data
augmentation: BackdoorBench's CIFAR crop-and-flip does not fit digits, and the attack lab trains
digits without it. BatchNorm layers run in training mode while tuning, as in BackdoorBench.

Detectors. Each scores an input (higher: more likely triggered). The threshold is set on the
defender's clean images (the same ones BNA is given) at a false-alarm budget of **5 %**
(``FALSE_ALARM_BUDGET``): the smallest score threshold that flags at most 5 % of them.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

FALSE_ALARM_BUDGET = 0.05

# one optimisation step: (model, optimiser, images, labels) -> loss
Step = Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FinetuneConfig:
    """BackdoorBench's fine-tuning defaults (see the module docstring for the scaling)."""

    epochs: int = 100
    lr: float = 0.1  # BackdoorBench's 0.01 times (our training lr 0.1 / its training lr 0.01)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    steps_per_epoch: int = 10  # BackdoorBench: 2,500 images / batch 256
    min_batch: int = 32
    label_smoothing: float = 0.0
    seed: int = 0
    progress: bool = False

    def batch_size(self, n: int) -> int:
        return min(n, max(self.min_batch, math.ceil(n / self.steps_per_epoch)))


@dataclass
class Repaired:
    """What a model-level defence returns: the repaired copy and what it did (for the details file)."""

    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


def tuning_info(cfg: FinetuneConfig, n: int) -> dict[str, Any]:
    bs = cfg.batch_size(n)
    return {"epochs": cfg.epochs, "lr": cfg.lr, "batch": bs, "steps": cfg.epochs * math.ceil(n / bs)}


def clone(model: nn.Module) -> nn.Module:
    """A trainable copy; the model under test is never modified."""
    out = copy.deepcopy(model)
    out.requires_grad_(True)
    return out


def sgd_step(cfg: FinetuneConfig) -> Step:
    def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, step: Step | None = None,
             desc: str = "finetune") -> nn.Module:
    """Tune ``model`` in place on ``(x, y)`` with BackdoorBench's loop (SGD, cosine per epoch); eval mode after."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    step = step or sgd_step(cfg)
    n, bs = len(y), cfg.batch_size(len(y))
    device = next(model.parameters()).device
    model.train()
    bar = tqdm(total=cfg.epochs, desc=desc, unit="epoch", disable=not cfg.progress, leave=False)
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            if len(idx) < 2:  # a BatchNorm layer in training mode cannot normalise one image
                continue
            loss = step(model, opt, x[idx].to(device), y[idx].to(device))
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.3f}")
    bar.close()
    model.eval()
    return model


# ---------------------------------------------------------------- detectors
class Detector(Protocol):
    """A test-time input detector: ``fit`` on the defender's clean images, then ``score`` any input."""

    name: str
    forwards_per_input: int  # forward passes to classify *and* check one input (the plain prediction included)

    def fit(self, model: nn.Module, clean_x: torch.Tensor, clean_y: torch.Tensor) -> "Detector": ...

    def score(self, x: torch.Tensor) -> torch.Tensor: ...


def threshold_at_budget(clean_scores: torch.Tensor, budget: float = FALSE_ALARM_BUDGET) -> float:
    """The smallest threshold ``t`` with ``mean(clean_scores > t) <= budget`` (ties never push it over)."""
    s = clean_scores.flatten().sort(descending=True).values
    k = int(math.floor(budget * len(s) + 1e-9))  # clean images we may flag
    return float(s[min(k, len(s) - 1)])


@dataclass
class Calibrated:
    """A fitted detector and its threshold on the defender's clean images."""

    detector: Detector
    threshold: float
    budget: float
    clean_flag_rate: float  # on the images the threshold was set on (<= budget)
    extra: dict[str, float] = field(default_factory=dict)

    def flag(self, x: torch.Tensor) -> torch.Tensor:
        return self.detector.score(x) > self.threshold


def calibrate(detector: Detector, model: nn.Module, clean_x: torch.Tensor, clean_y: torch.Tensor,
              budget: float = FALSE_ALARM_BUDGET) -> Calibrated:
    detector.fit(model, clean_x, clean_y)
    scores = detector.score(clean_x)
    t = threshold_at_budget(scores, budget)
    return Calibrated(detector, t, budget, float((scores > t).float().mean()))


@torch.no_grad()
def softmax_batches(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Softmax outputs of ``model`` (eval mode) on ``x``, in chunks."""
    model.eval()
    device = next(model.parameters()).device
    parts = [model(x[i : i + batch].to(device)).softmax(1).cpu() for i in range(0, len(x), batch)]
    return torch.cat(parts) if parts else torch.empty(0)
