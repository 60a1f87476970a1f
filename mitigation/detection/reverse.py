"""One batched optimisation that reverse-engineers a trigger for many (sources -> target) groups at once.

Each group ``g`` has a target class and a pool of clean images (one source class, or all of S(t)).
Every step draws ``images_per_group`` images of every group, embeds the group's candidate trigger,
and runs ONE forward/backward through the frozen model for all groups together. Lambda, the weight of
the trigger-size penalty, adapts per group (Neural Cleanse's schedule) so that attack success stays
above ``success_threshold`` while the trigger shrinks. The smallest successful trigger is kept.
docs/method.md#the-pair-stage.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bna_gateway.mitigation.detection.config import ReverseConfig
from bna_gateway.mitigation.triggers import CandidateTriggers, Tensors, TriggerFamily

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReverseResult:
    """The kept trigger of every group of one optimisation."""

    family: TriggerFamily
    size: torch.Tensor  # [G] size of the best successful trigger (inf when none succeeded)
    asr: torch.Tensor  # [G] attack success of the kept trigger on all of the group's images
    tensors: dict[str, torch.Tensor]  # best trigger per group, e.g. mask [G,1,H,W] + pattern [G,C,H,W]

    def one(self, i: int) -> dict[str, torch.Tensor]:
        """Group ``i``'s trigger tensors (no group dimension)."""
        return {k: v[i] for k, v in self.tensors.items()}


