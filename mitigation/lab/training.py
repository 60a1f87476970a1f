"""Train a clean or poisoned classifier (the attack lab's model factory)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bna_gateway.mitigation.lab.attacks import AttackSpec, build_trigger, wanet_noise
from bna_gateway.mitigation.lab.datasets import Dataset
from bna_gateway.mitigation.lab.metrics import AttackMetrics, attack_metrics, predict

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 12
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    seed: int = 0
    augment: bool = False  # random crop (+ flip for natural images); off for digits
    flip: bool = False
    device: str = "cpu"
    progress: bool = True


def _augment(x: torch.Tensor, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Random 2-pixel-padded crop (one shift per batch row, done as one gather) and optional flip."""
    n, c, h, w = x.shape
    pad = 2
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    xp = xp.gather(2, rows.to(x.device))
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, c, h, w)
    out = xp.gather(3, cols.to(x.device))
    if flip:
        f = torch.rand(n, generator=g) < 0.5
        out[f] = out[f].flip(3)
    return out


def train_classifier(model: nn.Module, data: Dataset, spec: AttackSpec, cfg: TrainConfig) -> tuple[nn.Module, AttackMetrics, float]:
    """Train ``model`` (a ``Classifier``: images in [0, 1]) on ``data.train`` poisoned per ``spec``.

    Returns the model, held-out metrics and the training time in seconds.
    """
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model.to(device)
    x_all, y_all = data.train.x, data.train.y
    k = data.num_classes
    trigger = build_trigger(spec, tuple(data.input.shape)).to(device)
    poisoned = torch.zeros(len(y_all), dtype=torch.bool)
    if spec.kind != "none":
        cand = spec.victims(y_all).nonzero(as_tuple=True)[0]
        n_poison = int(round(spec.poison_rate * len(cand)))
        poisoned[cand[torch.randperm(len(cand), generator=g)[:n_poison]]] = True
    cross = torch.zeros_like(poisoned)
    if spec.kind == "wanet":  # noise mode: warped-with-jitter images keep their true label
        rest = (~poisoned).nonzero(as_tuple=True)[0]
        n_cross = int(round(spec.poison_rate * spec.resolved_params()["cross_ratio"] * len(y_all)))
        cross[rest[torch.randperm(len(rest), generator=g)[:n_cross]]] = True
    y_poison_target = spec.target_of(y_all, k)

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(y_all) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.25)
    start = time.perf_counter()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="train", unit="step", disable=not cfg.progress)
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(y_all), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb = x_all[idx].to(device)
            yb = y_all[idx].to(device)
            if cfg.augment:
                xb = _augment(xb, cfg.flip, g)
            pb = poisoned[idx].to(device)
            if pb.any():
                xb[pb] = trigger(xb[pb])
                yb[pb] = y_poison_target[idx].to(device)[pb]
            cb = cross[idx].to(device)
            if cb.any():
                xb[cb] = wanet_noise(trigger, xb[cb], g)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    metrics = evaluate_attack(model, data, spec, trigger, device)
    log.info("trained in %.1f s: %s", seconds, metrics)
    return model, metrics, seconds


def evaluate_attack(model: nn.Module, data: Dataset, spec: AttackSpec, trigger: nn.Module,
                    device: torch.device | str = "cpu") -> AttackMetrics:
    x, y = data.test.x, data.test.y
    pred_clean = predict(model, x, device=device)
    pred_trig = None
    if spec.kind != "none":
        trig = trigger.cpu()
        pred_trig_all = predict(model, trig(x), device=device)
        pred_trig = pred_trig_all
    return attack_metrics(pred_clean, y, pred_trig, spec, data.num_classes)
