"""One batched optimisation that reverse-engineers a trigger for many (sources -> target) groups at once.

Each group ``g`` has a target class and a pool of clean images (one source class, or all of S(t)).
Every step draws ``images_per_group`` images of every group, embeds the group's candidate trigger,
and runs ONE forward/backward through the frozen model for all groups together. Lambda, the weight of
the trigger-size penalty, adapts per group (Neural Cleanse's schedule) so that attack success stays
above ``success_threshold`` while the trigger shrinks. The smallest successful trigger is kept.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bna_gateway.mitigation.detection.triggers import STRENGTH, PairTriggers, make_triggers, warp_images, warp_size

log = logging.getLogger(__name__)


@dataclass
class ReverseConfig:
    steps: int = 300
    images_per_group: int = 6
    lr_patch: float = 0.1
    lr_perturbation: float = 0.02
    lr_warp: float = 0.05  # control-point displacement, pixels per step
    init_lambda: float = 0.05
    lambda_up: float = 1.5
    lambda_down: float = 1.5 ** 1.5
    patience: int = 5
    success_threshold: float = 0.9
    max_images_per_pass: int = 512
    seed: int = 0
    progress: bool = True
    # perturbation and warp families: scale each kept trigger by the smallest of these factors that makes it
    # succeed on ``success_threshold`` of its whole pool. A minimal perturbation (or warp) sits on the decision
    # boundary of the images it was fitted on; on a pool of several classes it may succeed on only half of
    # them, and comparing such sizes says little. Empty: off (the pair stage); the per-target re-estimate uses it.
    calibrate_scales: tuple[float, ...] = ()


@dataclass
class ReverseResult:
    family: str
    size: torch.Tensor  # [G] size of the best successful trigger (inf when none succeeded)
    asr: torch.Tensor  # [G] attack success of the kept trigger on all of the group's images
    tensors: dict[str, torch.Tensor]  # best trigger per group, e.g. mask [G,1,H,W] + pattern [G,C,H,W]


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


def _run_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, targets: torch.Tensor,
               family: str, cfg: ReverseConfig, g: torch.Generator, bar: tqdm) -> ReverseResult:
    device = x.device
    n_groups, length = index.shape
    b = min(cfg.images_per_group, length)
    trig = make_triggers(family, n_groups, tuple(x.shape[1:]), g).to(device)
    lr = {"patch": cfg.lr_patch, "perturbation": cfg.lr_perturbation, "warp": cfg.lr_warp}[family]
    opt = torch.optim.Adam(trig.parameters(), lr=lr, betas=(0.5, 0.9))
    lam = torch.zeros(n_groups, device=device)  # 0 until the group first succeeds (Neural Cleanse)
    started = torch.zeros(n_groups, dtype=torch.bool, device=device)
    up = torch.zeros(n_groups, device=device)
    down = torch.zeros(n_groups, device=device)
    best_size = torch.full((n_groups,), float("inf"), device=device)
    best = {k: v.clone() for k, v in trig.snapshot().items()}
    # each group walks its own random permutation of its pool
    order = torch.rand(n_groups, length, generator=g).argsort(dim=1).to(device)
    rows = torch.arange(n_groups, device=device).unsqueeze(1)
    for step in range(cfg.steps):
        cols = (torch.arange(b, device=device) + step * b) % length
        idx = index.to(device)[rows, order[:, cols]]  # [G, B]
        xb = x[idx]  # [G, B, C, H, W]
        tgt_rep = image_targets(targets, idx, y).flatten()
        xt = trig.embed(xb)
        logits = model(xt.flatten(0, 1))
        ce = F.cross_entropy(logits, tgt_rep, reduction="none").view(n_groups, b).mean(1)
        size_n = trig.normalised_size()
        loss = (ce + lam * size_n).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            # success is measured on the trigger before this step, and the one kept is the trigger after it
            # (Neural Cleanse's order). Keeping the measured one instead is exact, but it moves the pair stage:
            # on the chessboard model 4 of the 9 true pairs then stayed under the threshold. Whichever is kept,
            # its success on the whole pool is checked below (``asr``), and a failing one has no size.
            succ = (logits.argmax(1) == tgt_rep).float().view(n_groups, b).mean(1)
            ok = succ >= cfg.success_threshold
            size = trig.size()
            better = ok & (size < best_size)
            if better.any():
                snap = trig.snapshot()
                for k in best:
                    best[k][better] = snap[k][better]
                best_size = torch.where(better, size, best_size)
            newly = ok & ~started
            lam = torch.where(newly, torch.full_like(lam, cfg.init_lambda), lam)
            started |= ok
            up = torch.where(ok & started, up + 1, torch.zeros_like(up))
            down = torch.where(~ok & started, down + 1, torch.zeros_like(down))
            raise_ = up >= cfg.patience
            lower = down >= cfg.patience
            lam = torch.where(raise_, lam * cfg.lambda_up, lam)
            lam = torch.where(lower, lam / cfg.lambda_down, lam)
            up = torch.where(raise_, torch.zeros_like(up), up)
            down = torch.where(lower, torch.zeros_like(down), down)
        bar.update(1)
    # groups that never succeeded keep their final trigger, with its size, for the record
    never = torch.isinf(best_size)
    if never.any():
        snap = trig.snapshot()
        for k in best:
            best[k][never] = snap[k][never]
    asr = success_rate(model, x, index, targets, family, best, cfg, y)
    if family in STRENGTH and cfg.calibrate_scales:
        best, asr = _calibrate(model, x, y, index, targets, best, asr, cfg, family)
    size = _size_of(family, best)
    # a trigger that does not really succeed on the whole pool is not a small trigger
    size = torch.where(asr >= 0.5, size, torch.full_like(size, float("inf")))
    return ReverseResult(family, size.cpu(), asr.cpu(), {k: v.cpu() for k, v in best.items()})


def _calibrate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, targets: torch.Tensor,
               best: dict[str, torch.Tensor], asr: torch.Tensor, cfg: ReverseConfig, family: str = "perturbation"
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each group's perturbation (or warp field) by the smallest factor that reaches
    ``success_threshold`` on its pool."""
    key = STRENGTH[family]
    strength = best[key]
    done = asr >= cfg.success_threshold
    scale = torch.ones_like(asr)
    for factor in sorted(f for f in cfg.calibrate_scales if f > 1.0):
        if bool(done.all()):
            break
        a = success_rate(model, x, index, targets, family, {key: strength * factor}, cfg, y)
        take = ~done & (a >= cfg.success_threshold)
        scale = torch.where(take, torch.full_like(scale, factor), scale)
        asr = torch.where(take, a, asr)
        done |= take
    return {key: strength * scale.view(-1, *[1] * (strength.dim() - 1)).to(strength.device)}, asr