def group_index(y: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """[G, L] matrix of image indices per group (classes pooled), cycled to a common length L."""
    pools = [torch.cat([(y == c).nonzero(as_tuple=True)[0] for c in classes]) for classes in groups]
    if any(p.numel() == 0 for p in pools):
        empty = [g for g, p in zip(groups, pools) if p.numel() == 0]
        raise ValueError(f"no clean images for source classes {empty}")
    length = max(p.numel() for p in pools)
    return torch.stack([p.repeat((length + p.numel() - 1) // p.numel())[:length] for p in pools])


def image_targets(targets: torch.Tensor, idx: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """[G, B] target of every image ``idx[g, b]``: ``targets[g]`` ([G]), or ``targets[g, y[idx]]`` when
    ``targets`` is a per-class mapping [G, K] (one trigger that sends each class somewhere else: all-to-all)."""
    if targets.dim() == 1:
        return targets.to(idx.device).unsqueeze(1).expand(idx.shape)
    if y is None:
        raise ValueError("per-class targets need the labels y")
    return targets.to(idx.device).gather(1, y.to(idx.device)[idx])


class LambdaSchedule:
    """Neural Cleanse's per-group weight of the size penalty: 0 until a group first succeeds, then
    ``init_lambda``; raised after ``patience`` successful steps in a row, lowered after as many failures."""

    def __init__(self, n_groups: int, cfg: ReverseConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.value = torch.zeros(n_groups, device=device)
        self.started = torch.zeros(n_groups, dtype=torch.bool, device=device)
        self.up = torch.zeros(n_groups, device=device)
        self.down = torch.zeros(n_groups, device=device)

    def update(self, ok: torch.Tensor) -> None:
        cfg = self.cfg
        newly = ok & ~self.started
        self.value = torch.where(newly, torch.full_like(self.value, cfg.init_lambda), self.value)
        self.started |= ok
        self.up = torch.where(ok & self.started, self.up + 1, torch.zeros_like(self.up))
        self.down = torch.where(~ok & self.started, self.down + 1, torch.zeros_like(self.down))
        raise_, lower = self.up >= cfg.patience, self.down >= cfg.patience
        self.value = torch.where(raise_, self.value * cfg.lambda_up, self.value)
        self.value = torch.where(lower, self.value / cfg.lambda_down, self.value)
        self.up = torch.where(raise_, torch.zeros_like(self.up), self.up)
        self.down = torch.where(lower, torch.zeros_like(self.down), self.down)


class BestTriggers:
    """The smallest trigger of each group that succeeded on its step's images (Neural Cleanse keeps
    the trigger after the step whose success it measured; docs/method.md explains why we keep that order)."""

    def __init__(self, candidates: CandidateTriggers, n_groups: int, device: torch.device) -> None:
        self.size = torch.full((n_groups,), float("inf"), device=device)
        self.tensors = {k: v.clone() for k, v in candidates.snapshot().items()}

    def offer(self, candidates: CandidateTriggers, ok: torch.Tensor) -> None:
        size = candidates.size()
        better = ok & (size < self.size)
        if better.any():
            snap = candidates.snapshot()
            for k in self.tensors:
                self.tensors[k][better] = snap[k][better]
            self.size = torch.where(better, size, self.size)

    def finish(self, candidates: CandidateTriggers) -> dict[str, torch.Tensor]:
        """Groups that never succeeded keep their final trigger, for the record."""
        never = torch.isinf(self.size)
        if never.any():
            snap = candidates.snapshot()
            for k in self.tensors:
                self.tensors[k][never] = snap[k][never]
        return self.tensors


def _optimise_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, targets: torch.Tensor,
                    family: TriggerFamily, cfg: ReverseConfig, g: torch.Generator, bar: tqdm) -> dict[str, torch.Tensor]:
    """``cfg.steps`` batched steps over the groups of ``index``; the kept trigger of every group."""
    device = x.device
    n_groups, length = index.shape
    b = min(cfg.images_per_group, length)
    cand = family.candidates(n_groups, tuple(x.shape[1:]), g).to(device)
    opt = torch.optim.Adam(cand.parameters(), lr=cfg.lr(family), betas=(0.5, 0.9))
    lam = LambdaSchedule(n_groups, cfg, device)
    best = BestTriggers(cand, n_groups, device)
    order = torch.rand(n_groups, length, generator=g).argsort(dim=1).to(device)  # each group's own permutation
    rows = torch.arange(n_groups, device=device).unsqueeze(1)
    index = index.to(device)
    for step in range(cfg.steps):
        idx = index[rows, order[:, (torch.arange(b, device=device) + step * b) % length]]  # [G, B]
        tgt = image_targets(targets, idx, y).flatten()
        logits = model(cand.embed(x[idx]).flatten(0, 1))
        ce = F.cross_entropy(logits, tgt, reduction="none").view(n_groups, b).mean(1)
        loss = (ce + lam.value * cand.normalised_size()).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # success measured before the step, the trigger kept after it (NC's order)
            ok = (logits.argmax(1) == tgt).float().view(n_groups, b).mean(1) >= cfg.success_threshold
            best.offer(cand, ok)
            lam.update(ok)
        bar.update(1)
    return best.finish(cand)


def _run_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, targets: torch.Tensor,
               family: TriggerFamily, cfg: ReverseConfig, g: torch.Generator, bar: tqdm) -> ReverseResult:
    best = _optimise_chunk(model, x, y, index, targets, family, cfg, g, bar)
    asr = success_rate(model, x, index, targets, family, best, cfg, y)
    if family.scalable and cfg.calibrate_scales:
        best, asr = calibrate(model, x, y, index, targets, best, asr, cfg, family)
    size = family.size(best)
    # a trigger that does not really succeed on the whole pool is not a small trigger
    size = torch.where(asr >= 0.5, size, torch.full_like(size, float("inf")))
    return ReverseResult(family, size.cpu(), asr.cpu(), {k: v.cpu() for k, v in best.items()})


def calibrate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, targets: torch.Tensor,
              best: dict[str, torch.Tensor], asr: torch.Tensor, cfg: ReverseConfig, family: TriggerFamily
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each group's trigger by the smallest of ``cfg.calibrate_scales`` that reaches
    ``success_threshold`` on its pool (unscaled when none does, or when it already does)."""
    done = asr >= cfg.success_threshold
    scale = torch.ones_like(asr)
    for factor in sorted(f for f in cfg.calibrate_scales if f > 1.0):
        if bool(done.all()):
            break
        a = success_rate(model, x, index, targets, family, family.scaled(best, factor), cfg, y)
        take = ~done & (a >= cfg.success_threshold)
        scale = torch.where(take, torch.full_like(scale, factor), scale)
        asr = torch.where(take, a, asr)
        done |= take
    return family.scaled(best, scale), asr


@torch.no_grad()
def prediction_fractions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, family: TriggerFamily,
                         tensors: Tensors, cfg: ReverseConfig) -> torch.Tensor:
    """[T, K, K]: for each of T triggers and each true class c, the fraction of c's images (with the
    trigger embedded) that the model assigns to each class. Triggers and images batched, chunked."""
    device = x.device
    n_trig = next(iter(tensors.values())).shape[0]
    counts = torch.zeros(n_trig, num_classes, num_classes, device=device)
    onehot_y = F.one_hot(y.to(device), num_classes).float()  # [N, K]
    per_pass = max(1, cfg.max_images_per_pass // max(1, n_trig))
    for start in range(0, x.shape[0], per_pass):
        xt = family.embed(x[start : start + per_pass].unsqueeze(0), tensors)  # [T, B, C, H, W]
        pred = model(xt.flatten(0, 1)).argmax(1).view(n_trig, -1)
        counts += torch.einsum("nc,tnk->tck", onehot_y[start : start + per_pass], F.one_hot(pred, num_classes).float())
    return counts / onehot_y.sum(0).clamp(min=1).view(1, -1, 1)


@torch.no_grad()
def success_rate(model: nn.Module, x: torch.Tensor, index: torch.Tensor, targets: torch.Tensor, family: TriggerFamily,
                 tensors: Tensors, cfg: ReverseConfig, y: torch.Tensor | None = None) -> torch.Tensor:
    """Attack success of each group's trigger on every image of its pool (batched, chunked). ``targets``:
    [G], or a per-class mapping [G, K] (then ``y`` gives each image's class)."""
    device = x.device
    n_groups, length = index.shape
    hits = torch.zeros(n_groups, device=device)
    cols_per_pass = max(1, cfg.max_images_per_pass // n_groups)
    for start in range(0, length, cols_per_pass):
        idx = index[:, start : start + cols_per_pass].to(device)
        pred = model(family.embed(x[idx], tensors).flatten(0, 1)).argmax(1).view(n_groups, -1)
        hits += (pred == image_targets(targets, idx, y)).float().sum(1)
    return hits / length


def reverse_engineer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, groups: list[list[int]],
                     targets: list[int] | torch.Tensor, family: TriggerFamily, cfg: ReverseConfig,
                     desc: str = "reverse") -> ReverseResult:
    """Reverse-engineer one trigger per group (sources ``groups[i]`` -> ``targets[i]``), batched.

    ``targets`` may also be a per-class mapping [G, K]: group i's images of class c go to ``targets[i, c]``.
    Groups are processed in chunks so that one pass holds at most ``max_images_per_pass`` images.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    index = group_index(y.cpu(), groups)
    tgt = torch.as_tensor(targets, dtype=torch.long)
    per_chunk = max(1, cfg.max_images_per_pass // max(1, min(cfg.images_per_group, index.shape[1])))
    g = torch.Generator().manual_seed(cfg.seed)
    n_chunks = (len(groups) + per_chunk - 1) // per_chunk
    results = []
    with tqdm(total=cfg.steps * n_chunks, desc=desc, unit="step", disable=not cfg.progress) as bar:
        for s in range(0, len(groups), per_chunk):
            results.append(_run_chunk(model, x, y, index[s : s + per_chunk], tgt[s : s + per_chunk], family, cfg, g,
                                      bar))
    return ReverseResult(
        family,
        torch.cat([r.size for r in results]),
        torch.cat([r.asr for r in results]),
        {k: torch.cat([r.tensors[k] for r in results]) for k in results[0].tensors},
    )