@torch.no_grad()
def prediction_fractions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, family: str,
                         tensors: dict[str, torch.Tensor], cfg: ReverseConfig) -> torch.Tensor:
    """[T, K, K]: for each of T triggers and each true class c, the fraction of c's images (with the
    trigger embedded) that the model assigns to each class. Triggers and images batched, chunked."""
    device = x.device
    n_trig = next(iter(tensors.values())).shape[0]
    counts = torch.zeros(n_trig, num_classes, num_classes, device=device)
    onehot_y = F.one_hot(y.to(device), num_classes).float()  # [N, K]
    per_pass = max(1, cfg.max_images_per_pass // max(1, n_trig))
    for start in range(0, x.shape[0], per_pass):
        xt = embed(family, tensors, x[start : start + per_pass].unsqueeze(0))  # [T, B, C, H, W]
        pred = model(xt.flatten(0, 1)).argmax(1).view(n_trig, -1)
        counts += torch.einsum("nc,tnk->tck", onehot_y[start : start + per_pass], F.one_hot(pred, num_classes).float())
    return counts / onehot_y.sum(0).clamp(min=1).view(1, -1, 1)


def embed(family: str, tensors: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
    """Stamp trigger g on images ``xb[g]`` ([G or 1, B, C, H, W]), for triggers given as plain tensors."""
    if family == "patch":
        m = tensors["mask"].to(xb.device).unsqueeze(1)
        return (1 - m) * xb + m * tensors["pattern"].to(xb.device).unsqueeze(1)
    if family == "warp":
        return warp_images(xb, tensors["flow"].to(xb.device))
    return (xb + tensors["delta"].to(xb.device).unsqueeze(1)).clamp(0, 1)


def _size_of(family: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if family == "patch":
        return tensors["mask"].flatten(1).sum(1)
    if family == "warp":
        return warp_size(tensors["flow"])
    return tensors["delta"].flatten(1).norm(dim=1)


@torch.no_grad()
def success_rate(model: nn.Module, x: torch.Tensor, index: torch.Tensor, targets: torch.Tensor, family: str,
                 tensors: dict[str, torch.Tensor], cfg: ReverseConfig, y: torch.Tensor | None = None) -> torch.Tensor:
    """Attack success of each group's trigger on every image of its pool (batched, chunked). ``targets``:
    [G], or a per-class mapping [G, K] (then ``y`` gives each image's class)."""
    device = x.device
    n_groups, length = index.shape
    hits = torch.zeros(n_groups, device=device)
    cols_per_pass = max(1, cfg.max_images_per_pass // n_groups)
    for start in range(0, length, cols_per_pass):
        idx = index[:, start : start + cols_per_pass].to(device)
        pred = model(embed(family, tensors, x[idx]).flatten(0, 1)).argmax(1).view(n_groups, -1)
        hits += (pred == image_targets(targets, idx, y)).float().sum(1)
    return hits / length


def reverse_engineer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, groups: list[list[int]],
                     targets: list[int] | torch.Tensor, family: str, cfg: ReverseConfig,
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
